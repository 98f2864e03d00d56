# Final analysis rule: migration/metastasis pathway scores, GSEA and the per-cell result (final.h5ad).


rule pathways:
    input:
        h5ad=f"{OUTDIR}/{{dataset}}/cluster/clustered.h5ad",
        qc_h5ad=f"{OUTDIR}/{{dataset}}/qc/qc.h5ad",
        stemness=f"{OUTDIR}/{{dataset}}/stemness/cells.tsv.gz",
        pseudotime=f"{OUTDIR}/{{dataset}}/pseudotime/cells.tsv.gz",
        # curated and user GMT files: inputs, so editing one reruns the rule
        gene_sets=gene_set_files("pathways"),
        aliases=lambda wc: resolve_path(params_of(wc)["pathways"]["aliases"]),
    output:
        h5ad=f"{OUTDIR}/{{dataset}}/final.h5ad",
        info=f"{OUTDIR}/{{dataset}}/pathways/info.json",
        summary=report(
            f"{OUTDIR}/{{dataset}}/tables/pathways_summary.tsv",
            caption="../report/pathways_summary.rst",
            category="5. Pathways",
            labels={"dataset": "{dataset}", "table": "pathway summary"},
        ),
        coverage=f"{OUTDIR}/{{dataset}}/tables/pathways_coverage.tsv",
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
