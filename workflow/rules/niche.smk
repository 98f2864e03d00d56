# The niche as signalling: ligand-receptor interactions between CSC-like cells and every other cell group.


rule niche:
    input:
        h5ad=rules.pathways.output.h5ad,
    output:
        info=f"{OUTDIR}/{{dataset}}/niche/info.json",
        interactions=report(
            f"{OUTDIR}/{{dataset}}/tables/niche_interactions.tsv",
            caption="../report/niche_interactions_table.rst",
            category="6. Niche",
            labels={"dataset": "{dataset}", "table": "niche interactions"},
        ),
        by_sample=report(
            f"{OUTDIR}/{{dataset}}/tables/niche_by_sample.tsv",
            caption="../report/niche_by_sample.rst",
            category="6. Niche",
            labels={"dataset": "{dataset}", "table": "niche interactions per sample"},
        ),
        figure=report(
            f"{OUTDIR}/{{dataset}}/figures/niche_interactions.png",
            caption="../report/niche_interactions.rst",
            category="6. Niche",
            labels={"dataset": "{dataset}", "figure": "niche interactions"},
        ),
    log:
        f"{OUTDIR}/logs/{{dataset}}/niche.log",
    benchmark:
        f"{OUTDIR}/benchmarks/{{dataset}}/niche.tsv"
    conda:
        "../../envs/niche.yaml"
    # LIANA's permutations run in one process (joblib workers would each copy the matrix)
    threads: 1
    resources:
        mem_mb=res("niche", "mem_mb"),
        runtime=res("niche", "runtime"),
    params:
        row=row,
        params=params_for("niche"),
    script:
        "../scripts/niche.py"
