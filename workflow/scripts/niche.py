"""Snakemake wrapper: ligand-receptor interactions of CSC-like cells with their niche (table, dot plot, info)."""
from metastem.smk import run


def read_final(path: str):
    """X, obs and var of final.h5ad: its count layer and embeddings are not needed here."""
    import anndata as ad
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        return ad.AnnData(X=read_elem(f["X"]), obs=read_elem(f["obs"]), var=read_elem(f["var"]))


def main(smk) -> None:
    from metastem._timing import timed  # one log line per step: time and peak RSS
    from metastem import io
    from metastem import niche
    from metastem.smk import write_json_atomic

    row, p = smk.params.row, smk.params.params
    params = p["niche"]
    adata = read_final(smk.input.h5ad)
    labels = row.get("labels") or ""
    groupby = labels if params["use_labels"] and labels and labels in adata.obs else params["groupby"]
    timed("ligand-receptor interactions", niche.niche_interactions, adata, groupby=groupby, resource=params["resource"], species=row["species"],
                             n_perms=params["n_perms"], expr_prop=params["expr_prop"], min_cells=params["min_cells"],
                             max_cells_per_group=params["max_cells_per_group"], alpha=params["alpha"],
                             seed=p["seed"], n_jobs=1)
    table = niche.interactions_table(adata)
    io.write_table_atomic(table, smk.output.interactions, index=False)
    niche.plot_niche(adata, n_top=params["n_top"], save=smk.output.figure)
    uns = adata.uns["niche"]
    groups = uns["groups"]
    axes = table[(table["review_axis"] != "") & (table["p"] < params["alpha"])]
    write_json_atomic({
        "params": {**params, "groupby_used": groupby},
        "notes": niche.notes(adata),
        "groups": groups.to_dict("records"),
        "n_interactions": int(len(table)),
        "n_specific": int((table["p"] < params["alpha"]).sum()),
        "review_axes_specific": sorted(set(axes["review_axis"])),
        "top": table.head(10)[["sender", "receiver", "ligand", "receptor", "p", "review_axis"]].to_dict("records"),
        "methods": (f"Ligand-receptor interactions between CSC-like malignant cells and every other cell group "
                    f"(other malignant cells; non-malignant cells by '{groupby}') were scored with LIANA+ "
                    f"(rank aggregate of CellPhoneDB, Connectome, log2FC, NATMI and SingleCellSignalR; "
                    f"resource {params['resource']}, read offline from the liana wheel) on at most "
                    f"{params['max_cells_per_group']} cells per group (seed {p['seed']}), with "
                    f"{params['n_perms']} label permutations for the CellPhoneDB p-value. Cells are not "
                    "independent replicates: p says a pair is specific to two groups in this dataset, not "
                    "that the cells communicate."),
    }, smk.output.info)


run(snakemake, main)  # noqa: F821
