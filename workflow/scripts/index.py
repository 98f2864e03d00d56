"""Snakemake wrapper: results/index.html, one line per dataset linking its report."""
from metastem.smk import run


def main(smk) -> None:
    from metastem import report

    report.write_index(smk.output.html, list(smk.input.reports))


run(snakemake, main)  # noqa: F821
