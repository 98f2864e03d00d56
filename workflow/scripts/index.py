"""Snakemake wrapper: results/index.html, one line per dataset linking its report."""
from metastem.smk import run


def main(smk) -> None:
    import sys
    from pathlib import Path

    from metastem.smk import report

    report.write_index(smk.output.html, list(smk.input.reports))
    # the page to open, wherever outdir points (make run prints nothing of its own)
    print(f"metastem: open {Path(smk.output.html).resolve()}", file=sys.stderr)


run(snakemake, main)  # noqa: F821
