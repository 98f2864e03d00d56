"""Snakemake wrapper: results/index.html, one line per dataset linking its report."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # noqa: F821
from metastem.smk import run  # noqa: E402


def main(smk) -> None:
    from metastem import report

    report.write_index(smk.output.html, list(smk.input.reports))


run(snakemake, main)  # noqa: F821
