"""Normalisation, feature selection, embedding, Leiden clustering and marker genes."""
from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from metastem._numba_cache import graph_only_nndescent
from metastem._timing import step
from metastem.blocks import row_block, row_blocks
from metastem.errors import MetastemError

log = logging.getLogger(__name__)

EXACT_KNN_MAX_CELLS = 50_000  # exact kNN graph up to this many cells, pynndescent above (see build_graph)


def normalize(adata: ad.AnnData, *, values: str, target_sum: float) -> str:
    """Bring X to log-normalised values, in place.

    Counts are depth-normalised then log1p'd; 'normalized' values are only log1p'd; 'log' values are
    used as they are. Returns a sentence for the methods section.
    """
    import scanpy as sc

    if values == "counts":
        # Raw counts stay in qc/qc.h5ad (same cells and genes): no copy here, none in clustered.h5ad, which
        # three later rules read; the final rule puts them back as layers['counts'] (io.write_h5ad_atomic).
        sc.pp.normalize_total(adata, target_sum=target_sum)
        sc.pp.log1p(adata)
        return f"counts normalised to {target_sum:g} per cell and log1p-transformed"
    if values == "normalized":
        sc.pp.log1p(adata)
        return "normalised values log1p-transformed (count normalisation skipped: values are not counts)"
    # Log values: in the base metastem.io.read recorded in uns['log1p'] (None = e), else found here. Values
    # in base 2 or 10 are rescaled to natural log1p units (x * ln b = ln(1 + v)): the same numbers as if
    # log1p had been taken here, so every later step (HVG, markers, stemness census, scores) un-logs with expm1.
    from metastem.io import _base_name, resolve_log_base

    if "log1p" in adata.uns:
        base, how = adata.uns["log1p"].get("base"), adata.uns.get("log_base_rule", "log base recorded in uns['log1p']")
    else:
        base, how = resolve_log_base(adata)
    adata.uns["log1p"] = {"base": None}
    adata.uns.pop("log_base_rule", None)
    if base is None or np.isclose(float(base), np.e):
        return f"log values used as given ({how}; count normalisation skipped: values are not counts)"
    factor = np.float32(np.log(float(base)))
    if sp.issparse(adata.X):
        adata.X.data *= factor
    else:
        adata.X = np.asarray(adata.X, dtype=np.float32) * factor
    return (f"log{_base_name(float(base))} values converted to natural log1p units (x · ln {_base_name(float(base))}; "
            f"{how}; count normalisation skipped: values are not counts)")


def highly_variable_genes_seurat(adata: ad.AnnData, n_top_genes: int, n_bins: int = 20) -> None:
    """scanpy's ``highly_variable_genes(flavor='seurat', n_top_genes=...)``, reading X block by block.

    scanpy un-logs a copy of X and then expm1's that copy, three X's at once: the clustering job's
    largest allocation (4.3 GB at 100k cells). Here the gene means and (unbiased) variances of the
    un-logged values are accumulated over row blocks, and the dispersions, mean bins,
    per-bin normalisation and top-n cut follow scanpy 1.11 step by step; tests check the same genes
    are selected. Writes ``var['highly_variable', 'means', 'dispersions', 'dispersions_norm']``.
    """
    X = adata.X
    n, g = X.shape
    base = adata.uns.get("log1p", {}).get("base")
    scale = np.float32(np.log(base)) if base is not None else np.float32(1)
    total, total_sq = np.zeros(g), np.zeros(g)
    for rows in row_blocks(n):
        B = row_block(X, rows)
        # as scanpy: float32 un-logged values, their squares in float32, sums in float64
        if sp.issparse(B):
            B = sp.csr_matrix(B)
            v = np.expm1(B.data.astype(np.float32) * scale)
            total += np.bincount(B.indices, weights=v, minlength=g)
            total_sq += np.bincount(B.indices, weights=v * v, minlength=g)
        else:
            v = np.expm1(np.asarray(B, dtype=np.float32) * scale)
            total += v.sum(axis=0, dtype=np.float64)
            total_sq += (v * v).sum(axis=0, dtype=np.float64)
    mean = total / n
    var = (total_sq / n - mean ** 2) * (n / (n - 1) if n > 1 else 1.0)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    dispersion = np.log(dispersion)
    mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()              # a bin with one gene: its normalised dispersion is set to 1
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    per_gene = stats.loc[df["mean_bin"]].set_index(df.index)
    norm = ((df["dispersions"] - per_gene["avg"]) / per_gene["dev"]).to_numpy()
    ranked = np.sort(norm[~np.isnan(norm)])[::-1]
    if ranked.size == 0:
        raise ValueError("no gene has a finite normalised dispersion")
    cutoff = ranked[min(n_top_genes, ranked.size) - 1]
    adata.var["highly_variable"] = np.nan_to_num(norm, nan=-np.inf) >= cutoff
    adata.var["means"] = mean
    adata.var["dispersions"] = dispersion
    adata.var["dispersions_norm"] = norm.astype(np.float32)
    adata.uns["hvg"] = {"flavor": "seurat"}


def build_graph(adata: ad.AnnData, params: dict, seed: int = 0) -> list[str]:
    """HVG → PCA → kNN graph (+ ``obs['knn_component']``), in place. Returns notes.

    Every random step gets ``seed``. From 4096 cells on, scanpy finds neighbours with pynndescent
    (which must be < 0.7 for scanpy 1.11, see pyproject.toml).

    With several samples in ``obs[params['batch_key']]`` and ``params['integration'] == 'harmony'`` (the
    default), genes are chosen across samples (``integration.highly_variable_genes_batch``) and the kNN
    graph is built on Harmony-corrected PCs (``obsm['X_pca_harmony']``), so that the graph shared by
    clustering, stemness diffusion and pseudotime links like cells of different patients. With one sample
    nothing changes.
    """
    import scanpy as sc

    from metastem import integration

    notes = []
    if adata.n_obs < 3:
        raise MetastemError(f"only {adata.n_obs} cells reach clustering", fix="provide more cells, or relax the QC thresholds for this dataset")
    batch_key = params.get("batch_key", "sample")
    n_batches = integration.n_samples(adata, batch_key)
    integrate = params.get("integration", "harmony") == "harmony" and n_batches > 1
    if params.get("integration", "harmony") == "harmony" and batch_key not in adata.obs:
        notes.append(f"cluster.batch_key '{batch_key}' is not an obs column: no integration")
    n_top = min(params["n_top_genes"], adata.n_vars)
    try:
        with step("variable genes"):
            if integrate:
                integration.highly_variable_genes_batch(adata, n_top, batch_key=batch_key)
            else:
                highly_variable_genes_seurat(adata, n_top)
    except (ValueError, IndexError) as exc:  # degenerate dispersions (e.g. constant genes)
        adata.var["highly_variable"] = np.asarray((adata.X.max(axis=0) > 0).todense()).ravel() \
            if hasattr(adata.X, "todense") else (np.asarray(adata.X).max(axis=0) > 0)
        notes.append(f"highly variable gene selection failed ({type(exc).__name__}); all expressed genes used")
    n_hvg = int(adata.var["highly_variable"].sum())
    if n_hvg < 3:
        raise MetastemError(f"only {n_hvg} variable genes among {adata.n_vars} genes; nothing to cluster on",
                            fix="check the input (is every cell identical?) or lower qc.min_cells_per_gene")
    n_pcs = min(params["n_pcs"], adata.n_obs - 1, n_hvg - 1)
    if n_pcs < params["n_pcs"]:
        notes.append(f"n_pcs reduced to {n_pcs} (data has {adata.n_obs} cells, {n_hvg} variable genes)")
    with step("PCA"):
        sc.pp.pca(adata, n_comps=n_pcs, mask_var="highly_variable", svd_solver="arpack", random_state=seed)
    use_rep = "X_pca"
    if integrate:
        with step("Harmony"):
            integration.harmony(adata, batch_key=batch_key, theta=params.get("harmony_theta", 2.0),
                                max_iter=params.get("harmony_max_iter", 10), seed=seed)
        use_rep = integration.HARMONY_KEY
        notes.append(f"{n_batches} samples ('{batch_key}'): genes chosen across samples and the kNN graph built "
                     f"on Harmony-corrected PCs (theta {params.get('harmony_theta', 2.0):g})")
    n_neighbors = min(params["n_neighbors"], adata.n_obs - 1)
    if n_neighbors < params["n_neighbors"]:
        notes.append(f"n_neighbors reduced to {n_neighbors} ({adata.n_obs} cells)")
    # Exact neighbours (sklearn, as scanpy itself does below 4096 cells) up to EXACT_KNN_MAX_CELLS: no
    # uncacheable pynndescent JIT (measured at 21k cells: 1.4 s instead of 8.9 s; Leiden ARI 0.85 against the
    # approximate graph, as between two seeds); above it exact search grows with the square of the cells.
    exact = adata.n_obs <= EXACT_KNN_MAX_CELLS
    with step("kNN graph"), graph_only_nndescent():
        sc.pp.neighbors(adata, n_neighbors=n_neighbors, n_pcs=n_pcs, use_rep=use_rep, random_state=seed,
                        transformer="sklearn" if exact else None)
    n_comp, labels = connected_components(adata.obsp["connectivities"], directed=False)
    # components numbered by size (largest = '0'), so the labels do not depend on cell order
    sizes = np.bincount(labels)
    rank = np.empty_like(sizes)
    rank[np.lexsort((np.arange(sizes.size), -sizes))] = np.arange(sizes.size)
    adata.obs["knn_component"] = pd.Categorical(rank[labels].astype(str),
                                                categories=[str(i) for i in range(n_comp)])
    if n_comp > 1:
        notes.append(f"the kNN graph has {n_comp} disconnected components (sizes {sorted(sizes.tolist(), reverse=True)[:5]}); "
                     "pseudotime cannot cross them and reports unreachable cells")
    return notes


def umap_epochs(n_cells: int, params: dict) -> int:
    """``cluster.umap_n_epochs``, or when None umap-learn's 500 up to 10,000 cells and 100 above: the layout's
    state separation is the same at 100 epochs as at umap-learn's 200 (measured at 20k cells), at half the cost."""
    n_epochs = params.get("umap_n_epochs")
    return int(n_epochs) if n_epochs is not None else (500 if n_cells <= 10_000 else 100)


def embed_and_cluster(adata: ad.AnnData, params: dict, seed: int = 0) -> list[str]:
    """HVG → PCA → kNN graph → UMAP → Leiden, in place. Returns notes for the log and report.

    A disconnected kNN graph is not an error (a warning note); a single Leiden cluster is, naming
    ``cluster.resolution``.
    """
    import scanpy as sc

    notes = build_graph(adata, params, seed)
    with step("UMAP"):
        sc.tl.umap(adata, min_dist=params["umap_min_dist"], random_state=seed, maxiter=umap_epochs(adata.n_obs, params))
    with step("Leiden"):
        sc.tl.leiden(adata, resolution=params["resolution"], random_state=seed, flavor="igraph",
                     n_iterations=2, directed=False, key_added="leiden")
    n_clusters = adata.obs["leiden"].nunique()
    if n_clusters < 2:
        raise MetastemError(f"Leiden found a single cluster in {adata.n_obs} cells at cluster.resolution="
                            f"{params['resolution']}",
                            fix="raise cluster.resolution for this dataset in the sheet's params column "
                                f"(e.g. cluster.resolution={max(2.0, 2 * params['resolution']):g}), or check that "
                                "QC left a heterogeneous sample")
    for note in notes:
        log.warning(note)
    return notes


def subsample_per_group(groups: np.ndarray, max_per_group: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices keeping at most ``max_per_group`` random cells (seeded) of each group; all when None.

    Rank tests (markers, CSC-like vs rest) settle long before 100k cells while their cost keeps growing.
    """
    if max_per_group is None:
        return np.arange(len(groups))
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([
        idx if idx.size <= max_per_group else rng.choice(idx, max_per_group, replace=False)
        for idx in (np.flatnonzero(groups == g) for g in np.unique(groups))]))


def marker_genes(adata: ad.AnnData, n_genes: int, *, max_cells_per_cluster: int | None = None,
                 seed: int = 0, key_added: str | None = None) -> pd.DataFrame:
    """Wilcoxon markers per Leiden cluster (each against all other cells) as a tidy table.

    The statistics are scanpy's ``rank_genes_groups(method='wilcoxon', reference='rest', pts=True)``
    computed from the stored values of the sparse matrix (:mod:`metastem.markers`: ~3 s instead of ~22 s
    at 21k cells x 20k genes, equal to scanpy's to float precision, tested). With ``max_cells_per_cluster``,
    each cluster is subsampled (seeded) to at most that many cells: a few hundred cells per cluster
    already rank its markers stably. ``adata`` is left untouched, except that with ``key_added`` the
    result is stored in ``adata.uns[key_added]`` in scanpy's layout (``sc.pl.rank_genes_groups_*`` and
    ``sc.get.rank_genes_groups_df`` read it; h5ad-writable).
    """
    import scanpy as sc

    from metastem import markers

    sizes = adata.obs["leiden"].value_counts()
    groups = [str(g) for g in adata.obs["leiden"].cat.categories if sizes.get(g, 0) >= 2]
    if len(groups) < 2:
        log.warning("marker genes skipped: fewer than two clusters with at least two cells")
        return pd.DataFrame(columns=["cluster", "gene", "scores", "log2fc", "pval", "pval_adj", "frac_in", "frac_out"])
    if len(groups) < adata.obs["leiden"].nunique():
        log.warning("marker genes skipped for single-cell clusters: %s",
                    ", ".join(str(g) for g in sizes.index if sizes[g] < 2))
    in_groups = adata.obs["leiden"].astype(str).isin(groups).to_numpy()  # scanpy's rest: cells of the tested groups
    codes = np.where(in_groups, adata.obs["leiden"].cat.codes.to_numpy(), -1)
    keep = subsample_per_group(codes, max_cells_per_cluster, seed)
    keep = keep[codes[keep] >= 0]
    labels = pd.Categorical(adata.obs["leiden"].astype(str).to_numpy()[keep], categories=groups)
    base = adata.uns.get("log1p", {}).get("base")  # fold changes need the log base
    result = markers.wilcoxon_vs_rest(adata.X[keep], labels, var_names=adata.var_names, log_base=base)
    uns = markers.as_rank_genes_groups(result, groupby="leiden")
    if key_added:  # scanpy's layout, so that sc.pl.rank_genes_groups_* work on the written file
        adata.uns[key_added] = uns
    df = sc.get.rank_genes_groups_df(ad.AnnData(obs=pd.DataFrame(index=adata.obs_names[:0]), uns={"markers": uns}),
                                     group=None, key="markers")
    df = df.sort_values(["group", "scores", "names"], ascending=[True, False, True], kind="mergesort")
    df = df.groupby("group", observed=True).head(n_genes)
    df = df.rename(columns={"group": "cluster", "names": "gene", "logfoldchanges": "log2fc",
                            "pvals": "pval", "pvals_adj": "pval_adj", "pct_nz_group": "frac_in",
                            "pct_nz_reference": "frac_out"})
    return df.reset_index(drop=True)
