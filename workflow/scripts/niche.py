"""Snakemake wrapper: ligand-receptor interactions of CSC-like cells with their niche (table, dot plot, info)."""
from metastem.smk import run


def read_final(path: str):
    """X, obs and var of final.h5ad: its count layer and embeddings are not needed here."""
    import anndata as ad
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        return ad.AnnData(X=read_elem(f["X"]), obs=read_elem(f["obs"]), var=read_elem(f["var"]))


def write_skipped(smk, params: dict, groupby: str, reason: str) -> None:
    """Every declared output, saying nothing was scored: tables with their headers, the figure an empty file
    with its sentence in figure_notes, info.json 'skipped' = the reason (docs/CONTRACTS.md)."""
    from pathlib import Path

    import pandas as pd

    from metastem import io, niche
    from metastem.smk import write_json_atomic

    io.write_table_atomic(pd.DataFrame(columns=niche.COLUMNS), smk.output.interactions, index=False)
    io.write_table_atomic(pd.DataFrame(columns=niche.BY_SAMPLE_COLUMNS), smk.output.by_sample, index=False)
    Path(smk.output.figure).parent.mkdir(parents=True, exist_ok=True)
    Path(smk.output.figure).write_bytes(b"")
    write_json_atomic({"skipped": reason, "params": {**params, "groupby_used": groupby}, "notes": [reason],
                       "groups": [], "n_interactions": 0, "n_specific": 0, "review_axes_specific": [], "top": [],
                       "replication": {}, "figure_notes": {Path(smk.output.figure).stem: reason}, "methods": reason},
                      smk.output.info)


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
    reason = niche.skip_reason(adata)
    if reason:  # no CSC-like cells (e.g. stemness.required: false on data without stemness genes)
        write_skipped(smk, params, groupby, reason)
        return
    timed("ligand-receptor interactions (pooled and per sample)", niche.niche_interactions, adata, groupby=groupby,
          resource=params["resource"], species=row["species"], n_perms=params["n_perms"],
          expr_prop=params["expr_prop"], min_cells=params["min_cells"],
          max_cells_per_group=params["max_cells_per_group"], alpha=params["alpha"],
          per_sample=params["per_sample"], seed=p["seed"], n_jobs=1)
    table = niche.interactions_table(adata)
    by_sample = niche.by_sample_table(adata)
    io.write_table_atomic(table, smk.output.interactions, index=False)
    io.write_table_atomic(by_sample, smk.output.by_sample, index=False)
    niche.plot_niche(adata, n_top=params["n_top"], save=smk.output.figure)
    uns = adata.uns["niche"]
    groups = uns["groups"]
    axes = table[(table["review_axis"] != "") & (table["p"] < params["alpha"])]
    specific = table[table["p"] < params["alpha"]]
    n_max = int(table["n_samples_tested"].max()) if len(table) else 0
    write_json_atomic({
        "params": {**params, "groupby_used": groupby},
        "notes": niche.notes(adata),
        "groups": groups.to_dict("records"),
        "n_interactions": int(len(table)),
        "n_specific": int(len(specific)),
        "review_axes_specific": sorted(set(axes["review_axis"])),
        "top": table.head(10)[["sender", "receiver", "ligand", "receptor", "p", "review_axis",
                               "replication"]].to_dict("records"),
        # the sample as the unit: how many specific interactions (p < alpha pooled) replicate across samples
        "replication": {
            "n_samples": int(by_sample["sample"].nunique()) if len(by_sample) else 0,
            "n_samples_max_tested": n_max,
            "n_specific_replicated": int(specific["replication"].str.startswith("replicated").sum()),
            "review_axes_replicated": sorted(set(axes.loc[axes["replication"].str.startswith("replicated"),
                                                          "review_axis"])),
        },
        "methods": (f"Ligand-receptor interactions between CSC-like malignant cells and every other cell group "
                    f"(other malignant cells; non-malignant cells by '{groupby}') were scored with LIANA+ "
                    f"(rank aggregate of CellPhoneDB, Connectome, log2FC, NATMI and SingleCellSignalR; "
                    f"resource {params['resource']}, read offline from the liana wheel) on at most "
                    f"{params['max_cells_per_group']} cells per group (seed {p['seed']}), with "
                    f"{params['n_perms']} label permutations for the CellPhoneDB p-value. Cells are not "
                    "independent replicates: p says a pair is specific to two groups in this dataset, not "
                    "that the cells communicate. "
                    + ("The same scoring was repeated within each sample (groups with fewer than "
                       f"{params['min_cells']} cells of that sample skipped); an interaction is present in a "
                       f"sample when its p there is below {params['alpha']}, and 'replicated' when present in at "
                       "least 80 % of at least 3 samples tested, else 'descriptive (n = k samples)' with fewer."
                       if params["per_sample"] else "No per-sample replication was run (niche.per_sample: false).")),
    }, smk.output.info)


run(snakemake, main)  # noqa: F821
