# Final analysis rule: migration/metastasis pathway scores tested against matched null gene sets,
# per sample, GSEA, and the per-cell result (final.h5ad).


rule pathways:
    input:
        # stages a workflow may not wire: malignant calls; pseudotime annotations (X_diffmap, paga, iroot)
        unpack(
            wired_outputs(
                malignant=("malignant", "cells"),
                annotations=("pseudotime", "annotations"),
            )
        ),
        h5ad=rules.cluster.output.h5ad,
        qc_h5ad=rules.qc.output.h5ad,
        stemness=rules.stemness.output.cells,
        # the stemness score's genes (signature and sets), left out of the pathway sets
        stemness_info=rules.stemness.output.info,
        stemness_gene_sets=rules.stemness.output.gene_sets,
        pseudotime=rules.pseudotime.output.cells,
        # curated and user GMT files: inputs, so editing one reruns the rule
        gene_sets=gene_set_files("pathways"),
        aliases=lambda wc: resolve_path(params_of(wc)["pathways"]["aliases"]),
    output:
        h5ad=f"{OUTDIR}/{{dataset}}/final.h5ad",
        info=f"{OUTDIR}/{{dataset}}/pathways/info.json",
        effects=report(
            f"{OUTDIR}/{{dataset}}/figures/pathways_effects.png",
            caption="../report/pathways_effects.rst",
            category="5. Pathways",
            labels={
                "dataset": "{dataset}",
                "figure": "pathway effects with CI and null",
            },
        ),
        summary=report(
            f"{OUTDIR}/{{dataset}}/tables/pathways_summary.tsv",
            caption="../report/pathways_summary.rst",
            category="5. Pathways",
            labels={"dataset": "{dataset}", "table": "pathway summary"},
        ),
        details=report(
            f"{OUTDIR}/{{dataset}}/tables/pathways_details.tsv",
            caption="../report/pathways_details.rst",
            category="5. Pathways",
            labels={"dataset": "{dataset}", "table": "pathway details"},
        ),
        per_sample=report(
            f"{OUTDIR}/{{dataset}}/tables/pathways_per_sample.tsv",
            caption="../report/pathways_per_sample.rst",
            category="5. Pathways",
            labels={"dataset": "{dataset}", "table": "pathway effects per sample"},
        ),
        coverage=report(
            f"{OUTDIR}/{{dataset}}/tables/pathways_coverage.tsv",
            caption="../report/pathways_coverage.rst",
            category="5. Pathways",
            labels={"dataset": "{dataset}", "table": "pathway gene-set coverage"},
        ),
        cluster_means=f"{OUTDIR}/{{dataset}}/tables/pathways_cluster_means.tsv",
        gsea=f"{OUTDIR}/{{dataset}}/tables/gsea_prerank.tsv",
        ssgsea=f"{OUTDIR}/{{dataset}}/tables/gsea_ssgsea_clusters.tsv",
        heatmap=report(
            f"{OUTDIR}/{{dataset}}/figures/pathways_heatmap.png",
            caption="../report/pathways_heatmap.rst",
            category="5. Pathways",
            labels={"dataset": "{dataset}", "figure": "pathways per cluster"},
        ),
        trends=report(
            f"{OUTDIR}/{{dataset}}/figures/pathways_pseudotime.png",
            caption="../report/pathways_pseudotime.rst",
            category="5. Pathways",
            labels={"dataset": "{dataset}", "figure": "pathways along pseudotime"},
        ),
        gsea_plot=report(
            f"{OUTDIR}/{{dataset}}/figures/pathways_gsea.png",
            caption="../report/pathways_gsea.rst",
            category="5. Pathways",
            labels={"dataset": "{dataset}", "figure": "GSEA CSC-like vs rest"},
        ),
    log:
        f"{OUTDIR}/logs/{{dataset}}/pathways.log",
    benchmark:
        f"{OUTDIR}/benchmarks/{{dataset}}/pathways.tsv"
    conda:
        "../../envs/pathways.yaml"
    threads: 2
    resources:
        mem_mb=res("pathways", "mem_mb"),
        runtime=res("pathways", "runtime"),
    params:
        row=row,
        params=params_of,
    script:
        "../scripts/pathways.py"
