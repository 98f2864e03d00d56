"""Snakemake wrapper: normalise, embed and cluster the QC'd cells; marker genes."""
from metastem.smk import run


def main(smk) -> None:
    import json

    import anndata as ad

    from metastem import cluster, io, plots
    from metastem.errors import MetastemError
    from metastem.smk import write_json_atomic

    row, p = smk.params.row, smk.params.params
    adata = ad.read_h5ad(smk.input.h5ad)
    norm = cluster.normalize(adata, values=row["values"], target_sum=p["cluster"]["target_sum"])
    try:
        notes = cluster.embed_and_cluster(adata, p["cluster"], seed=p["seed"])
    except MetastemError as err:
        raise err.with_context(file=smk.input.h5ad)
    markers = cluster.marker_genes(adata, p["cluster"]["n_markers"],
                                   max_cells_per_cluster=p["cluster"]["markers_max_cells"], seed=p["seed"])
    sizes = adata.obs["leiden"].value_counts().rename_axis("cluster").reset_index(name="n_cells")
    sizes["fraction"] = sizes["n_cells"] / adata.n_obs
    labels = adata.obs[row["labels"]] if row["labels"] else None
    plots.plot_clusters(adata.obsm["X_umap"], adata.obs["leiden"], smk.output.figure, labels=labels)
    io.write_table_atomic(markers, smk.output.markers, index=False)
    io.write_table_atomic(sizes, smk.output.sizes, index=False)
    write_json_atomic({"normalisation": norm, "notes": notes, "n_clusters": int(adata.obs["leiden"].nunique()),
                       "n_hvg": int(adata.var["highly_variable"].sum()), "n_pcs": int(adata.obsm["X_pca"].shape[1]),
                       "knn_components": int(adata.obs["knn_component"].nunique())}, smk.output.info)
    meta = adata.uns["metastem"]
    meta["params_json"] = json.dumps({**json.loads(meta["params_json"]), **p})  # QC's sections and this rule's
    io.write_h5ad_atomic(adata, smk.output.h5ad)


run(snakemake, main)  # noqa: F821
