"""Pseudotime figures: embedding coloured by pseudotime with the root, PAGA graph, stemness along pseudotime.

Colours follow the shared style (metastem.plots): viridis for continuous values (perceptually uniform,
readable with colour-vision deficiencies), Okabe-Ito for lines; unreachable cells are drawn in grey
and said to be unreachable, never coloured as if they were late.
"""
from __future__ import annotations

import os

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
from scipy.stats import spearmanr

from metastem._keys import Obs, Obsm, Uns
from metastem.plots import CONTINUOUS_CMAP, OKABE_ITO, apply_style, finish

UNREACHABLE_GREY = "#BBBBBB"


def _axes(ax: plt.Axes | None, figsize: tuple[float, float]) -> tuple[plt.Figure, plt.Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def _embedding_panel(ax: plt.Axes, xy: np.ndarray, pt: np.ndarray, root: int, title: str, idx: np.ndarray):
    size = max(0.5, min(12.0, 30000 / len(idx)))
    reach = idx[np.isfinite(pt[idx])]
    lost = idx[~np.isfinite(pt[idx])]
    if lost.size:
        ax.scatter(xy[lost, 0], xy[lost, 1], s=size, c=UNREACHABLE_GREY, linewidths=0, rasterized=True,
                   label=f"unreachable ({lost.size} shown)")
    reach = reach[np.argsort(pt[reach])]
    sc = ax.scatter(xy[reach, 0], xy[reach, 1], s=size, c=pt[reach], cmap=CONTINUOUS_CMAP, vmin=0, vmax=1,
                    linewidths=0, rasterized=True)
    ax.scatter(xy[root, 0], xy[root, 1], marker="*", s=220, c=OKABE_ITO[5], edgecolors="black", linewidths=0.8,
               zorder=5, label="root cell")
    ax.legend(loc="lower left", fontsize=7, markerscale=1)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return sc


def plot_pseudotime_embedding(adata: ad.AnnData, *, basis: tuple[str, ...] = (Obsm.UMAP, Obsm.UMAP_PAGA),
                              key: str = Obs.PSEUDOTIME, root: int | None = None, max_points: int = 50000,
                              random_state: int = 0, ax: plt.Axes | None = None, return_fig: bool = False,
                              save: str | os.PathLike | None = None) -> plt.Figure | None:
    """One panel per available embedding in ``basis``, coloured by ``obs[key]``, the root cell as a star
    (``root`` defaults to ``uns['iroot']``); unreachable cells grey. With ``ax``, only the first basis."""
    apply_style()
    bases = tuple(b for b in basis if b in adata.obsm)
    if not bases:
        raise ValueError(f"none of the embeddings {basis} is in obsm")
    root = int(adata.uns[Uns.IROOT]) if root is None else int(root)
    titles = {Obsm.UMAP: "Pseudotime on UMAP", Obsm.UMAP_PAGA: "Pseudotime on PAGA-initialised UMAP"}
    if ax is not None:
        fig, axes = ax.figure, [ax]
        bases = bases[:1]
    else:
        fig, grid = plt.subplots(1, len(bases), figsize=(4.8 * len(bases), 4.2), squeeze=False)
        axes = list(grid[0])
    pt = adata.obs[key].to_numpy(dtype=float)
    idx = np.union1d(_subsample(adata.n_obs, max_points, random_state), [root])
    for panel, b in zip(axes, bases):
        sc = _embedding_panel(panel, np.asarray(adata.obsm[b])[:, :2], pt, root, titles.get(b, b), idx)
    fig.colorbar(sc, ax=axes, shrink=0.7, label="pseudotime (0 = root)")
    return finish(fig, save, return_fig)


def plot_paga_graph(adata: ad.AnnData, *, root_cluster: str | None = None, stemness_key: str = Obs.STEMNESS,
                    key: str = Obs.PSEUDOTIME, ax: plt.Axes | None = None, return_fig: bool = False,
                    save: str | os.PathLike | None = None) -> plt.Figure | None:
    """PAGA graph from ``uns['paga']``: node size ~ cells, colour = median pseudotime (grey: unreachable),
    width = connectivity. ``root_cluster`` defaults to the root's cluster (``uns['pseudotime_root']``).

    Edges below ``PAGA_EDGE_THRESHOLD`` are omitted; edges of PAGA's spanning tree are solid, others
    dashed. Where no edge joins two clusters (disjoint kNN components) none is drawn, and the title
    says so: an island is not a branch.
    """
    from metastem.pseudotime import paga_summary

    apply_style()
    summary = paga_summary(adata, stemness_key=stemness_key, pseudotime_key=key)
    if root_cluster is None and Uns.PSEUDOTIME_ROOT in adata.uns:
        root_cluster = str(adata.uns[Uns.PSEUDOTIME_ROOT]["cluster"])
    nodes = {n["cluster"]: n for n in summary["nodes"]}
    fig, ax = _axes(ax, (5.2, 4.4))
    for e in summary["edges"]:
        if e["connectivity"] < summary["edge_threshold"]:
            continue
        a, b = nodes[e["source"]], nodes[e["target"]]
        ax.plot([a["x"], b["x"]], [a["y"], b["y"]], color="black", alpha=0.6, zorder=1,
                lw=0.5 + 5 * e["connectivity"], ls="-" if e["in_tree"] else "--")
    xs = np.array([n["x"] for n in nodes.values()])
    ys = np.array([n["y"] for n in nodes.values()])
    sizes = np.array([n["n_cells"] for n in nodes.values()], dtype=float)
    colour = np.array([np.nan if n["median_pseudotime"] is None else n["median_pseudotime"] for n in nodes.values()])
    cmap = plt.get_cmap(CONTINUOUS_CMAP).with_extremes(bad=UNREACHABLE_GREY)
    pts = ax.scatter(xs, ys, s=80 + 900 * np.sqrt(sizes / sizes.max()), c=colour, cmap=cmap, vmin=0, vmax=1,
                     edgecolors="black", linewidths=0.6, zorder=2, plotnonfinite=True)
    for name, x, y in zip(nodes, xs, ys):
        weight = "bold" if name == root_cluster else "normal"
        ax.annotate(name, (x, y), ha="center", va="center", fontsize=8, weight=weight, zorder=3,
                    color="white" if name == root_cluster else "black",
                    bbox={"boxstyle": "circle,pad=0.2", "fc": "black"} if name == root_cluster else None)
    fig.colorbar(pts, ax=ax, shrink=0.7, label="median pseudotime (grey: unreachable)")
    title = (f"PAGA between {summary['groupby']} clusters (edges ≥ {summary['edge_threshold']:g};"
             " solid = spanning tree)")
    if summary["n_components"] > 1:
        title += (f"\n{summary['n_components']} kNN components, no edge between them"
                  if summary["edges"] else "\nno kNN edge between any two clusters: no PAGA edges")
    if root_cluster:
        title += f"\nroot cluster {root_cluster} highlighted"
    ax.set_title(title, fontsize=9)
    ax.margins(0.18)  # node discs are drawn in points: keep the outermost ones inside the axes
    ax.set_xticks([])
    ax.set_yticks([])
    return finish(fig, save, return_fig)


def binned_trend(x: np.ndarray, y: np.ndarray, n_bins: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median and interquartile range of ``y`` in equal-count bins of ``x`` (finite pairs only)."""
    ok = np.isfinite(x) & np.isfinite(y)
    order = np.argsort(x[ok])
    xs, ys = x[ok][order], y[ok][order]
    bins = [b for b in np.array_split(np.arange(xs.size), min(n_bins, xs.size)) if b.size]
    centre = np.array([np.median(xs[b]) for b in bins])
    q = np.array([np.percentile(ys[b], [25, 50, 75]) for b in bins])
    return centre, q[:, 1], q[:, [0, 2]]


def stemness_trend_missing(adata: ad.AnnData, *, stemness_key: str = Obs.STEMNESS, key: str = Obs.PSEUDOTIME
                           ) -> str | None:
    """The sentence for the report when :func:`plot_stemness_along_pseudotime` has nothing to draw (no cell
    with both a stemness score and a pseudotime, e.g. stemness not computed and the root set in the
    config), else None."""
    s = adata.obs[stemness_key].to_numpy(dtype=float) if stemness_key in adata.obs else np.full(adata.n_obs, np.nan)
    if (np.isfinite(s) & np.isfinite(adata.obs[key].to_numpy(dtype=float))).sum() >= 2:
        return None
    return (f"No cell has both a {stemness_key} score and a pseudotime (the stemness stage computed no score), "
            "so stemness along pseudotime cannot be drawn.")


def plot_stemness_along_pseudotime(adata: ad.AnnData, *, stemness_key: str = Obs.STEMNESS,
                                   key: str = Obs.PSEUDOTIME, max_points: int = 50000, random_state: int = 0,
                                   ax: plt.Axes | None = None, return_fig: bool = False,
                                   save: str | os.PathLike | None = None) -> plt.Figure | None:
    """Stemness against pseudotime (reachable cells): scatter plus binned median and IQR.

    A falling trend means time runs from stem-like to differentiated, as the root rule intends.
    """
    apply_style()
    pt = adata.obs[key].to_numpy(dtype=float)
    s = adata.obs[stemness_key].to_numpy(dtype=float)
    ok = np.isfinite(pt) & np.isfinite(s)
    idx = np.flatnonzero(ok)[_subsample(int(ok.sum()), max_points, random_state)]
    fig, ax = _axes(ax, (5.0, 3.6))
    ax.scatter(pt[idx], s[idx], s=max(0.5, min(8.0, 20000 / max(len(idx), 1))), c=OKABE_ITO[1], alpha=0.5,
               linewidths=0, rasterized=True, label="cells")
    centre, med, iqr = binned_trend(pt, s)
    ax.fill_between(centre, iqr[:, 0], iqr[:, 1], color=OKABE_ITO[0], alpha=0.3, label="IQR per bin")
    ax.plot(centre, med, color=OKABE_ITO[5], lw=2, label="median per bin")
    rho = spearmanr(pt[ok], s[ok])[0] if ok.sum() > 2 else float("nan")
    n_lost = int((~np.isfinite(pt)).sum())
    ax.set_title(f"{stemness_key} along pseudotime (Spearman {rho:.2f}; {n_lost} unreachable cells not shown)")
    ax.set_xlabel("pseudotime (0 = root)")
    ax.set_ylabel(stemness_key)
    ax.legend(fontsize=7, loc="best")
    return finish(fig, save, return_fig)


def malignant_pseudotime_missing(adata: ad.AnnData, *, key: str = Obs.PSEUDOTIME_MALIGNANT) -> str | None:
    """The sentence for the report when :func:`plot_malignant_pseudotime` has nothing to draw, else None."""
    if key not in adata.obs or not np.isfinite(adata.obs[key].to_numpy(dtype=float)).any():
        return ("No sample's malignant cells were ordered (no CSC-like cells to root them in, too few malignant "
                "cells, or pseudotime.compartment is 'all'): nothing to draw.")
    return None


def plot_malignant_pseudotime(adata: ad.AnnData, *, key: str = Obs.PSEUDOTIME_MALIGNANT,
                              stemness_key: str = Obs.STEMNESS, basis: str = Obsm.UMAP, max_points: int = 50000,
                              random_state: int = 0, return_fig: bool = False,
                              save: str | os.PathLike | None = None) -> plt.Figure | None:
    """Pseudotime within each tumour's malignant cells (``metastem.pseudotime.malignant_pseudotime``).

    Left: the embedding, malignant cells coloured by their own sample's pseudotime (0 = that sample's
    root, a star), other cells light grey. Right: median ``stemness_key`` in equal-count bins along
    each sample's pseudotime, one line per sample: falling lines mean each tumour's time runs from its
    CSC-like cells to its more differentiated cells. Times are comparable within a sample only.
    """
    import json

    from metastem.plots import category_colors

    apply_style()
    run = adata.uns[key]
    records = [r for r in json.loads(run["per_sample_json"]) if r["n_ordered"] > 0]
    groupby = dict(run["params"])["groupby"]
    groups = adata.obs[groupby].astype(str).to_numpy() if groupby in adata.obs else np.full(adata.n_obs, "all")
    pt = adata.obs[key].to_numpy(dtype=float)
    has_basis = basis in adata.obsm
    fig, axes = plt.subplots(1, 2 if has_basis else 1, figsize=(10.5 if has_basis else 5.2, 4.2), squeeze=False)
    axes = list(axes[0])
    if has_basis:
        ax = axes.pop(0)
        xy = np.asarray(adata.obsm[basis])[:, :2]
        idx = _subsample(adata.n_obs, max_points, random_state)
        size = max(0.5, min(12.0, 30000 / len(idx)))
        lost = idx[~np.isfinite(pt[idx])]
        ax.scatter(xy[lost, 0], xy[lost, 1], s=size, c=UNREACHABLE_GREY, linewidths=0, rasterized=True,
                   label="normal or not ordered")
        shown = idx[np.isfinite(pt[idx])]
        shown = shown[np.argsort(pt[shown])]
        points = ax.scatter(xy[shown, 0], xy[shown, 1], s=size, c=pt[shown], cmap=CONTINUOUS_CMAP, vmin=0, vmax=1,
                            linewidths=0, rasterized=True)
        roots = adata.obs_names.get_indexer([r["root_barcode"] for r in records])
        ax.scatter(xy[roots, 0], xy[roots, 1], marker="*", s=200, c=OKABE_ITO[5], edgecolors="black",
                   linewidths=0.8, zorder=5, label="each sample's root")
        ax.legend(loc="lower left", fontsize=7, markerscale=1)
        ax.set_title("Pseudotime within each sample's malignant cells")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(points, ax=ax, shrink=0.7, label="pseudotime within sample (0 = its root)")
    ax = axes[0]
    colours = category_colors(len(records))
    stem = adata.obs[stemness_key].to_numpy(dtype=float) if stemness_key in adata.obs else np.full(adata.n_obs, np.nan)
    for colour, r in zip(colours, records):
        here = (groups == r["sample"]) & np.isfinite(pt) & np.isfinite(stem)
        if here.sum() < 2:
            continue
        centre, med, _ = binned_trend(pt[here], stem[here], n_bins=10)
        rho = spearmanr(pt[here], stem[here])[0]
        ax.plot(centre, med, color=colour, lw=1.8, marker="o", ms=3, label=f"{r['sample']} (ρ {rho:.2f})")
    ax.set_xlabel("pseudotime within sample (0 = its root)")
    ax.set_ylabel(f"median {stemness_key} per bin")
    ax.set_title(f"{stemness_key} along each sample's malignant pseudotime", fontsize=9)
    ax.legend(fontsize=7, loc="best", title="sample (Spearman)", title_fontsize=7)
    return finish(fig, save, return_fig)
