"""Snakemake wrapper: normalise, embed and cluster the QC'd cells; marker genes."""
from metastem.smk import run


def main(smk) -> None:
    from metastem._timing import timed  # one log line per step: time and peak RSS
    import json

    from pathlib import Path

    import anndata as ad
    import pandas as pd

    from metastem import cluster, integration, io, plots
    from metastem.errors import MetastemError
    from metastem.smk import write_json_atomic

    row, p = smk.params.row, smk.params.params
    adata = timed("read qc.h5ad", ad.read_h5ad, smk.input.h5ad)
    norm = timed("normalise", cluster.normalize, adata, values=row["values"], target_sum=p["cluster"]["target_sum"])
    try:
        notes = timed("HVG, PCA, kNN graph, UMAP, Leiden", cluster.embed_and_cluster, adata, p["cluster"], seed=p["seed"])
    except MetastemError as err:
        raise err.with_context(file=smk.input.h5ad)
    markers = timed("marker genes", cluster.marker_genes, adata, p["cluster"]["n_markers"],
                                   max_cells_per_cluster=p["cluster"]["markers_max_cells"], seed=p["seed"],
                                   key_added="rank_genes_groups")  # kept in clustered.h5ad for final.h5ad
    sizes = adata.obs["leiden"].value_counts().rename_axis("cluster").reset_index(name="n_cells")
    sizes["fraction"] = sizes["n_cells"] / adata.n_obs
    labels = adata.obs[row["labels"]] if row["labels"] else None
    timed("figure umap_clusters", plots.plot_clusters, adata.obsm["X_umap"], adata.obs["leiden"], smk.output.figure, labels=labels)
    io.write_table_atomic(markers, smk.output.markers, index=False)
    io.write_table_atomic(sizes, smk.output.sizes, index=False)
    batch_key = p["cluster"]["batch_key"]
    mixing = {"n_samples": integration.n_samples(adata, batch_key), "batch_key": batch_key,
              "integration": "harmony" if integration.HARMONY_KEY in adata.obsm else "none"}
    figure_notes = {}
    if batch_key in adata.obs:
        per, shares, summary = integration.sample_mixing(adata, sample_key=batch_key,
                                                         max_cells=p["cluster"]["mixing_max_cells"], seed=p["seed"])
        mixing.update(summary)
    else:
        per, shares = pd.DataFrame(columns=["cluster", "n_cells"]), pd.DataFrame(columns=["cluster", "sample"])
    if mixing["n_samples"] > 1:
        integration.plot_integration(adata, shares, sample_key=batch_key, save=smk.output.mixing_figure)
    else:  # an empty file satisfies Snakemake; the sentence goes to the report
        Path(smk.output.mixing_figure).write_bytes(b"")
        figure_notes["umap_samples"] = "one sample: there is nothing to integrate or mix"
    io.write_table_atomic(per, smk.output.mixing, index=False)
    io.write_table_atomic(shares, smk.output.composition, index=False)
    write_json_atomic({"normalisation": norm, "notes": notes, "n_clusters": int(adata.obs["leiden"].nunique()),
                       "n_hvg": int(adata.var["highly_variable"].sum()), "n_pcs": int(adata.obsm["X_pca"].shape[1]),
                       "knn_components": int(adata.obs["knn_component"].nunique()), "samples": mixing,
                       "figure_notes": figure_notes}, smk.output.info)
    meta = adata.uns["metastem"]
    meta["params_json"] = json.dumps({**json.loads(meta["params_json"]), **p})  # QC's sections and this rule's
    io.write_h5ad_atomic(adata, smk.output.h5ad)


run(snakemake, main)  # noqa: F821
