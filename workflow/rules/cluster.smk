# Clustering: normalisation, HVG, PCA, kNN graph, UMAP, Leiden, Wilcoxon markers.


rule cluster:
    input:
        h5ad=rules.qc.output.h5ad,
    output:
        h5ad=intermediate(f"{OUTDIR}/{{dataset}}/cluster/clustered.h5ad"),
        info=f"{OUTDIR}/{{dataset}}/cluster/info.json",
        markers=report(
            f"{OUTDIR}/{{dataset}}/tables/markers.tsv",
            caption="../report/markers.rst",
            category="2. Clusters",
            labels={"dataset": "{dataset}", "table": "marker genes"},
        ),
        sizes=f"{OUTDIR}/{{dataset}}/tables/cluster_sizes.tsv",
        figure=report(
            f"{OUTDIR}/{{dataset}}/figures/umap_clusters.png",
            caption="../report/umap_clusters.rst",
            category="2. Clusters",
            labels={"dataset": "{dataset}", "figure": "UMAP clusters"},
        ),
        mixing=report(
            f"{OUTDIR}/{{dataset}}/tables/sample_mixing.tsv",
            caption="../report/sample_mixing.rst",
            category="2. Clusters",
            labels={"dataset": "{dataset}", "table": "sample mixing per cluster"},
        ),
        composition=report(
            f"{OUTDIR}/{{dataset}}/tables/sample_composition.tsv",
            caption="../report/sample_composition.rst",
            category="2. Clusters",
            labels={"dataset": "{dataset}", "table": "samples per cluster"},
        ),
        mixing_figure=report(
            f"{OUTDIR}/{{dataset}}/figures/umap_samples.png",
            caption="../report/umap_samples.rst",
            category="2. Clusters",
            labels={"dataset": "{dataset}", "figure": "samples per cluster"},
        ),
    log:
        f"{OUTDIR}/logs/{{dataset}}/cluster.log",
    benchmark:
        f"{OUTDIR}/benchmarks/{{dataset}}/cluster.tsv"
    conda:
        "../../envs/analysis.yaml"
    threads: 2
    resources:
        mem_mb=res("cluster", "mem_mb"),
        runtime=res("cluster", "runtime"),
    params:
        row=row,
        params=params_for("cluster"),
    script:
        "../scripts/cluster.py"
