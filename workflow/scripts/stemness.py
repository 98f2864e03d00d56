"""Snakemake wrapper: stemness scores, CSC-like calls, tables, figures and the per-cell table."""
from pathlib import Path

from metastem.smk import run

# obs columns handed to later stages (docs/CONTRACTS.md: stemness/cells.tsv.gz)
FIXED_COLUMNS = ["stemness", "csc_like", "stemness_within", "stemness_cytotrace", "stemness_gene_counts", "stemness_depth_adjusted",
                 "stemness_entropy", "stemness_programme", "stemness_proliferation", "stemness_signature",
                 "S_score", "G2M_score", "phase"]


def per_cell_table(adata):
    """Every obs column this stage adds, index = cell barcode."""
    from metastem._keys import Obs

    prefixes = (Obs.STEMNESS_SET_PREFIX, Obs.STEMNESS_DIFF_SET_PREFIX)
    cols = [c for c in FIXED_COLUMNS if c in adata.obs] + [c for c in adata.obs if c.startswith(prefixes)]
    return adata.obs[cols]


def main(smk) -> None:
    from metastem._timing import timed  # one log line per step: time and peak RSS
    import anndata as ad
    import pandas as pd

    from metastem import csc, io
    from metastem import plots_stemness as plots
    from metastem import stemness
    from metastem.smk import write_json_atomic

    row, p = smk.params.row, smk.params.params
    adata = timed("read clustered.h5ad", ad.read_h5ad, smk.input.h5ad)
    s = p["stemness"]
    # malignant calls first: the score orders malignant cells by a signature learned among them (compartment_key)
    malignant = getattr(smk.input, "malignant", None)  # rules.malignant.output.cells
    if malignant:
        io.add_stage_cells(adata, malignant if isinstance(malignant, str) else malignant[0], ["malignant"])
        adata.obs["malignant"] = adata.obs["malignant"].astype(bool)
    csc_keys = ("csc_groupby", "csc_rule")  # read by csc.call_csc_like below, not by the score
    info = timed("stemness score", stemness.score_stemness, adata, species=row["species"], seed=p["seed"],
                                   **{k: v for k, v in s.items() if k not in csc_keys})
    # CSC-like: each sample's own most stem-like MALIGNANT cells (issue 15), replacing the dataset-wide call
    if info.get("status", "computed") == "computed":
        timed("CSC-like calls", csc.call_csc_like, adata, groupby=s["csc_groupby"], quantile=s["csc_quantile"], rule=s["csc_rule"],
                          seed=p["seed"])
        info["csc"] = csc.csc_summary(adata)
        info["n_csc_like"], info["csc_threshold"] = info["csc"]["n_csc_like"], None  # one threshold per sample
        info["notes"] = info.get("notes", []) + info["csc"]["notes"]
        io.write_table_atomic(csc.csc_table(adata), smk.output.csc, index=False)
    else:
        io.write_table_atomic(pd.DataFrame(columns=csc.TABLE_COLUMNS), smk.output.csc, index=False)
    figure_notes = {}
    for path, draw in ((smk.output.umap, lambda f: plots.plot_umap_stemness(adata, f)),
                       (smk.output.cluster_figure, lambda f: plots.plot_cluster_stemness(adata, f)),
                       (smk.output.baseline, lambda f: plots.plot_stemness_vs_gene_counts(adata, f)),
                       (smk.output.labels, lambda f: plots.plot_stemness_by_label(adata, f, row["labels"] or None))):
        reason = timed(f"figure {Path(path).stem}", draw, path)
        if reason:
            # Nothing to draw: an empty file satisfies Snakemake, the sentence goes to the report.
            Path(path).write_bytes(b"")
            figure_notes[Path(path).stem] = reason
    info["figure_notes"] = figure_notes
    io.write_table_atomic(stemness.stemness_cluster_table(adata), smk.output.clusters, index=False)
    io.write_table_atomic(stemness.stemness_gene_correlations(adata), smk.output.genes, index=False)
    coverage = info.pop("gene_set_coverage")
    io.write_table_atomic(pd.DataFrame(coverage), smk.output.gene_sets, index=False)
    io.write_table_atomic(per_cell_table(adata), smk.output.cells, index_label="cell")
    write_json_atomic(info, smk.output.info)


run(snakemake, main)  # noqa: F821
