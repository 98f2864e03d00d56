# QC: read the input, per-cell metrics, adaptive MAD thresholds, doublets, gene filter.


rule qc:
    input:
        input_path,
    output:
        h5ad=intermediate(f"{OUTDIR}/{{dataset}}/qc/qc.h5ad"),
        cells=f"{OUTDIR}/{{dataset}}/qc/cells.tsv.gz",
        info=f"{OUTDIR}/{{dataset}}/qc/info.json",
        summary=report(
            f"{OUTDIR}/{{dataset}}/tables/qc_summary.tsv",
            caption="../report/qc_summary.rst",
            category="1. QC",
            labels={"dataset": "{dataset}", "table": "QC summary"},
        ),
        figure=report(
            f"{OUTDIR}/{{dataset}}/figures/qc_metrics.png",
            caption="../report/qc_metrics.rst",
            category="1. QC",
            labels={"dataset": "{dataset}", "figure": "QC metrics"},
        ),
    log:
        f"{OUTDIR}/logs/{{dataset}}/qc.log",
    benchmark:
        f"{OUTDIR}/benchmarks/{{dataset}}/qc.tsv"
    conda:
        "../../envs/analysis.yaml"
    threads: 2
    resources:
        mem_mb=res("qc", "mem_mb"),
        runtime=res("qc", "runtime"),
    params:
        row=row,
        params=params_for("simulate", "qc"),
    script:
        "../scripts/qc.py"
