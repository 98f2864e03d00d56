"""Snakemake wrapper: the self-contained report.html of one dataset, from its stages' files."""
import sys

from metastem.smk import run


def main(smk) -> None:
    import logging

    from metastem.smk import report

    stage_files = {stage: list(getattr(smk.input, stage)) for stage in report.STAGES if stage in smk.input.keys()}
    size = report.write_report(smk.output.html, smk.wildcards.dataset, stage_files, row=smk.params.row,
                               params=smk.params.params, captions=smk.params.captions,
                               provenance=list(smk.input.provenance), schema=smk.params.schema)
    logging.getLogger("metastem").info("wrote %s: %.2f MB", smk.output.html, size / 1e6)
    print(f"metastem: {smk.output.html}: {size / 1e6:.2f} MB", file=sys.stderr)


run(snakemake, main)  # noqa: F821
