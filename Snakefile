# metastem: cancer-stem-cell signatures in scRNA-seq.
# QC -> clustering -> stemness -> pseudotime -> migration/metastasis pathways -> HTML report, per dataset.


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/cluster.smk"


rule all:
    default_target: True
    input:
        expand(f"{OUTDIR}/{{dataset}}/cluster/clustered.h5ad", dataset=DATASETS),
