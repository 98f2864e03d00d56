"""Stemness figures: UMAP, per-cluster distributions, score vs the gene-count baseline, per known label.

Library shape (issue 14): ``save=None`` (a path; nothing is written unless given), ``ax=None`` (draw
into an existing Axes), ``return_fig=False`` (return the Figure). When there is nothing to draw a
function returns a sentence saying why, and the caller puts it in the report instead of an empty
axis. Colours are colour-blind safe: viridis for continuous values, Okabe-Ito for categories.
"""
from __future__ import annotations

import os

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from metastem.plots import OKABE_ITO, finish  # noqa: E402

CONTINUOUS = "viridis"


def _axes(ax: plt.Axes | None, figsize: tuple[float, float]) -> tuple[plt.Figure, plt.Axes, bool]:
    """The Axes to draw into, and whether this function owns (and may close) its Figure."""
    if ax is not None:
        return ax.figure, ax, False
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax, True


def _finish(fig: plt.Figure, save: str | os.PathLike | None, return_fig: bool, own: bool) -> plt.Figure | None:
    """Write the figure when ``save`` is given (atomically, plots.finish); return it when ``return_fig``; else
    close a figure made here."""
    if save is not None and own:
        fig.tight_layout()
    out = finish(fig, save, return_fig, dpi=150)
    if out is None and own and save is None:
        plt.close(fig)
    return out


def _not_scored(adata: ad.AnnData) -> str | None:
    """The sentence for a run whose stemness could not be computed (stemness.required: false)."""
    s = adata.obs["stemness"].to_numpy(dtype=float) if "stemness" in adata.obs else np.array([np.nan])
    return None if np.isfinite(s).any() else "Stemness was not computed for this dataset, so there is nothing to draw."


def _point_size(n: int) -> float:
    """Smaller points for more cells, so dense regions stay readable."""
    return float(np.clip(3e4 / max(n, 1), 0.5, 30))


def plot_umap_stemness(adata: ad.AnnData, save: str | os.PathLike | None = None, *, ax: plt.Axes | None = None,
                       return_fig: bool = False) -> plt.Figure | str | None:
    """UMAP coloured by stemness, CSC-like cells outlined; the most stem-like cells are drawn last."""
    if _not_scored(adata):
        return _not_scored(adata)
    if "X_umap" not in adata.obsm:
        return "No UMAP embedding is available, so stemness is not shown on a UMAP."
    xy = adata.obsm["X_umap"]
    s = adata.obs["stemness"].to_numpy()
    order = np.argsort(s)
    fig, ax, own = _axes(ax, (6.2, 5.2))
    pts = ax.scatter(xy[order, 0], xy[order, 1], c=s[order], cmap=CONTINUOUS, vmin=0, vmax=1,
                     s=_point_size(len(s)), linewidths=0, rasterized=True)
    csc = adata.obs["csc_like"].to_numpy()[order]
    if csc.any():
        ax.scatter(xy[order][csc, 0], xy[order][csc, 1], facecolors="none", edgecolors="black",
                   s=_point_size(len(s)) * 2.5, linewidths=0.4, label=f"CSC-like ({int(csc.sum())} cells)")
        ax.legend(loc="best", frameon=False, fontsize=9)
    fig.colorbar(pts, ax=ax, label="stemness (1 = least differentiated)")
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    direction = adata.uns.get("stemness", {}).get("direction") if isinstance(adata.uns.get("stemness"), dict) else None
    ax.set_title("Stemness per cell" + (" (direction uncertain)" if direction == "uncertain" else ""))
    return _finish(fig, save, return_fig, own)


def _distributions(ax: plt.Axes, groups: pd.Series, values: pd.Series, order: list[str]) -> None:
    data = [values[groups == g].to_numpy() for g in order]
    parts = ax.violinplot(data, showextrema=False, widths=0.8)
    for body, colour in zip(parts["bodies"], (OKABE_ITO * (len(order) // len(OKABE_ITO) + 1))):
        body.set_facecolor(colour)
        body.set_alpha(0.6)
    ax.boxplot(data, widths=0.18, showfliers=False, medianprops={"color": "black"})
    ax.set_xticks(np.arange(1, len(order) + 1), order, rotation=45 if len(order) > 8 else 0, ha="right"
                  if len(order) > 8 else "center")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("stemness")


def plot_cluster_stemness(adata: ad.AnnData, save: str | os.PathLike | None = None, cluster_key: str = "leiden", *,
                          ax: plt.Axes | None = None, return_fig: bool = False) -> plt.Figure | str | None:
    """Violin + box of stemness per cluster, clusters ordered by median stemness (highest first)."""
    if _not_scored(adata):
        return _not_scored(adata)
    if cluster_key not in adata.obs or adata.obs[cluster_key].nunique() < 2:
        return f"There is a single cluster ('{cluster_key}'), so stemness is not compared across clusters."
    obs = adata.obs[[cluster_key, "stemness"]].astype({cluster_key: str})
    order = obs.groupby(cluster_key)["stemness"].median().sort_values(ascending=False).index.tolist()
    fig, ax, own = _axes(ax, (max(5.0, 0.5 * len(order) + 2), 4.2))
    _distributions(ax, obs[cluster_key], obs["stemness"], order)
    ax.set_xlabel(f"cluster ({cluster_key}), ordered by median stemness")
    ax.set_title("Stemness per cluster")
    return _finish(fig, save, return_fig, own)


def plot_stemness_vs_gene_counts(adata: ad.AnnData, save: str | os.PathLike | None = None, *,
                                 ax: plt.Axes | None = None, return_fig: bool = False) -> plt.Figure | str | None:
    """Stemness against the raw genes-detected baseline, to show what the score adds to it."""
    if _not_scored(adata):
        return _not_scored(adata)
    gc = adata.obs["stemness_gene_counts"].to_numpy(dtype=float)
    s = adata.obs["stemness"].to_numpy()
    if np.ptp(gc) == 0:
        return "Every cell detects the same number of genes, so there is no gene-count baseline to compare with."
    rho = spearmanr(s, gc)[0]
    fig, ax, own = _axes(ax, (5.2, 4.4))
    csc = adata.obs["csc_like"].to_numpy()
    ax.scatter(gc[~csc], s[~csc], s=_point_size(len(s)), color=OKABE_ITO[1], alpha=0.6, linewidths=0,
               label="other cells", rasterized=True)
    ax.scatter(gc[csc], s[csc], s=_point_size(len(s)), color=OKABE_ITO[5], alpha=0.8, linewidths=0,
               label="CSC-like", rasterized=True)
    ax.set_xlabel("genes detected per cell (baseline)")
    ax.set_ylabel("stemness")
    ax.set_title(f"Stemness vs genes detected (Spearman {rho:.2f})")
    ax.legend(frameon=False, fontsize=9, markerscale=3)
    return _finish(fig, save, return_fig, own)


def plot_stemness_by_label(adata: ad.AnnData, save: str | os.PathLike | None = None, label_key: str | None = None, *,
                           ax: plt.Axes | None = None, return_fig: bool = False) -> plt.Figure | str | None:
    """Stemness per known label (the sheet's labels column), ordered by median stemness."""
    if _not_scored(adata):
        return _not_scored(adata)
    if not label_key:
        return "The dataset has no labels column, so stemness is not shown per known label."
    if label_key not in adata.obs:
        return f"The labels column '{label_key}' is not in the data, so stemness is not shown per known label."
    labels = adata.obs[label_key].astype(str)
    if labels.nunique() < 2:
        return f"The labels column '{label_key}' holds a single value, so there is nothing to compare."
    obs = pd.DataFrame({"label": labels, "stemness": adata.obs["stemness"]})
    order = obs.groupby("label")["stemness"].median().sort_values(ascending=False).index.tolist()
    fig, ax, own = _axes(ax, (max(5.0, 0.55 * len(order) + 2), 4.4))
    _distributions(ax, obs["label"], obs["stemness"], order)
    ax.set_xlabel(f"{label_key}, ordered by median stemness")
    ax.set_title("Stemness per known label")
    return _finish(fig, save, return_fig, own)
