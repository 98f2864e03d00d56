"""Snakemake wrapper: the final rule. Pathway scores against matched null sets, per-sample effects, GSEA,
tables, figures and final.h5ad (readable by cellxgene and scanpy's plots as written)."""
from metastem.smk import run


def main(smk) -> None:
    from metastem._timing import timed  # one log line per step: time and peak RSS
    import json
    from pathlib import Path

    import anndata as ad
    import numpy as np

    from metastem import io
    from metastem import pathways as pw
    from metastem import plots_pathways as pp
    from metastem.smk import write_json_atomic

    row, p = smk.params.row, smk.params.params
    params = p["pathways"]
    adata = timed("read clustered.h5ad", ad.read_h5ad, smk.input.h5ad)
    io.add_stage_cells(adata, smk.input.stemness)
    io.add_stage_cells(adata, smk.input.pseudotime)
    malignant = getattr(smk.input, "malignant", None)
    if malignant:
        io.add_stage_cells(adata, malignant)
        adata.obs["malignant"] = adata.obs["malignant"].astype(bool)
    adata.obs["csc_like"] = adata.obs["csc_like"].astype(bool)
    exclude = pw.stemness_genes(smk.input.stemness_info, smk.input.stemness_gene_sets)
    res = timed("pathway scores and statistics", pw.run_pathways, adata, params, species=row["species"], seed=p["seed"], aliases_path=smk.input.aliases,
                          threads=smk.threads, exclude_genes=exclude)

    io.write_table_atomic(res.summary, smk.output.summary, index=False)
    io.write_table_atomic(res.details, smk.output.details, index=False)
    io.write_table_atomic(res.per_sample, smk.output.per_sample, index=False)
    io.write_table_atomic(res.coverage, smk.output.coverage, index=False)
    io.write_table_atomic(res.cluster_means, smk.output.cluster_means, index_label="cluster")
    io.write_table_atomic(res.gsea, smk.output.gsea, index=False)
    io.write_table_atomic(res.ssgsea, smk.output.ssgsea, index=False)

    names = pw.scored_sets(adata)
    scores = adata.obs[[f"{pw.PREFIX}{s}" for s in names]].set_axis(names, axis=1)
    ptime = adata.obs["pseudotime"].to_numpy(float)
    figure_notes = {}  # a figure with nothing to draw: an empty file, its sentence for the report

    def nothing_to_draw(path, sentence):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"")
        figure_notes[Path(path).stem] = sentence

    if res.skipped:  # no CSC-like cells (stemness not computed): no effects, no ranking
        nothing_to_draw(smk.output.effects, "Not drawn: there is no CSC-like contrast (no cell is CSC-like).")
    else:
        pp.plot_pathway_effects(res.details, res.per_sample, save=smk.output.effects)
    pp.plot_cluster_heatmap(res.cluster_means, smk.output.heatmap)
    if not np.isfinite(ptime).any():
        nothing_to_draw(smk.output.trends, "Not drawn: no cell has a pseudotime (see Pseudotime).")
    else:
        trend = res.details.dropna(subset=["rho_pseudotime"])
        trend = trend.loc[trend["rho_pseudotime"].abs().sort_values(ascending=False).index, "set"].head(8)
        pp.plot_pseudotime_trends(scores, ptime, smk.output.trends, sets=list(trend) or list(scores.columns[:8]))
    if res.ranking is None:  # GSEA prerank not run: its note says why
        nothing_to_draw(smk.output.gsea_plot, "Not drawn: GSEA prerank of CSC-like vs other malignant cells was "
                                              "not run (see the notes above).")
    else:
        gsea_sets = {k: v for k, v in pw.resolved_sets(res.coverage).items() if k in set(res.gsea["set"])}
        pp.plot_gsea_top(res.ranking, gsea_sets, res.gsea, smk.output.gsea_plot,
                         group_label="CSC-like vs other malignant cells")

    notes = res.notes + pw.prepare_final(adata, annotations=getattr(smk.input, "annotations", None))
    details = res.details
    pathways = details[details["role"] == pw.ROLE_PATHWAY]
    skipped = {}
    if res.skipped:  # why no cell is CSC-like, when the stemness stage says so (stemness.required: false)
        cause = ("stemness was not computed (stemness.required is false), so " if
                 json.loads(Path(smk.input.stemness_info).read_text()).get("status") == "not_computed" else "")
        skipped = {"skipped": f"The CSC-like pathway contrast was not computed: {cause}{res.skipped}.",
                   "skipped_what": "the CSC-like pathway contrast"}
    write_json_atomic({
        **skipped, "figure_notes": figure_notes,
        "params": params, "notes": notes, "scorer": params["scorer"],
        "n_sets": int(len(res.coverage)), "n_scored": int(len(names)),
        "n_tested": int((pathways["flag"] == pw.FLAG_OK).sum()), "n_called": int(pathways["called"].sum()),
        "n_replicated": int((pathways["replicated"] == "yes").sum()),
        "n_samples": res.n_samples, "unit_of_replication": res.unit,
        "positive_controls": details.loc[details["role"] == pw.ROLE_CONTROL, "set"].tolist(),
        "n_stemness_genes_excluded": len(exclude),
        "n_csc_like": int(adata.obs["csc_like"].sum()),
        "n_malignant": int(adata.obs["malignant"].sum()) if "malignant" in adata.obs else None,
        "n_unreachable": int((~np.isfinite(adata.obs["pseudotime"].to_numpy(float))).sum()),
        "methods": pw.methods_text(params, p["seed"], res.n_samples, res.unit, len(exclude), skipped=res.skipped),
    }, smk.output.info)
    adata.uns["metastem"]["params_json"] = json.dumps(p)  # every section: this rule is given them all
    # final.h5ad contract: layers['counts'] where the input had counts
    io.write_h5ad_atomic(adata, smk.output.h5ad, counts_from=smk.input.qc_h5ad if row["values"] == "counts" else None)


run(snakemake, main)  # noqa: F821
