# Malignant vs normal cells: known labels, or copy-number profiles (infercnvpy) against reference normal cells.


rule malignant:
    input:
        h5ad=rules.cluster.output.h5ad,
    output:
        cells=f"{OUTDIR}/{{dataset}}/malignant/cells.tsv.gz",
        info=f"{OUTDIR}/{{dataset}}/malignant/info.json",
        summary=report(
            f"{OUTDIR}/{{dataset}}/tables/malignant_summary.tsv",
            caption="../report/malignant_summary.rst",
            category="2b. Malignant cells",
            labels={"dataset": "{dataset}", "table": "malignant cells per sample"},
        ),
        heatmap=report(
            f"{OUTDIR}/{{dataset}}/figures/cnv_heatmap.png",
            caption="../report/cnv_heatmap.rst",
            category="2b. Malignant cells",
            labels={"dataset": "{dataset}", "figure": "CNV heatmap"},
        ),
        umap=report(
            f"{OUTDIR}/{{dataset}}/figures/cnv_score_umap.png",
            caption="../report/cnv_score_umap.rst",
            category="2b. Malignant cells",
            labels={"dataset": "{dataset}", "figure": "CNV score on UMAP"},
        ),
    log:
        f"{OUTDIR}/logs/{{dataset}}/malignant.log",
    benchmark:
        f"{OUTDIR}/benchmarks/{{dataset}}/malignant.tsv"
    conda:
        "../../envs/analysis.yaml"
    threads: 2
    resources:
        mem_mb=res("malignant", "mem_mb"),
        runtime=res("malignant", "runtime"),
    params:
        row=row,
        params=params_for("malignant"),
    script:
        "../scripts/malignant.py"
