# Pseudotime: diffusion pseudotime rooted in stemness over all cells and within each tumour's malignant
# cells (rooted in its CSC-like cells), PAGA between clusters, diagnostics.


rule pseudotime:
    input:
        # malignant calls, when the workflow wires that stage (else every cell counts as malignant, said so)
        unpack(wired_outputs(malignant=("malignant", "cells"))),
        h5ad=rules.cluster.output.h5ad,
        stemness=rules.stemness.output.cells,
    output:
        cells=f"{OUTDIR}/{{dataset}}/pseudotime/cells.tsv.gz",
        paga=f"{OUTDIR}/{{dataset}}/pseudotime/paga.json",
        info=f"{OUTDIR}/{{dataset}}/pseudotime/info.json",
        annotations=f"{OUTDIR}/{{dataset}}/pseudotime/annotations.h5ad",
        diagnostics=report(
            f"{OUTDIR}/{{dataset}}/tables/pseudotime_diagnostics.tsv",
            caption="../report/pseudotime_diagnostics.rst",
            category="4. Pseudotime",
            labels={"dataset": "{dataset}", "table": "pseudotime diagnostics"},
        ),
        by_sample=report(
            f"{OUTDIR}/{{dataset}}/tables/pseudotime_by_sample.tsv",
            caption="../report/pseudotime_by_sample.rst",
            category="4. Pseudotime",
            labels={"dataset": "{dataset}", "table": "pseudotime within each tumour"},
        ),
        umap=report(
            f"{OUTDIR}/{{dataset}}/figures/pseudotime_umap.png",
            caption="../report/pseudotime_umap.rst",
            category="4. Pseudotime",
            labels={"dataset": "{dataset}", "figure": "pseudotime on UMAP"},
        ),
        paga_figure=report(
            f"{OUTDIR}/{{dataset}}/figures/pseudotime_paga.png",
            caption="../report/pseudotime_paga.rst",
            category="4. Pseudotime",
            labels={"dataset": "{dataset}", "figure": "PAGA graph"},
        ),
        trend=report(
            f"{OUTDIR}/{{dataset}}/figures/pseudotime_stemness.png",
            caption="../report/pseudotime_stemness.rst",
            category="4. Pseudotime",
            labels={"dataset": "{dataset}", "figure": "stemness along pseudotime"},
        ),
        malignant_figure=report(
            f"{OUTDIR}/{{dataset}}/figures/pseudotime_malignant.png",
            caption="../report/pseudotime_malignant.rst",
            category="4. Pseudotime",
            labels={"dataset": "{dataset}", "figure": "pseudotime within each tumour"},
        ),
    log:
        f"{OUTDIR}/logs/{{dataset}}/pseudotime.log",
    benchmark:
        f"{OUTDIR}/benchmarks/{{dataset}}/pseudotime.tsv"
    conda:
        "../../envs/analysis.yaml"
    threads: 2
    resources:
        mem_mb=res("pseudotime", "mem_mb"),
        runtime=res("pseudotime", "runtime"),
    params:
        row=row,
        params=params_for("pseudotime", "cluster"),
    script:
        "../scripts/pseudotime.py"
