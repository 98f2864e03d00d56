"""Snakemake wrapper: the final rule. Pathway scores, GSEA, summary table, figures and final.h5ad."""
from metastem.smk import run


def add_cells_table(adata, path: str) -> None:
    """Join a stage's per-cell table (index = barcode) into obs; every cell must be there."""
    import pandas as pd

    from metastem.errors import MetastemError

    cells = pd.read_csv(path, sep="\t", index_col=0)
    missing = adata.obs_names.difference(cells.index)
    if len(missing):
        raise MetastemError(f"{len(missing)} cells of clustered.h5ad are not in this table (e.g. {missing[0]})",
                            file=path, fix="rerun the stage that wrote it (delete the file and run again)")
    for col in cells.columns:
        adata.obs[col] = cells.loc[adata.obs_names, col].to_numpy()


def main(smk) -> None:
    import json

    import anndata as ad
    import numpy as np
    import pandas as pd

    from metastem import io
    from metastem import pathways as pw
    from metastem import plots_pathways as pp
    from metastem.smk import write_json_atomic

    row, p = smk.params.row, smk.params.params
    adata = ad.read_h5ad(smk.input.h5ad)
    add_cells_table(adata, smk.input.stemness)
    add_cells_table(adata, smk.input.pseudotime)
    adata.obs["csc_like"] = adata.obs["csc_like"].astype(bool)
    res = pw.run_pathways(adata, p["pathways"], species=row["species"], seed=p["seed"], aliases_path=smk.input.aliases,
                          threads=smk.threads)

    io.write_table_atomic(res.summary, smk.output.summary, index=False)
    io.write_table_atomic(res.coverage, smk.output.coverage, index=False)
    io.write_table_atomic(res.cluster_means, smk.output.cluster_means, index_label="cluster")
    io.write_table_atomic(res.gsea, smk.output.gsea, index=False)
    io.write_table_atomic(res.ssgsea, smk.output.ssgsea, index=False)

    scores = adata.obs[[f"{pw.PREFIX}{s}" for s in pw.scored_sets(adata)]].set_axis(pw.scored_sets(adata), axis=1)
    pp.plot_cluster_heatmap(res.cluster_means, smk.output.heatmap)
    trend_sets = res.summary.dropna(subset=["rho_pseudotime"])
    trend_sets = trend_sets.loc[trend_sets["rho_pseudotime"].abs().sort_values(ascending=False).index, "set"].head(8)
    pp.plot_pseudotime_trends(scores, adata.obs["pseudotime"].to_numpy(float), smk.output.trends,
                              sets=list(trend_sets) or list(scores.columns[:8]))
    ranking = res.ranking if res.ranking is not None else pd.Series(dtype=float)  # None: no CSC-like contrast
    pp.plot_gsea_top(ranking, pw.resolved_sets(res.coverage), res.gsea, smk.output.gsea_plot)

    params = p["pathways"]
    write_json_atomic({
        "params": params, "notes": res.notes, "scorer": params["scorer"],
        "n_sets": int(len(res.coverage)), "n_scored": int(len(pw.scored_sets(adata))),
        "n_significant": int(res.summary["significant"].sum()), "n_csc_like": int(adata.obs["csc_like"].sum()),
        "n_unreachable": int((~np.isfinite(adata.obs["pseudotime"].to_numpy(float))).sum()),
        "methods": (f"Gene sets were scored per cell with {params['scorer']} (seed {p['seed']}); sets with fewer than "
                    f"{params['min_genes_found']} genes found were flagged and not called. CSC-like vs other cells: "
                    "AUROC / Cliff's delta with Mann-Whitney p (BH); Spearman with stemness and pseudotime (BH); "
                    "scores were also adjusted for log genes detected. GSEA prerank (gseapy, Wilcoxon z ranking, "
                    f"{params['gsea_permutations']} permutations) and ssGSEA of per-cluster pseudobulk, offline."),
    }, smk.output.info)
    adata.uns["metastem"]["params_json"] = json.dumps(p)  # every section: this rule is given them all
    # final.h5ad contract: layers['counts'] where the input had counts
    io.write_h5ad_atomic(adata, smk.output.h5ad, counts_from=smk.input.qc_h5ad if row["values"] == "counts" else None)


run(snakemake, main)  # noqa: F821
