"""Snakemake wrapper: DPT rooted in stemness, PAGA, diagnostics table, figures and the per-cell table."""
from pathlib import Path

from metastem.smk import run

STEMNESS_KEY = "stemness"
OBS_WRITTEN = ["pseudotime", "pseudotime_reachable"]


def write_skipped(smk, adata, reason: str) -> None:
    """Every declared output, saying that nothing was computed: NaN / False columns, tables with their
    headers, each figure an empty file with its sentence in figure_notes (docs/CONTRACTS.md)."""
    import pandas as pd

    from metastem import io
    from metastem import pseudotime as pt
    from metastem.smk import write_json_atomic

    pt.skip_pseudotime(adata, reason)
    info = pt.pseudotime_info(adata)
    figure_notes = {}
    for path in (smk.output.umap, smk.output.paga_figure, smk.output.trend):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"")
        figure_notes[Path(path).stem] = ("Not drawn: no pseudotime was computed (no stemness score, and "
                                         "pseudotime.root is 'auto').")
    io.write_table_atomic(pd.DataFrame(columns=["metric", "value", "note"]), smk.output.diagnostics, index=False)
    io.write_table_atomic(adata.obs[OBS_WRITTEN], smk.output.cells, index_label="cell")
    io.write_h5ad_atomic(pt.annotations(adata), smk.output.annotations)
    write_json_atomic({"skipped": reason, "nodes": [], "edges": []}, smk.output.paga)
    write_json_atomic({**info, "figure_notes": figure_notes, "params": smk.params.params["pseudotime"],
                       "methods": reason}, smk.output.info)


def main(smk) -> None:
    from metastem._timing import timed  # one log line per step: time and peak RSS
    from metastem import io
    from metastem import plots_pseudotime as plots
    from metastem import pseudotime as pt
    from metastem.smk import write_json_atomic

    row, p = smk.params.row, smk.params.params
    params = dict(p["pseudotime"])
    umap_max_cells = params.pop("paga_umap_max_cells")
    adata = io.read_h5ad_without_X(smk.input.h5ad)  # DPT and PAGA use the graph, never X
    io.add_stage_cells(adata, smk.input.stemness, [STEMNESS_KEY])
    adata.obs[STEMNESS_KEY] = adata.obs[STEMNESS_KEY].astype(float)
    reason = pt.skip_reason(adata, root=params["root"], stemness_key=STEMNESS_KEY)
    if reason:  # no stemness (stemness.required: false) and no root set: honest empty outputs
        write_skipped(smk, adata, reason)
        return
    timed("diffusion map, DPT", pt.pseudotime, adata, **params, stemness_key=STEMNESS_KEY, labels_key=row["labels"] or None,
                  random_state=p["seed"])
    info = pt.pseudotime_info(adata)
    truth = "true_pseudotime" if "true_pseudotime" in adata.obs.columns else None
    diagnostics = timed("pseudotime diagnostics", pt.pseudotime_diagnostics, adata, stemness_key=STEMNESS_KEY, truth_key=truth)
    timed("PAGA", pt.paga, adata, paga_umap_max_cells=umap_max_cells, min_dist=p["cluster"]["umap_min_dist"],
            random_state=p["seed"])
    paga = pt.paga_summary(adata, stemness_key=STEMNESS_KEY)
    if adata.n_obs > umap_max_cells:
        info["notes"].append(f"PAGA-initialised UMAP skipped above pseudotime.paga_umap_max_cells="
                             f"{umap_max_cells} cells ({adata.n_obs} here): the clustering's UMAP "
                             "and the PAGA graph are shown instead")
    if paga["note"]:
        info["notes"].append(f"PAGA: {paga['note']}")

    plots.plot_pseudotime_embedding(adata, random_state=p["seed"], save=smk.output.umap)
    plots.plot_paga_graph(adata, stemness_key=STEMNESS_KEY, save=smk.output.paga_figure)
    figure_notes = {}
    nothing = plots.stemness_trend_missing(adata, stemness_key=STEMNESS_KEY)
    if nothing:  # a root set in the config, but no stemness to draw along it
        Path(smk.output.trend).write_bytes(b"")
        figure_notes[Path(smk.output.trend).stem] = nothing
    else:
        plots.plot_stemness_along_pseudotime(adata, stemness_key=STEMNESS_KEY, random_state=p["seed"],
                                             save=smk.output.trend)
    io.write_table_atomic(diagnostics, smk.output.diagnostics, index=False)
    io.write_table_atomic(adata.obs[OBS_WRITTEN], smk.output.cells, index_label="cell")
    io.write_h5ad_atomic(pt.annotations(adata), smk.output.annotations)
    info["params"] = p["pseudotime"]
    info["figure_notes"] = figure_notes
    left_out = ""
    if info["n_components_left_out"]:
        left_out = (f" {info['n_unreachable']} cells in {info['n_components_left_out']} kNN component(s) not "
                    "connected to the root were left out (pseudotime NaN; listed with their clusters in the "
                    "diagnostics).")
    info["methods"] = (f"Diffusion pseudotime (scanpy diffmap + dpt, {info['n_dcs']} diffusion components) on the "
                       "clustering's kNN graph; " + info["root"]["why"] + " Pseudotime was rescaled to 0-1 over cells "
                       "reachable from the root; unreachable cells are NaN." + left_out + " PAGA (scanpy, model "
                       "v1.2) between Leiden clusters summarises the topology.")
    write_json_atomic(paga, smk.output.paga)
    write_json_atomic(info, smk.output.info)


run(snakemake, main)  # noqa: F821
