"""Snakemake wrapper: DPT rooted in stemness, PAGA, diagnostics table, figures and the per-cell table."""
from metastem.smk import run

STEMNESS_KEY = "stemness"
OBS_WRITTEN = ["pseudotime", "pseudotime_reachable"]


def add_stemness(adata, path: str) -> None:
    """Join the stemness column of the stemness stage's per-cell table; every cell must be there."""
    import pandas as pd

    from metastem.errors import MetastemError

    cells = pd.read_csv(path, sep="\t", index_col=0)
    if STEMNESS_KEY not in cells.columns:
        raise MetastemError(f"no '{STEMNESS_KEY}' column (has: {', '.join(cells.columns[:10])})", file=path,
                            fix="rerun the stemness stage (delete the file and run again)")
    missing = adata.obs_names.difference(cells.index)
    if len(missing):
        raise MetastemError(f"{len(missing)} cells of clustered.h5ad are not in this table (e.g. {missing[0]})",
                            file=path, fix="rerun the stemness stage (delete the file and run again)")
    adata.obs[STEMNESS_KEY] = cells.loc[adata.obs_names, STEMNESS_KEY].to_numpy(dtype=float)


def main(smk) -> None:
    import anndata as ad

    from metastem import io
    from metastem import plots_pseudotime as plots
    from metastem import pseudotime as pt
    from metastem.smk import write_json_atomic

    row, p = smk.params.row, smk.params.params
    params = p["pseudotime"]
    adata = io.read_h5ad_without_X(smk.input.h5ad)  # DPT and PAGA use the graph, never X
    add_stemness(adata, smk.input.stemness)
    labels_key = row["labels"] or None
    info = pt.run_pseudotime(adata, params, stemness_key=STEMNESS_KEY, labels_key=labels_key, seed=p["seed"])
    truth = "true_pseudotime" if "true_pseudotime" in adata.obs.columns else None
    diagnostics = pt.pseudotime_diagnostics(adata, info, stemness_key=STEMNESS_KEY, truth_key=truth)
    umap = adata.n_obs <= params["paga_umap_max_cells"]
    paga = pt.run_paga(adata, stemness_key=STEMNESS_KEY, umap=umap, min_dist=p["cluster"]["umap_min_dist"],
                       seed=p["seed"])
    if not umap:
        info["notes"].append(f"PAGA-initialised UMAP skipped above pseudotime.paga_umap_max_cells="
                             f"{params['paga_umap_max_cells']} cells ({adata.n_obs} here): the clustering's UMAP "
                             "and the PAGA graph are shown instead")

    plots.plot_pseudotime_embedding(adata, smk.output.umap, root=info["root"]["index"], seed=p["seed"])
    plots.plot_paga_graph(paga, smk.output.paga_figure, root_cluster=info["root"]["cluster"])
    plots.plot_stemness_along_pseudotime(adata, smk.output.trend, stemness_key=STEMNESS_KEY, seed=p["seed"])
    io.write_table_atomic(diagnostics, smk.output.diagnostics, index=False)
    io.write_table_atomic(adata.obs[OBS_WRITTEN], smk.output.cells, index_label="cell")
    info["params"] = params
    info["methods"] = (f"Diffusion pseudotime (scanpy diffmap + dpt, {info['n_dcs']} diffusion components) on the "
                       "clustering's kNN graph; " + info["root"]["why"] + " Pseudotime was rescaled to 0-1 over cells "
                       "reachable from the root; unreachable cells are NaN. PAGA (scanpy, model v1.2) between Leiden "
                       "clusters summarises the topology.")
    write_json_atomic(paga, smk.output.paga)
    write_json_atomic(info, smk.output.info)


run(snakemake, main)  # noqa: F821
