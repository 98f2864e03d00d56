"""Figures of the pathway stage: per-cluster heatmap, trends along pseudotime, GSEA running sums.

Shares the report's style (metastem.plots): a diverging ColorBrewer RdBu map for z-scores (readable
with the common colour-vision deficiencies), Okabe-Ito colours plus line styles for trends, so that
lines stay distinguishable in greyscale too.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from metastem.plots import OKABE_ITO, apply_style, finish, plt

LINESTYLES = ["-", "--", ":", "-."]
# Okabe-Ito without its yellow, which is too pale for thin lines on white.
LINE_COLORS = [c for c in OKABE_ITO if c != "#F0E442"]


def zscore_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Each column centred and scaled across rows (constant columns become 0), for a shared colour scale."""
    sd = df.std(axis=0, ddof=0).replace(0, np.nan)
    return ((df - df.mean(axis=0)) / sd).fillna(0.0)


def plot_cluster_heatmap(cluster_means: pd.DataFrame, save: str | os.PathLike | None = None, *,
                         title: str | None = None, ax: plt.Axes | None = None, return_fig: bool = False):
    """Clusters × pathways, each pathway z-scored across clusters (which cluster is high, per pathway)."""
    apply_style()
    z = zscore_columns(cluster_means).T
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.2 + 0.38 * z.shape[1], 1.0 + 0.3 * z.shape[0]))
    else:
        fig = ax.figure
    lim = max(1.0, float(np.nanmax(np.abs(z.to_numpy()))) if z.size else 1.0)
    im = ax.imshow(z.to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(z.shape[1]), z.columns.astype(str))
    ax.set_yticks(range(z.shape[0]), z.index)
    ax.set_xlabel("cluster")
    ax.set_title(title or "Pathway scores per cluster (z-score across clusters)")
    fig.colorbar(im, ax=ax, shrink=0.6, label="z-score of mean score")
    return finish(fig, save, return_fig)


def binned_mean_trend(x: np.ndarray, y: np.ndarray, n_bins: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``y`` in equal-count bins of ``x`` (finite values only), then a 3-bin running mean.

    Equal-count bins keep the noise even where cells are sparse along pseudotime. Means, not the medians of
    :func:`metastem.plots_pseudotime.binned_trend`: AUCell scores are zero in most cells, so a bin's median
    is zero along most of pseudotime.
    """
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 * n_bins:
        n_bins = max(2, x.size // 5)
    order = np.argsort(x, kind="stable")
    bins = np.array_split(order, n_bins)
    bx = np.array([x[b].mean() for b in bins if b.size])
    by = np.array([y[b].mean() for b in bins if b.size])
    smooth = pd.Series(by).rolling(3, center=True, min_periods=1).mean().to_numpy()
    return bx, smooth


def plot_pseudotime_trends(scores: pd.DataFrame, pseudotime: np.ndarray, save: str | os.PathLike | None = None, *,
                           sets: list[str] | None = None, n_bins: int = 25, ax: plt.Axes | None = None,
                           return_fig: bool = False):
    """Smoothed pathway scores (z-scored per set) along pseudotime; unreachable cells (NaN) left out."""
    apply_style()
    sets = list(sets if sets is not None else scores.columns)
    z = zscore_columns(scores[sets])
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
    else:
        fig = ax.figure
    for i, s in enumerate(sets):
        bx, by = binned_mean_trend(np.asarray(pseudotime, dtype=float), z[s].to_numpy(float), n_bins)
        ax.plot(bx, by, color=LINE_COLORS[i % len(LINE_COLORS)],
                linestyle=LINESTYLES[(i // len(LINE_COLORS)) % len(LINESTYLES)], lw=1.6, label=s)
    ax.axhline(0, color="#999999", lw=0.6)
    ax.set_xlabel("pseudotime (0 = root, stem-like)")
    ax.set_ylabel("pathway score (z-score, binned mean)")
    n_nan = int((~np.isfinite(np.asarray(pseudotime, dtype=float))).sum())
    ax.set_title("Pathway scores along pseudotime" + (f" ({n_nan} unreachable cells left out)" if n_nan else ""))
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    return finish(fig, save, return_fig)


def running_sum(ranking: pd.Series, genes: list[str], weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """GSEA running enrichment score along ``ranking`` (highest first) and the positions of the set's hits.

    The weighted Kolmogorov–Smirnov walk of Subramanian et al. 2005: steps up by |r|^weight at hits
    (normalised to 1 over hits), down by 1/(N − N_hits) at misses.
    """
    hits = ranking.index.isin(genes)
    if not hits.any() or hits.all():
        return np.zeros(len(ranking)), np.flatnonzero(hits)
    w = np.abs(ranking.to_numpy(float)) ** weight
    up = np.where(hits, w, 0.0)
    up = up / up.sum() if up.sum() > 0 else hits / hits.sum()
    down = np.where(hits, 0.0, 1.0 / (len(ranking) - hits.sum()))
    return np.cumsum(up - down), np.flatnonzero(hits)


def plot_gsea_top(ranking: pd.Series, sets: dict[str, list[str]], gsea: pd.DataFrame,
                  save: str | os.PathLike | None = None, *, n: int = 4, group_label: str = "CSC-like vs other cells",
                  return_fig: bool = False):
    """Running-sum plots for the ``n`` sets with the largest |NES|, with hit ticks and the ranking metric."""
    apply_style()
    top = gsea.dropna(subset=["gsea_nes"])
    top = top[top["set"].isin(sets)]
    top = top.loc[top["gsea_nes"].abs().sort_values(ascending=False).index].head(n)
    k = max(1, len(top))
    fig, axes = plt.subplots(2, k, figsize=(3.2 * k, 3.6), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]})
    for j, rec in enumerate(top.itertuples()):
        es, hit_pos = running_sum(ranking, sets[rec.set])
        ax, ax2 = axes[0, j], axes[1, j]
        ax.plot(es, color=OKABE_ITO[4], lw=1.4)
        ax.axhline(0, color="#999999", lw=0.6)
        ax.vlines(hit_pos, ymin=min(es.min(), 0) - 0.05, ymax=min(es.min(), 0) - 0.01, color="#000000", lw=0.8)
        fdr = rec.gsea_fdr if isinstance(rec.gsea_fdr, str) else f"{rec.gsea_fdr:.2g}"  # text: '< 1/permutations'
        ax.set_title(f"{rec.set}\nNES {rec.gsea_nes:.2f}, FDR {fdr}", fontsize=8)
        ax.set_ylabel("running ES" if j == 0 else "")
        ax2.fill_between(np.arange(len(ranking)), ranking.to_numpy(float), color=OKABE_ITO[8], lw=0)
        ax2.set_xlabel("gene rank")
        ax2.set_ylabel("Wilcoxon z" if j == 0 else "")
    if top.empty:
        axes[0, 0].text(0.5, 0.5, "no set tested", ha="center", va="center", transform=axes[0, 0].transAxes)
    fig.suptitle(f"GSEA prerank, {group_label}", fontsize=10, y=1.06)
    return finish(fig, save, return_fig)


def plot_pathway_effects(details: pd.DataFrame, per_sample: pd.DataFrame, *, ax=None, return_fig: bool = False,
                         save: str | os.PathLike | None = None, title: str | None = None):
    """One row per pathway: the CSC-like vs other-malignant effect (Cohen's d) with its 95 % CI, the
    per-sample effects as points and the matched null's central 95 % as a grey band.

    Called sets are drawn in colour (vermillion up, blue down), the rest in grey; positive controls
    (sets that define CSC-like cells) are marked and kept at the bottom, apart from the findings.
    Flagged sets (few genes, no signal, absent) are left out: they have no reliable effect.
    """
    apply_style()
    df = details[details["effect"].notna() & details["flag"].isin(["ok"])].copy()
    df["_control"] = df["role"] != "pathway"
    df = df.sort_values(["_control", "effect"], ascending=[False, True], kind="stable").reset_index(drop=True)
    created = ax is None
    if created:
        fig, ax = plt.subplots(figsize=(6.8, 1.2 + 0.32 * max(1, len(df))))
    else:
        fig = ax.figure
    up, down, grey = OKABE_ITO[5], OKABE_ITO[4], "#777777"  # vermillion, blue
    for i, r in df.iterrows():
        if np.isfinite(r["null_low"]) and np.isfinite(r["null_high"]):
            ax.add_patch(plt.Rectangle((r["null_low"], i - 0.38), r["null_high"] - r["null_low"], 0.76,
                                       color="#DDDDDD", lw=0, zorder=0))
        pts = per_sample.loc[per_sample["set"] == r["set"], "effect"].to_numpy(float)
        if pts.size:
            jitter = np.linspace(-0.22, 0.22, pts.size) if pts.size > 1 else np.zeros(1)
            ax.scatter(pts, i + jitter, s=9, facecolors="none", edgecolors="#555555", lw=0.6, zorder=2)
        color = (up if r["effect_vs_null"] > 0 else down) if bool(r.get("called", False)) else grey
        ax.plot([r["ci_low"], r["ci_high"]], [i, i], color=color, lw=1.8, zorder=3)
        ax.scatter([r["effect"]], [i], s=30, color=color, marker="D" if r["_control"] else "o", zorder=4)
    ax.axvline(0, color="#999999", lw=0.6)
    labels = [f"{s} (positive control)" if c else s for s, c in zip(df["set"], df["_control"])]
    ax.set_yticks(range(len(df)), labels)
    ax.set_ylim(-0.7, len(df) - 0.3)
    ax.set_xlabel("effect in CSC-like vs other malignant cells (Cohen's d)")
    n_samples = per_sample["sample"].nunique() if len(per_sample) else 0
    ax.set_title(title or f"Pathway effects: 95 % CI, per-sample points ({n_samples} sample"
                          f"{'s' if n_samples != 1 else ''}), grey = matched null 95 %", fontsize=9)
    if df.empty:
        ax.text(0.5, 0.5, "no set with a reliable score", ha="center", va="center", transform=ax.transAxes)
    return finish(fig, save, return_fig)
