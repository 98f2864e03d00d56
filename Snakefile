# metastem: cancer-stem-cell signatures in scRNA-seq.
# QC -> clustering -> stemness -> pseudotime -> migration/metastasis pathways -> HTML report, per dataset.


configfile: Path(workflow.basedir) / "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/malignant.smk"
include: "workflow/rules/stemness.smk"
include: "workflow/rules/pseudotime.smk"
include: "workflow/rules/pathways.smk"
include: "workflow/rules/niche.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        f"{OUTDIR}/index.html",
