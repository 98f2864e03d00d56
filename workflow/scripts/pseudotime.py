"""Snakemake wrapper: DPT rooted in stemness over all cells and within each tumour's malignant cells, PAGA,
diagnostics tables, figures and the per-cell table."""
from pathlib import Path

from metastem.smk import run

STEMNESS_KEY = "stemness"
OBS_WRITTEN = ["pseudotime", "pseudotime_reachable", "pseudotime_malignant"]


def empty_figure(path, sentence: str, figure_notes: dict) -> None:
    """Nothing to draw: an empty file satisfies Snakemake, the sentence goes to the report."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"")
    figure_notes[Path(path).stem] = sentence


def all_cells(smk, adata, info: dict, figure_notes: dict) -> None:
    """Pseudotime over all cells: PAGA, diagnostics, figures; or, when it was skipped, the same files empty."""
    import pandas as pd

    from metastem import io
    from metastem import plots_pseudotime as plots
    from metastem import pseudotime as pt
    from metastem._timing import timed
    from metastem.smk import write_json_atomic

    p = smk.params.params
    if "skipped" in info:
        for path in (smk.output.umap, smk.output.paga_figure, smk.output.trend):
            empty_figure(path, "Not drawn: no pseudotime over all cells was computed (see the notes).", figure_notes)
        io.write_table_atomic(pd.DataFrame(columns=["metric", "value", "note"]), smk.output.diagnostics, index=False)
        write_json_atomic({"skipped": info["skipped"], "nodes": [], "edges": []}, smk.output.paga)
        info["methods"] = info["skipped"]
        return
    umap_max_cells = p["pseudotime"]["paga_umap_max_cells"]
    truth = "true_pseudotime" if "true_pseudotime" in adata.obs.columns else None
    diagnostics = timed("pseudotime diagnostics", pt.pseudotime_diagnostics, adata, stemness_key=STEMNESS_KEY,
                        truth_key=truth)
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
    nothing = plots.stemness_trend_missing(adata, stemness_key=STEMNESS_KEY)
    if nothing:  # a root set in the config, but no stemness to draw along it
        empty_figure(smk.output.trend, nothing, figure_notes)
    else:
        plots.plot_stemness_along_pseudotime(adata, stemness_key=STEMNESS_KEY, random_state=p["seed"],
                                             save=smk.output.trend)
    io.write_table_atomic(diagnostics, smk.output.diagnostics, index=False)
    write_json_atomic(paga, smk.output.paga)
    left_out = ""
    if info["n_components_left_out"]:
        left_out = (f" {info['n_unreachable']} cells in {info['n_components_left_out']} kNN component(s) not "
                    "connected to the root were left out (pseudotime NaN; listed with their clusters in the "
                    "diagnostics).")
    info["methods"] = (f"Diffusion pseudotime (scanpy diffmap + dpt, {info['n_dcs']} diffusion components) on the "
                       "clustering's kNN graph; " + info["root"]["why"] + " Pseudotime was rescaled to 0-1 over cells "
                       "reachable from the root; unreachable cells are NaN." + left_out + " PAGA (scanpy, model "
                       "v1.2) between Leiden clusters summarises the topology.")


def within_malignant(smk, adata, info: dict, figure_notes: dict) -> None:
    """Pseudotime within each sample's malignant cells: the per-sample table, info['per_sample'], the figure."""
    import pandas as pd

    from metastem import io
    from metastem import plots_pseudotime as plots
    from metastem import pseudotime as pt

    p = smk.params.params
    if "pseudotime_malignant" not in adata.uns:  # compartment 'all'
        adata.obs["pseudotime_malignant"] = float("nan")
        io.write_table_atomic(pd.DataFrame(columns=pt.BY_SAMPLE_COLUMNS), smk.output.by_sample, index=False)
        empty_figure(smk.output.malignant_figure, plots.malignant_pseudotime_missing(adata), figure_notes)
        info["per_sample"] = []
        return
    truth = "true_pseudotime" if "true_pseudotime" in adata.obs.columns else None
    table = pt.malignant_pseudotime_table(adata, stemness_key=STEMNESS_KEY, truth_key=truth)
    io.write_table_atomic(table, smk.output.by_sample, index=False)
    malignant = pt.malignant_pseudotime_info(adata, table)
    info["per_sample"] = malignant.pop("per_sample")
    info["malignant"] = malignant
    info["notes"] = info["notes"] + malignant["notes"]
    nothing = plots.malignant_pseudotime_missing(adata)
    if nothing:
        empty_figure(smk.output.malignant_figure, nothing, figure_notes)
    else:
        plots.plot_malignant_pseudotime(adata, stemness_key=STEMNESS_KEY, random_state=p["seed"],
                                        save=smk.output.malignant_figure)
    graph = ("its own kNN graph in the clustering's representation" if malignant["params"]["graph"] == "rebuilt"
             else "the clustering's kNN graph restricted to them")
    info["methods"] = (info.get("methods", "") + f" Within each tumour, the malignant cells of each sample were "
                       f"ordered on {graph} (diffusion map + DPT), rooted among that sample's CSC-like cells by the "
                       "same rule (likely doublets and outliers left out, kNN-averaged stemness, the tip of the stem "
                       f"region); {malignant['n_samples_ordered']} of {malignant['n_samples']} samples were ordered, "
                       "each rescaled to 0-1 (comparable within a sample only).").strip()


def main(smk) -> None:
    from metastem._timing import timed  # one log line per step: time and peak RSS
    from metastem import io
    from metastem import pseudotime as pt
    from metastem.smk import write_json_atomic

    row, p = smk.params.row, smk.params.params
    params = dict(p["pseudotime"])
    params.pop("paga_umap_max_cells")
    adata = io.read_h5ad_without_X(smk.input.h5ad)  # DPT and PAGA use the graph, never X
    io.add_stage_cells(adata, smk.input.stemness, [STEMNESS_KEY, "csc_like"])
    adata.obs[STEMNESS_KEY] = adata.obs[STEMNESS_KEY].astype(float)
    adata.obs["csc_like"] = adata.obs["csc_like"].astype(bool)
    malignant = getattr(smk.input, "malignant", None)  # rules.malignant.output.cells, when the stage is wired
    if malignant:
        io.add_stage_cells(adata, malignant if isinstance(malignant, str) else malignant[0], ["malignant"])
        adata.obs["malignant"] = adata.obs["malignant"].astype(bool)
    timed("diffusion maps, DPT", pt.pseudotime, adata, **params, stemness_key=STEMNESS_KEY,
          labels_key=row["labels"] or None, random_state=p["seed"])
    info = pt.pseudotime_info(adata)
    figure_notes = {}
    all_cells(smk, adata, info, figure_notes)
    within_malignant(smk, adata, info, figure_notes)
    io.write_table_atomic(adata.obs[OBS_WRITTEN], smk.output.cells, index_label="cell")
    io.write_h5ad_atomic(pt.annotations(adata), smk.output.annotations)
    info["params"] = p["pseudotime"]
    info["figure_notes"] = figure_notes
    write_json_atomic(info, smk.output.info)


run(snakemake, main)  # noqa: F821
