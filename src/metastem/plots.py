"""Shared figure style and the QC and clustering figures.

One style for every figure of the report: colour-blind-safe palettes (Okabe-Ito for categories,
viridis for continuous values), readable font sizes, PNG at a resolution that keeps reports small.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000", "#999999"]
CONTINUOUS_CMAP = "viridis"
DPI = 110


def apply_style() -> None:
    plt.rcParams.update({
        "figure.dpi": DPI, "savefig.dpi": DPI, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
        "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
        "axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO),
    })


def category_colors(n: int) -> list[str]:
    """Okabe-Ito for up to 8 categories; beyond that, tab20 (still distinct, less colour-blind-safe)."""
    if n <= 8:
        return OKABE_ITO[:n]
    cmap = plt.get_cmap("tab20")
    return [matplotlib.colors.to_hex(cmap(i % 20)) for i in range(n)]


def save(fig: plt.Figure, path: str | os.PathLike) -> None:
    """Save atomically (temporary name, then rename) and close."""
    finish(fig, path)


def finish(fig: plt.Figure, save: str | os.PathLike | None = None, return_fig: bool = False, *,
           dpi: float | None = None) -> plt.Figure | None:
    """End a figure the way every ``ms.pl`` function does: saved only when ``save`` names a file (atomically),
    returned when ``return_fig``, otherwise closed once saved (a notebook shows it before that)."""
    if save is not None:
        path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
        fig.savefig(tmp, bbox_inches="tight", **({"dpi": dpi} if dpi else {}))
        os.replace(tmp, path)
    if return_fig:
        return fig
    if save is not None:
        plt.close(fig)
    return None


def scatter_embedding(ax: plt.Axes, xy: np.ndarray, values: pd.Series, title: str, *, max_points: int = 50000,
                      seed: int = 0) -> None:
    """Embedding scatter coloured by a categorical or continuous obs column (subsampled for big data)."""
    idx = np.arange(len(xy))
    if len(idx) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_points, replace=False))
    size = max(0.5, min(12.0, 30000 / len(idx)))
    v = values.iloc[idx]
    if isinstance(v.dtype, pd.CategoricalDtype) or v.dtype == object or v.dtype == bool:
        cats = pd.Categorical(v.astype(str))
        colors = category_colors(len(cats.categories))
        for code, cat in enumerate(cats.categories):
            m = cats.codes == code
            ax.scatter(xy[idx[m], 0], xy[idx[m], 1], s=size, c=colors[code], label=str(cat), linewidths=0, rasterized=True)
        if len(cats.categories) <= 30:
            ax.legend(markerscale=max(1, 6 / size), fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5),
                      ncol=1 if len(cats.categories) <= 15 else 2)
    else:
        vals = v.to_numpy(dtype=float)
        order = np.argsort(np.nan_to_num(vals, nan=-np.inf))
        sc = ax.scatter(xy[idx[order], 0], xy[idx[order], 1], s=size, c=vals[order], cmap=CONTINUOUS_CMAP,
                        linewidths=0, rasterized=True, plotnonfinite=True)
        plt.colorbar(sc, ax=ax, shrink=0.7)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")


def plot_qc_metrics(cells: pd.DataFrame, thresholds: dict, save: str | os.PathLike | None = None, *,
                    return_fig: bool = False) -> plt.Figure | None:
    """Histograms of each QC metric with the thresholds actually applied drawn in.

    ``cells`` is the per-cell table :func:`metastem.pp.qc` returns; ``thresholds`` its summary's thresholds.
    """
    apply_style()
    metrics = [("total_counts", "Total counts per cell", True), ("n_genes_by_counts", "Genes detected per cell", True),
               ("pct_counts_mt", "% mitochondrial counts", False), ("doublet_score", "Scrublet doublet score", False)]
    metrics = [m for m in metrics if m[0] in cells and cells[m[0]].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8))
    for ax, (col, label, logx) in zip(np.atleast_1d(axes), metrics):
        x = cells[col].to_numpy(dtype=float)
        if logx:
            x = np.log10(np.clip(x, 1, None))
        ax.hist(x[cells["kept"]], bins=60, color=OKABE_ITO[4], alpha=0.8, label="kept")
        ax.hist(x[~cells["kept"]], bins=60, color=OKABE_ITO[5], alpha=0.7, label="removed")
        for side in ("low", "high"):
            t = thresholds.get(col, {}).get(side)
            if t is not None:
                ax.axvline(np.log10(max(t, 1)) if logx else t, color="black", ls="--", lw=1)
        ax.set_xlabel(f"log10 {label.lower()}" if logx else label)
        ax.set_ylabel("cells")
    np.atleast_1d(axes)[0].legend()
    fig.suptitle("QC metrics (dashed: thresholds applied)")
    return finish(fig, save, return_fig)


def plot_clusters(xy: np.ndarray, leiden: pd.Series, save: str | os.PathLike | None = None,
                  labels: pd.Series | None = None, *, return_fig: bool = False) -> plt.Figure | None:
    """UMAP coloured by Leiden cluster, and by known labels when the sheet names a labels column."""
    apply_style()
    n = 2 if labels is not None else 1
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2))
    axes = np.atleast_1d(axes)
    scatter_embedding(axes[0], xy, leiden, "Leiden clusters")
    if labels is not None:
        scatter_embedding(axes[1], xy, labels.astype("category"), f"Known labels ({labels.name})")
    return finish(fig, save, return_fig)


def plot_qc_metrics_by_sample(cells: pd.DataFrame, per_sample: dict, save: str | os.PathLike | None = None, *,
                              return_fig: bool = False) -> plt.Figure | None:
    """QC histograms with one row of panels per sample, each with that sample's own thresholds (MAD
    thresholds are computed per sample, so one set of lines over pooled cells would mislead)."""
    apply_style()
    metrics = [("total_counts", "Total counts per cell", True), ("n_genes_by_counts", "Genes detected per cell", True),
               ("pct_counts_mt", "% mitochondrial counts", False), ("doublet_score", "Scrublet doublet score", False)]
    metrics = [m for m in metrics if m[0] in cells and cells[m[0]].notna().any()]
    names = list(per_sample)
    fig, axes = plt.subplots(len(names), len(metrics), figsize=(3.0 * len(metrics), 1.9 * len(names) + 0.6),
                             squeeze=False, sharex="col")
    for r, name in enumerate(names):
        sub = cells[cells["sample"].astype(str) == str(name)]
        part = per_sample[name]
        thresholds = dict(part.get("thresholds") or {})
        if part.get("doublet_threshold") is not None:
            thresholds["doublet_score"] = {"low": None, "high": part["doublet_threshold"]}
        for c, (col, label, logx) in enumerate(metrics):
            ax = axes[r, c]
            x = sub[col].to_numpy(dtype=float)
            if logx:
                x = np.log10(np.clip(x, 1, None))
            kept = sub["kept"].to_numpy(dtype=bool)
            finite = np.isfinite(x)
            ax.hist(x[kept & finite], bins=40, color=OKABE_ITO[4], alpha=0.8, label="kept")
            ax.hist(x[~kept & finite], bins=40, color=OKABE_ITO[5], alpha=0.7, label="removed")
            for side in ("low", "high"):
                t = thresholds.get(col, {}).get(side)
                if t is not None:
                    ax.axvline(np.log10(max(t, 1)) if logx else t, color="black", ls="--", lw=1)
            if r == len(names) - 1:
                ax.set_xlabel(f"log10 {label.lower()}" if logx else label)
            if c == 0:
                ax.set_ylabel(f"{name}\ncells")
    axes[0, 0].legend()
    fig.suptitle("QC metrics per sample (dashed: that sample's thresholds)")
    return finish(fig, save, return_fig)
