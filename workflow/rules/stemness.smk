# Stemness: CytoTRACE-style score on the kNN graph, stemness signatures, cell cycle, CSC-like calls.


rule stemness:
    input:
        h5ad=rules.cluster.output.h5ad,
        malignant=rules.malignant.output.cells,
        gene_sets=gene_set_files("stemness"),
    output:
        cells=f"{OUTDIR}/{{dataset}}/stemness/cells.tsv.gz",
        info=f"{OUTDIR}/{{dataset}}/stemness/info.json",
        clusters=report(
            f"{OUTDIR}/{{dataset}}/tables/stemness_clusters.tsv",
            caption="../report/stemness_clusters.rst",
            category="3. Stemness",
            labels={"dataset": "{dataset}", "table": "stemness per cluster"},
        ),
        genes=report(
            f"{OUTDIR}/{{dataset}}/tables/stemness_genes.tsv",
            caption="../report/stemness_genes.rst",
            category="3. Stemness",
            labels={"dataset": "{dataset}", "table": "genes correlated with stemness"},
        ),
        gene_sets=report(
            f"{OUTDIR}/{{dataset}}/tables/stemness_gene_sets.tsv",
            caption="../report/stemness_gene_sets.rst",
            category="3. Stemness",
            labels={"dataset": "{dataset}", "table": "stemness gene-set coverage"},
        ),
        umap=report(
            f"{OUTDIR}/{{dataset}}/figures/stemness_umap.png",
            caption="../report/stemness_umap.rst",
            category="3. Stemness",
            labels={"dataset": "{dataset}", "figure": "stemness on UMAP"},
        ),
        cluster_figure=report(
            f"{OUTDIR}/{{dataset}}/figures/stemness_cluster_distributions.png",
            caption="../report/stemness_cluster_distributions.rst",
            category="3. Stemness",
            labels={"dataset": "{dataset}", "figure": "stemness per cluster"},
        ),
        baseline=report(
            f"{OUTDIR}/{{dataset}}/figures/stemness_gene_counts.png",
            caption="../report/stemness_gene_counts.rst",
            category="3. Stemness",
            labels={"dataset": "{dataset}", "figure": "stemness vs genes detected"},
        ),
        csc=report(
            f"{OUTDIR}/{{dataset}}/tables/csc_by_sample.tsv",
            caption="../report/csc_by_sample.rst",
            category="3. Stemness",
            labels={"dataset": "{dataset}", "table": "CSC-like cells per sample"},
        ),
        labels=report(
            f"{OUTDIR}/{{dataset}}/figures/stemness_labels.png",
            caption="../report/stemness_labels.rst",
            category="3. Stemness",
            labels={"dataset": "{dataset}", "figure": "stemness per known label"},
        ),
    log:
        f"{OUTDIR}/logs/{{dataset}}/stemness.log",
    benchmark:
        f"{OUTDIR}/benchmarks/{{dataset}}/stemness.tsv"
    conda:
        "../../envs/analysis.yaml"
    threads: 2
    resources:
        mem_mb=res("stemness", "mem_mb"),
        runtime=res("stemness", "runtime"),
    params:
        row=row,
        params=params_for("stemness"),
    script:
        "../scripts/stemness.py"
