"""Several samples in one dataset: batch-aware gene selection, Harmony on the PCA, and how well samples mix.

Patients differ by more than biology: depth, dissociation, chemistry and ambient RNA shift every cell of a
sample the same way. Without correction the kNN graph that clustering, stemness diffusion and pseudotime
share links cells of one patient first, so clusters become patients. Harmony (Korsunsky et al., Nat Methods
2019; ``harmonypy``) moves each sample's cells in PCA space towards soft clusters shared by all samples;
the corrected coordinates (``obsm['X_pca_harmony']``) replace the PCA for the kNN graph.

Malignant cells are patient-specific (each tumour has its own copy-number changes and programmes), so a
good integration mixes the shared normal compartments (immune, stromal, endothelial cells) while tumour
clusters may stay one patient each: the mixing diagnostic is therefore reported per cluster, not as one
number to maximise.
"""
from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd

from metastem._keys import Obsm

log = logging.getLogger(__name__)

HARMONY_KEY = Obsm.PCA_HARMONY


def n_samples(adata: ad.AnnData, batch_key: str = "sample") -> int:
    """Distinct samples in ``obs[batch_key]`` (1 when the column is absent)."""
    return int(adata.obs[batch_key].nunique()) if batch_key in adata.obs else 1


def highly_variable_genes_batch(adata: ad.AnnData, n_top_genes: int = 2000, *, batch_key: str = "sample",
                                min_cells: int = 3) -> None:
    """Seurat-flavour highly variable genes chosen across samples, as scanpy's ``batch_key`` does.

    Genes are ranked within each sample (normalised dispersion in mean bins, ``cluster.
    highly_variable_genes_seurat`` on that sample's rows), then ordered by the number of samples in which
    they are highly variable and by their mean normalised dispersion over samples; the first
    ``n_top_genes`` are kept. Genes variable only because samples differ in depth or composition are not
    favoured. Writes ``var['highly_variable', 'highly_variable_nbatches', 'dispersions_norm', 'means',
    'dispersions']`` (means and dispersions of all cells); samples with fewer than ``min_cells`` cells do
    not vote.
    """
    from metastem.cluster import highly_variable_genes_seurat

    highly_variable_genes_seurat(adata, min(n_top_genes, adata.n_vars))   # pooled means and dispersions
    codes, names = pd.factorize(adata.obs[batch_key].astype(str), sort=True)
    votes = np.zeros(adata.n_vars, dtype=int)
    norm_sum = np.zeros(adata.n_vars)
    n_voting = 0
    for b in range(len(names)):
        idx = np.flatnonzero(codes == b)
        if idx.size < min_cells:
            continue
        sub = ad.AnnData(X=adata.X[idx], var=pd.DataFrame(index=adata.var_names))
        sub.uns["log1p"] = dict(adata.uns.get("log1p", {"base": None}))
        try:
            highly_variable_genes_seurat(sub, min(n_top_genes, adata.n_vars))
        except (ValueError, IndexError):  # a sample without a finite dispersion: it does not vote
            continue
        votes += sub.var["highly_variable"].to_numpy(dtype=bool)
        norm_sum += np.nan_to_num(sub.var["dispersions_norm"].to_numpy(dtype=float), nan=0.0)
        n_voting += 1
    if n_voting == 0:
        raise ValueError("no sample has finite gene dispersions")
    mean_norm = norm_sum / n_voting
    order = np.lexsort((np.arange(adata.n_vars), -mean_norm, -votes))  # ties broken by gene order: deterministic
    hv = np.zeros(adata.n_vars, dtype=bool)
    hv[order[:min(n_top_genes, adata.n_vars)]] = True
    hv &= votes > 0
    adata.var["highly_variable"] = hv
    adata.var["highly_variable_nbatches"] = votes
    adata.var["dispersions_norm"] = mean_norm.astype(np.float32)
    adata.uns["hvg"] = {"flavor": "seurat", "batch_key": batch_key}


def harmony(adata: ad.AnnData, *, batch_key: str = "sample", basis: str = "X_pca", key_added: str = HARMONY_KEY,
            theta: float = 2.0, max_iter: int = 10, seed: int = 0, copy: bool = False) -> ad.AnnData | None:
    """Harmony-corrected PCA coordinates in ``obsm[key_added]`` (cells x PCs, float32 numpy array).

    ``theta`` is Harmony's diversity penalty (higher: stronger mixing; 2 is the published default),
    ``max_iter`` its maximum rounds of clustering and correction. Records the parameters, the rounds run
    and whether the objective converged in ``uns[key_added]`` (h5ad-writable, no None).
    """
    import harmonypy

    adata = adata.copy() if copy else adata
    Z = np.asarray(adata.obsm[basis], dtype=np.float64)
    meta = pd.DataFrame({batch_key: adata.obs[batch_key].astype(str).to_numpy()})
    hm_log = logging.getLogger("harmonypy")
    level = hm_log.level
    hm_log.setLevel(logging.WARNING)  # it logs every iteration at INFO
    try:
        ho = harmonypy.run_harmony(Z, meta, [batch_key], theta=theta, max_iter_harmony=max_iter,
                                   random_state=seed, verbose=False)
    finally:
        hm_log.setLevel(level)
    corrected = np.asarray(ho.Z_corr)
    if corrected.shape != Z.shape:  # older harmonypy returned PCs x cells
        corrected = corrected.T
    adata.obsm[key_added] = np.ascontiguousarray(corrected, dtype=np.float32)
    objective = [float(v) for v in ho.objective_harmony]
    adata.uns[key_added] = {"batch_key": batch_key, "basis": basis, "theta": float(theta), "max_iter": int(max_iter),
                            "seed": int(seed), "n_samples": n_samples(adata, batch_key),
                            "rounds": max(len(objective) - 1, 0), "objective_json": json.dumps(objective)}
    return adata if copy else None


def _entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)


def knn_sample_entropy(X: np.ndarray, samples: np.ndarray, n_neighbors: int = 15) -> np.ndarray:
    """Per cell: entropy of the sample labels among its ``n_neighbors`` nearest cells (Euclidean on ``X``),
    divided by the entropy of the samples' overall proportions: 1 when neighbourhoods look like the whole
    dataset (perfect mixing), 0 when every neighbour comes from one sample."""
    from sklearn.neighbors import NearestNeighbors

    codes, names = pd.factorize(samples, sort=True)
    k = min(n_neighbors, len(codes) - 1)
    expected = float(_entropy(np.bincount(codes, minlength=len(names)) / len(codes)))
    if len(names) < 2 or k < 1 or expected == 0:
        return np.full(len(codes), np.nan)
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(X)
    idx = nn.kneighbors(X, return_distance=False)[:, 1:]
    counts = np.zeros((len(codes), len(names)))
    np.add.at(counts, (np.repeat(np.arange(len(codes)), k), codes[idx].ravel()), 1.0)
    return _entropy(counts / k) / expected


def sample_mixing(adata: ad.AnnData, *, sample_key: str = "sample", groupby: str = "leiden",
                  bases: tuple[str, ...] = ("X_pca", HARMONY_KEY), n_neighbors: int = 15,
                  max_cells: int = 10000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """How far the samples mix, per cluster, before (PCA) and after integration (Harmony).

    Returns ``(per_cluster, shares, summary)``:

    - ``per_cluster``: cluster, n_cells, n_samples present, top_sample, top_sample_share, and for each basis
      ``mixing_<basis>``: the mean kNN sample entropy (``knn_sample_entropy``, 1 = neighbours as mixed as the
      whole dataset, 0 = one sample) of the cluster's cells, computed on a seeded subsample of at most
      ``max_cells`` cells (neighbours found within the subsample) so its cost stays flat at any size;
    - ``shares``: long table cluster, sample, n_cells, share of the cluster;
    - ``summary``: the mean mixing per basis over all subsampled cells, cells used, samples.

    The unit is the cell's neighbourhood; clusters of one patient's malignant cells are expected to stay
    unmixed, shared normal cell types should mix after integration.
    """
    obs = adata.obs
    groups = obs[groupby].astype(str)
    samples = obs[sample_key].astype(str)
    counts = pd.crosstab(groups, samples)
    order = sorted(counts.index, key=lambda c: (pd.to_numeric(c, errors="coerce"), c))
    counts = counts.loc[order]
    shares = counts.div(counts.sum(axis=1), axis=0)
    long = (counts.stack().rename("n_cells").to_frame().join(shares.stack().rename("share"))
            .reset_index().rename(columns={groupby: "cluster", sample_key: "sample"}))
    long.columns = ["cluster", "sample", "n_cells", "share"]
    per = pd.DataFrame({"cluster": counts.index, "n_cells": counts.sum(axis=1).to_numpy(),
                        "n_samples": (counts > 0).sum(axis=1).to_numpy(),
                        "top_sample": shares.idxmax(axis=1).to_numpy(),
                        "top_sample_share": shares.max(axis=1).to_numpy()})
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(adata.n_obs, max_cells, replace=False)) if adata.n_obs > max_cells else \
        np.arange(adata.n_obs)
    summary = {"cells_used": int(pick.size), "n_neighbors": int(n_neighbors),
               "n_samples": int(samples.nunique()), "mean_mixing": {}}
    for basis in bases:
        if basis not in adata.obsm:
            continue
        ent = knn_sample_entropy(np.asarray(adata.obsm[basis])[pick], samples.to_numpy()[pick], n_neighbors)
        col = f"mixing_{basis.removeprefix('X_')}"
        per[col] = pd.Series(ent).groupby(groups.to_numpy()[pick]).mean().reindex(per["cluster"]).to_numpy()
        summary["mean_mixing"][basis] = float(np.nanmean(ent)) if np.isfinite(ent).any() else None
    return per, long, summary


def plot_sample_mixing(shares: pd.DataFrame, *, ax=None, return_fig: bool = False, save: str | None = None,
                       title: str = "Sample composition of each cluster"):
    """Stacked bars: each cluster's share of cells from each sample (after integration).

    A cluster of a shared normal cell type should hold every sample; a tumour cluster may be one patient.
    """
    import matplotlib.pyplot as plt

    from metastem import plots

    plots.apply_style()
    wide = shares.pivot(index="cluster", columns="sample", values="share").fillna(0.0)
    wide = wide.loc[sorted(wide.index, key=lambda c: (pd.to_numeric(c, errors="coerce"), c))]
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(wide) + 2.5), 3.2))
    else:
        fig = ax.figure
    colors = plots.category_colors(wide.shape[1])
    bottom = np.zeros(len(wide))
    for j, sample in enumerate(wide.columns):
        ax.bar(np.arange(len(wide)), wide[sample].to_numpy(), bottom=bottom, color=colors[j], label=str(sample),
               width=0.85, linewidth=0)
        bottom += wide[sample].to_numpy()
    ax.set_xticks(np.arange(len(wide)))
    ax.set_xticklabels(wide.index, fontsize=7)
    ax.set_xlabel("Leiden cluster")
    ax.set_ylabel("share of the cluster's cells")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(title="sample", fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    return plots.finish(fig, save, return_fig)


def plot_integration(adata: ad.AnnData, shares: pd.DataFrame, *, sample_key: str = "sample",
                     return_fig: bool = False, save: str | None = None):
    """Two panels: the UMAP coloured by sample, and each cluster's sample composition (stacked bars)."""
    import matplotlib.pyplot as plt

    from metastem import plots

    plots.apply_style()
    n_clusters = shares["cluster"].nunique()
    fig, axes = plt.subplots(1, 2, figsize=(5.2 + max(4.0, 0.35 * n_clusters + 2.5), 4.0),
                             gridspec_kw={"width_ratios": [5.2, max(4.0, 0.35 * n_clusters + 2.5)]})
    plots.scatter_embedding(axes[0], adata.obsm["X_umap"], adata.obs[sample_key].astype("category"),
                            "UMAP by sample")
    if axes[0].get_legend() is not None:
        axes[0].get_legend().remove()
    plot_sample_mixing(shares, ax=axes[1])
    fig.tight_layout()
    return plots.finish(fig, save, return_fig)
