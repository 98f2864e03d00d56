"""Diffusion pseudotime rooted in stemness, PAGA between clusters, and diagnostics of both.

DPT (Haghverdi et al. 2016) orders cells by their diffusion distance from one root cell, so the root
decides the direction of time. scanpy writes no pseudotime without a root and gives ``inf`` to cells
that the root cannot reach (another kNN component). This module therefore:

- chooses the root from the stemness score by a stated rule that one extreme cell cannot win
  (:func:`choose_root`), or takes it from the caller, and says why in a sentence for the report;
- stores ``obs['pseudotime']`` rescaled to 0-1 over reachable cells, with NaN (never 1, never inf)
  for unreachable ones, ``obs['pseudotime_reachable']``, and which kNN components were left out
  (:func:`pseudotime`);
- measures how much the ordering agrees with stemness and how much it depends on the root choice;
- orders each tumour on its own (:func:`malignant_pseudotime`): each sample's malignant cells on their
  own kNN graph, rooted among that sample's CSC-like cells by the same rule, ``obs['pseudotime_malignant']``
  0-1 per sample, with per-sample agreement with stemness (:func:`malignant_pseudotime_table`);
- records, when stemness was not computed and no root is set, why no all-cell pseudotime exists
  (:func:`skip_reason`, :func:`skip_pseudotime`) instead of failing;
- summarises the branching topology with PAGA (Wolf et al. 2019) between Leiden clusters
  (:func:`paga`), since scanpy recommends DPT for ordering only and PAGA for topology. PAGA never
  fails on a graph without inter-cluster edges (disjoint cell types): it then has no edges.

Library shape: AnnData first, keyword parameters with defaults equal to the config schema's
``pseudotime`` section, results in place under ``key_added``, parameters recorded in ``uns``.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.stats import spearmanr

from metastem._keys import Obs, Obsm, Uns
from metastem.errors import MetastemError

log = logging.getLogger(__name__)

ROOT_KINDS = ("auto", "cell", "cluster", "label")
COMPARTMENTS = ("both", "all", "malignant")   # pseudotime.compartment
MALIGNANT_GRAPHS = ("rebuilt", "restricted")  # pseudotime.malignant_graph
# scanpy treats diffusion components with an eigenvalue this close to 1 as stationary (unscaled).
_STATIONARY_EVAL = 0.9994
# Edges below this PAGA connectivity are left out of the report's graph figure (the JSON keeps them all):
# weaker links are mostly kNN noise between unrelated clusters and clutter the picture.
PAGA_EDGE_THRESHOLD = 0.05
# Consistency constant: 1.4826 x MAD estimates the standard deviation of normal data.
_MAD_SCALE = 1.4826
# Components listed one by one in info.json / the report; the rest are counted.
_MAX_COMPONENTS_LISTED = 20


# ----------------------------------------------------------------------------- helpers

def parse_root(spec: str | None) -> tuple[str, str]:
    """``'auto'`` -> ('auto', ''); ``'cluster:3'`` -> ('cluster', '3'); anything else is a MetastemError."""
    if spec is None or str(spec).strip() == "auto":
        return "auto", ""
    kind, _, value = str(spec).partition(":")
    kind = kind.strip()
    if kind not in ROOT_KINDS[1:] or not value.strip():
        raise MetastemError(f"pseudotime.root '{spec}' is not understood",
                            fix="use 'auto', 'cell:<barcode>', 'cluster:<leiden id>' or 'label:<value of the labels column>'")
    return kind, value.strip()


def _scaled_diffusion_coordinates(adata: ad.AnnData, n_dcs: int) -> np.ndarray:
    """Diffusion components weighted as scanpy's DPT weights them, so Euclidean distance = DPT distance.

    Each non-stationary component j is scaled by lambda_j / (1 - lambda_j) (the sum over all diffusion
    steps); stationary components (eigenvalue ~1) enter unscaled, as in ``scanpy.neighbors._get_dpt_row``.
    """
    evals = np.asarray(adata.uns[Uns.DIFFMAP_EVALS][:n_dcs], dtype=float)
    basis = np.asarray(adata.obsm[Obsm.DIFFMAP][:, :n_dcs], dtype=float)
    weights = np.where(evals < _STATIONARY_EVAL, evals / np.clip(1 - evals, 1e-12, None), 1.0)
    return basis * weights


def _graph_components(adata: ad.AnnData) -> np.ndarray:
    """Connected-component label of every cell in the kNN graph (DPT cannot cross components)."""
    return connected_components(adata.obsp["connectivities"], directed=False)[1]


def _knn_mean(adata: ad.AnnData, values: np.ndarray) -> np.ndarray:
    """Mean of ``values`` (1-D or cells x d) over each cell and its kNN neighbours, equally weighted.

    Replacing a cell's value by its neighbourhood's is what keeps one extreme cell from deciding the
    root: the cell's own value weighs 1/(k+1), so it ranks high only if its neighbours do too.
    """
    graph = sp.csr_matrix(adata.obsp["distances"], copy=True)
    graph.data = np.ones_like(graph.data)
    graph = graph + sp.identity(adata.n_obs, format="csr")
    counts = np.asarray(graph.sum(axis=1)).ravel()
    out = graph @ np.nan_to_num(np.asarray(values, dtype=float))
    return out / (counts if out.ndim == 1 else counts[:, None])


def _rank_by_eccentricity(adata: ad.AnnData, cells: np.ndarray, n_dcs: int) -> np.ndarray:
    """``cells`` sorted from most to least extreme in diffusion space within their kNN component.

    Extremeness = distance from the centroid of the cell's component in DPT-scaled diffusion space, on
    coordinates averaged over each cell's kNN neighbourhood: the tip of the stem region is far from
    everything downstream, and a cell wins only if its neighbourhood lies at the tip, not by being an
    outlier itself (homotypic doublets of stem cells sit alone beyond the tip: measured on the
    simulator, they were the two most eccentric cells of the root cluster without smoothing).
    """
    z = _knn_mean(adata, _scaled_diffusion_coordinates(adata, n_dcs))
    comp = _graph_components(adata)
    centroids = {c: z[comp == c].mean(axis=0) for c in np.unique(comp[cells])}
    dist = np.array([np.linalg.norm(z[i] - centroids[comp[i]]) for i in cells])
    return cells[np.argsort(-dist, kind="stable")]


def _require_stemness(adata: ad.AnnData, stemness_key: str) -> np.ndarray:
    if stemness_key not in adata.obs.columns:
        raise MetastemError(f"obs has no stemness column '{stemness_key}' to choose the pseudotime root from",
                            fix="run the stemness stage first, or set pseudotime.root to 'cell:<barcode>', "
                                "'cluster:<id>' or 'label:<value>'")
    s = adata.obs[stemness_key].to_numpy(dtype=float)
    if not np.isfinite(s).any():
        raise MetastemError(f"stemness column '{stemness_key}' holds no finite values",
                            fix="check the stemness stage output, or set pseudotime.root explicitly")
    return s


def _top_stem_like(cells: np.ndarray, stemness: np.ndarray | None, top_fraction: float,
                   n_candidates: int) -> np.ndarray:
    """The most stem-like ``top_fraction`` of ``cells`` (at least ``n_candidates``); all cells without stemness."""
    if stemness is None:
        return cells
    n_top = min(cells.size, max(n_candidates, math.ceil(top_fraction * cells.size)))
    s = np.nan_to_num(stemness[cells], nan=-np.inf)
    return cells[np.argsort(-s, kind="stable")[:n_top]]


def _root_exclusions(adata: ad.AnnData, members: np.ndarray, *, doublet_key: str, doublet_quantile: float,
                     outlier_nmads: float, n_candidates: int) -> tuple[np.ndarray, dict[str, int], str]:
    """Which ``members`` may be the root: not a likely doublet, not an outlier in genes or counts detected.

    - ``doublet_key`` (scrublet's score, from QC) above its ``doublet_quantile`` over all cells: cells
      that survived QC's doublet threshold but still score in the upper tail.
    - log ``n_genes_by_counts`` or log ``total_counts`` more than ``outlier_nmads`` MAD above the median
      of ``members`` (the root's cluster), or above the median of the cell's own kNN neighbours (MAD of
      that excess over ``members``): homotypic doublets (two cells of one state) escape scrublet but
      detect more genes and counts than their kind, which is exactly what lifts them to the top of a
      CytoTRACE-like stemness score. Measured on the simulator, they sit 1-2.5 MADs above their
      cluster's median, hence the strict cut: leaving some genuine cells out of the candidates costs
      nothing. The local view spares cells that detect many genes together with their neighbours (the
      most stem-like end of a real gradient: on ginhoux the best root is such a cell).

    Returns the mask over ``members``, the number excluded per reason, and a sentence for ``why``.
    When the exclusions would leave fewer than ``n_candidates`` cells, none is applied (said so).
    """
    keep = np.ones(members.size, dtype=bool)
    excluded: dict[str, int] = {}
    parts = []
    if doublet_key in adata.obs.columns:
        score = adata.obs[doublet_key].to_numpy(dtype=float)
        if np.isfinite(score).any():
            cut = float(np.nanquantile(score, doublet_quantile))
            bad = score[members] > cut
            excluded[doublet_key] = int(bad.sum())
            keep &= ~bad
            parts.append(f"{doublet_key} above its {doublet_quantile:.0%} quantile ({cut:.3f})")
    graph = sp.csr_matrix(adata.obsp["distances"])
    for key in (Obs.N_GENES, Obs.TOTAL_COUNTS):
        if key not in adata.obs.columns:
            continue
        logs = np.log1p(np.clip(adata.obs[key].to_numpy(dtype=float), 0, None))
        # Two views of "more than its kind": above the cluster, and above the cell's own kNN neighbours (a
        # doublet of two cells of one state detects more than the singlets of that state around it, while a
        # genuine gradient, e.g. genes detected falling with differentiation, moves a cell and its
        # neighbours together).
        local = logs[members] - np.array([np.median(logs[graph.indices[graph.indptr[i]:graph.indptr[i + 1]]])
                                          if graph.indptr[i + 1] > graph.indptr[i] else logs[i] for i in members])
        for x in (logs[members], local):
            med = np.nanmedian(x)
            mad = _MAD_SCALE * np.nanmedian(np.abs(x - med))
            if not np.isfinite(mad) or mad == 0:
                continue
            bad = x > med + outlier_nmads * mad
            excluded[key] = excluded.get(key, 0) + int((bad & keep).sum())
            keep &= ~bad
        parts.append(f"log {key} more than {outlier_nmads:g} MAD above the cluster's median or above its kNN "
                     "neighbours' median")
    if not parts:
        return keep, excluded, ("no doublet score or genes-detected column was available, so no cell "
                                "was excluded as a likely doublet")
    if keep.sum() < min(n_candidates, members.size):
        return (np.ones(members.size, dtype=bool), {k: 0 for k in excluded},
                f"excluding cells with {' or '.join(parts)} would have left fewer than {n_candidates} "
                "cells, so none was excluded")
    return keep, excluded, (f"{members.size - int(keep.sum())} of its {members.size} cells were excluded as "
                            f"likely doublets or outliers ({' or '.join(parts)})")


def _ensure_diffmap(adata: ad.AnnData, n_dcs: int, random_state: int) -> int:
    """Run ``sc.tl.diffmap`` unless a diffusion map with at least ``n_dcs`` components is there; the
    number of components used (fewer when there are few cells)."""
    import scanpy as sc

    n_dcs = min(n_dcs, adata.n_obs - 2)
    have = adata.obsm.get(Obsm.DIFFMAP)
    if have is None or have.shape[1] < n_dcs or Uns.DIFFMAP_EVALS not in adata.uns:
        sc.tl.diffmap(adata, n_comps=n_dcs, random_state=random_state)
    return n_dcs


def _require_graph(adata: ad.AnnData) -> None:
    if "connectivities" not in adata.obsp or "distances" not in adata.obsp or "neighbors" not in adata.uns:
        raise MetastemError("the AnnData has no kNN graph (obsp['connectivities'])",
                            fix="run the cluster stage first (or sc.pp.neighbors); pseudotime reads cluster/clustered.h5ad")


# ----------------------------------------------------------------------------- the root

def choose_root(adata: ad.AnnData, *, root: str | None = "auto", stemness_key: str = Obs.STEMNESS,
                groupby: str = Obs.LEIDEN, labels_key: str | None = None, min_cluster_fraction: float = 0.01,
                top_fraction: float = 0.05, n_candidates: int = 5, doublet_key: str = Obs.DOUBLET_SCORE,
                doublet_quantile: float = 0.9, outlier_nmads: float = 1.25, n_dcs: int = 10,
                random_state: int = 0, key_added: str = Uns.PSEUDOTIME_ROOT, copy: bool = False
                ) -> ad.AnnData | None:
    """Choose the DPT root cell, by the automatic rule or as ``root`` names it; in place.

    Automatic rule (``root='auto'``; NOTES §3.3):

    1. among ``groupby`` clusters holding at least ``min_cluster_fraction`` of the cells (tiny clusters
       are often doublets or debris), take the one with the highest median stemness;
    2. inside it (its largest kNN component), leave out likely doublets and outliers: cells whose
       ``doublet_key`` lies above its ``doublet_quantile`` over all cells, and cells whose log genes or
       counts detected lie above the cluster's median + ``outlier_nmads`` MAD (see ``_root_exclusions``);
    3. rank the rest by stemness averaged over each cell and its kNN neighbours, and keep the
       ``top_fraction`` (at least ``n_candidates``) of them: the most stem-like *region*;
    4. of these, take the cell whose kNN neighbourhood lies farthest from the component's centroid in
       DPT-scaled diffusion space: the tip of the stem region.

    Why not the arg-max of stemness: a CytoTRACE-like score rewards genes detected, and doublets detect
    more genes, so the single most stem-like cell was a doublet on the built-in demo (``doublet00032``).
    Steps 2-3 make one extreme cell unable to win. Why the tip (step 4) rather than the middle of the
    region: a root in the middle gives its neighbours on either side similar pseudotimes and folds the
    start of the trajectory (on the ginhoux DC progenitors 0.80 Spearman with the known order at the
    tip, 0.75 at the medoid of the candidates).

    ``root='cell:<barcode>'`` takes that cell; ``'cluster:<id>'`` and ``'label:<value>'`` (needs
    ``labels_key``) apply steps 2-4 within that group. ``None`` is ``'auto'``.

    Writes ``uns[key_added]`` (h5ad-writable): ``spec``, ``index``, ``barcode``, ``cluster``, ``why``
    (one sentence stating the rule and its outcome, for the report), ``candidates`` (barcodes ranked by
    the rule, root first; the stability diagnostic re-roots from them) and ``excluded`` (cells left out
    per reason); ``uns['iroot']`` (scanpy's key, so ``sc.tl.dpt`` can follow); and
    ``obsm['X_diffmap']`` / ``uns['diffmap_evals']`` when no diffusion map was there.
    Returns the AnnData when ``copy``, else None.
    """
    adata = adata.copy() if copy else adata
    _require_graph(adata)
    n_dcs = _ensure_diffmap(adata, n_dcs, random_state)
    kind, value = parse_root(root)
    if kind == "cell":
        result = _cell_root(adata, value, n_candidates)
    else:
        result = _group_root(adata, kind, value, stemness_key=stemness_key, groupby=groupby, labels_key=labels_key,
                             min_cluster_fraction=min_cluster_fraction, top_fraction=top_fraction,
                             n_candidates=n_candidates, doublet_key=doublet_key, doublet_quantile=doublet_quantile,
                             outlier_nmads=outlier_nmads, n_dcs=n_dcs)
    index, why, candidates, excluded = result
    adata.uns[key_added] = {
        "spec": "auto" if kind == "auto" else f"{kind}:{value}", "index": int(index),
        "barcode": str(adata.obs_names[index]),
        "cluster": str(adata.obs[groupby].iloc[index]) if groupby in adata.obs else "",
        "why": why, "candidates": [str(b) for b in adata.obs_names[candidates[:max(n_candidates, 1)]]],
        "excluded": {k: int(v) for k, v in excluded.items()},
    }
    adata.uns[Uns.IROOT] = int(index)
    return adata if copy else None


def _cell_root(adata: ad.AnnData, barcode: str, n_candidates: int) -> tuple[int, str, np.ndarray, dict]:
    if barcode not in adata.obs_names:
        raise MetastemError(f"pseudotime.root cell '{barcode}' is not among the {adata.n_obs} cells after QC",
                            fix="name a barcode present in stemness/cells.tsv.gz (QC may have removed it), or use 'auto'")
    index = int(adata.obs_names.get_loc(barcode))
    # Stability is judged against the root's nearest graph neighbours: equally plausible roots.
    row = adata.obsp["distances"][index]
    neighbours = row.indices[np.argsort(row.data)][: n_candidates - 1]
    return index, f"Root set in the config: cell {barcode}.", np.concatenate([[index], neighbours]).astype(int), {}


def _group_root(adata: ad.AnnData, kind: str, value: str, *, stemness_key: str, groupby: str,
                labels_key: str | None, min_cluster_fraction: float, top_fraction: float, n_candidates: int,
                doublet_key: str, doublet_quantile: float, outlier_nmads: float, n_dcs: int
                ) -> tuple[int, str, np.ndarray, dict]:
    """Steps 1-4 of the automatic rule ('auto'), or 2-4 within the cluster or label the config names."""
    if groupby not in adata.obs.columns:
        raise MetastemError(f"obs has no cluster column '{groupby}'", fix="run the cluster stage first")
    if kind == "auto":
        stemness = _require_stemness(adata, stemness_key)
        groups = adata.obs[groupby].astype(str).to_numpy()
        sizes = pd.Series(groups).value_counts()
        eligible = sizes.index[sizes >= min_cluster_fraction * adata.n_obs]
        if eligible.empty:
            raise MetastemError(f"no {groupby} cluster holds {min_cluster_fraction:.1%} of the cells",
                                fix="lower pseudotime.root_min_cluster_fraction, or set pseudotime.root explicitly")
        medians = pd.Series(stemness).groupby(groups).median().loc[eligible]
        group = str(medians.idxmax())
        members = np.flatnonzero(groups == group)
        lead = (f"Root chosen automatically: {groupby} cluster {group} has the highest median {stemness_key} "
                f"({medians[group]:.2f}) among the {len(eligible)} clusters holding at least "
                f"{min_cluster_fraction:.0%} of cells")
    else:
        if kind == "label" and not labels_key:
            raise MetastemError(f"pseudotime.root '{kind}:{value}' needs a labels column, and this dataset has none",
                                fix="fill the 'labels' column of the dataset sheet, or use 'cluster:<id>' or 'auto'")
        column = groupby if kind == "cluster" else labels_key
        values = adata.obs[column].astype(str)
        members = np.flatnonzero(values.to_numpy() == value)
        if members.size == 0:
            present = ", ".join(sorted(values.unique())[:20])
            raise MetastemError(f"pseudotime.root {kind} '{value}' does not exist in obs['{column}'] (has: {present})",
                                fix=f"name one of the existing values, e.g. '{kind}:{sorted(values.unique())[0]}', "
                                    "or use 'auto'")
        stemness = adata.obs[stemness_key].to_numpy(dtype=float) if stemness_key in adata.obs.columns else None
        lead = f"Root set in the config to {kind} '{value}' ({column})"
    return _root_among(adata, members, lead, stemness, stemness_key=stemness_key, top_fraction=top_fraction,
                       n_candidates=n_candidates, doublet_key=doublet_key, doublet_quantile=doublet_quantile,
                       outlier_nmads=outlier_nmads, n_dcs=n_dcs)


def _root_among(adata: ad.AnnData, members: np.ndarray, lead: str, stemness: np.ndarray | None, *, stemness_key: str,
                top_fraction: float, n_candidates: int, doublet_key: str, doublet_quantile: float,
                outlier_nmads: float, n_dcs: int) -> tuple[int, str, np.ndarray, dict]:
    """Steps 2-4 of the automatic rule among ``members`` (the root's cluster, label, or a sample's CSC-like
    cells): their largest kNN component, doublets and outliers left out, the most stem-like region by
    kNN-smoothed stemness, its tip in diffusion space. ``lead`` opens the ``why`` sentence."""
    comp = _graph_components(adata)
    members = members[comp[members] == np.bincount(comp[members]).argmax()]
    keep, excluded, excl_sentence = _root_exclusions(adata, members, doublet_key=doublet_key,
                                                     doublet_quantile=doublet_quantile, outlier_nmads=outlier_nmads,
                                                     n_candidates=n_candidates)
    smoothed = _knn_mean(adata, stemness) if stemness is not None else None
    top = _top_stem_like(members[keep], smoothed, top_fraction, n_candidates)
    candidates = _rank_by_eccentricity(adata, top, n_dcs)
    root = int(candidates[0])
    region = (f"of the {top.size} cells with the highest {stemness_key} averaged over their kNN neighbours "
              f"(top {top_fraction:.0%})" if stemness is not None else f"of its {top.size} cells")
    why = (f"{lead}; {excl_sentence}; {region}, cell {adata.obs_names[root]}"
           + (f" ({stemness_key} {stemness[root]:.2f})" if stemness is not None else "")
           + " has its kNN neighbourhood at the tip of the stem region in diffusion space (farthest from the "
             "centroid of its kNN component), so that no single extreme cell decides the root.")
    return root, why, candidates, excluded


# ----------------------------------------------------------------------------- pseudotime

def dpt_from_root(adata: ad.AnnData, root: int, n_dcs: int) -> np.ndarray:
    """Raw DPT from one root (``inf`` where unreachable), computed by scanpy on a graph-only copy.

    The copy carries only the graph and the diffusion map, so re-rooting (stability diagnostic) costs
    one distance row and never touches ``adata.obs``.
    """
    import scanpy as sc

    graph = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names),
                       obsm={Obsm.DIFFMAP: adata.obsm[Obsm.DIFFMAP]},
                       obsp={"connectivities": adata.obsp["connectivities"], "distances": adata.obsp["distances"]},
                       uns={"neighbors": adata.uns["neighbors"], Uns.DIFFMAP_EVALS: adata.uns[Uns.DIFFMAP_EVALS],
                            Uns.IROOT: int(root)})
    sc.tl.dpt(graph, n_dcs=n_dcs)
    return graph.obs["dpt_pseudotime"].to_numpy(dtype=float)


def rescale_pseudotime(raw: np.ndarray) -> np.ndarray:
    """0-1 over reachable (finite) cells; unreachable cells become NaN, never 1."""
    out = np.where(np.isfinite(raw), raw, np.nan)
    lo, hi = np.nanmin(out), np.nanmax(out)
    return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)


def components_left_out(adata: ad.AnnData, root: int, *, groupby: str = Obs.LEIDEN) -> list[dict[str, Any]]:
    """Every kNN component not connected to the root, largest first: its cells, its clusters, and why.

    DPT is a diffusion distance along the kNN graph; between components there is no path, so these
    cells get no pseudotime. A tumour sample with immune cells, fibroblasts and malignant cells often
    falls apart like this; the report must say which cells were left out rather than hide them.
    """
    comp = _graph_components(adata)
    groups = adata.obs[groupby].astype(str).to_numpy() if groupby in adata.obs else np.full(adata.n_obs, "")
    out = []
    for c in np.unique(comp):
        if c == comp[root]:
            continue
        cells = np.flatnonzero(comp == c)
        counts = pd.Series(groups[cells]).value_counts()
        out.append({"component": int(c), "n_cells": int(cells.size),
                    "clusters": {str(k): int(v) for k, v in counts.items()},
                    "why": "no kNN edge joins these cells to the root's component, so diffusion pseudotime "
                           "cannot order them relative to the root (pseudotime NaN); set pseudotime.root to a "
                           "cell or cluster of this component to order it instead"})
    return sorted(out, key=lambda d: -d["n_cells"])


def pseudotime(adata: ad.AnnData, *, root: str | None = "auto", method: str = "dpt", n_dcs: int = 10,
               root_min_cluster_fraction: float = 0.01, root_top_fraction: float = 0.05,
               n_root_candidates: int = 5, root_doublet_quantile: float = 0.9, root_outlier_nmads: float = 1.25,
               stemness_key: str = Obs.STEMNESS, groupby: str = Obs.LEIDEN, labels_key: str | None = None,
               doublet_key: str = Obs.DOUBLET_SCORE, compartment: str = "both", malignant_graph: str = "rebuilt",
               malignant_min_cells: int = 30, sample_key: str = Obs.SAMPLE, malignant_key: str = Obs.MALIGNANT,
               csc_key: str = Obs.CSC_LIKE, random_state: int = 0, key_added: str = Obs.PSEUDOTIME,
               copy: bool = False) -> ad.AnnData | None:
    """Diffusion map + DPT on the clustering's kNN graph, rooted as ``root`` says, and within each tumour's
    malignant cells; in place.

    ``compartment``: ``'both'`` (default) orders all cells (below) and, separately, each sample's
    malignant cells from its CSC-like cells (:func:`malignant_pseudotime` with ``malignant_graph``,
    ``malignant_min_cells``, ``sample_key``, ``malignant_key``, ``csc_key`` and the ``root_*`` rules:
    ``obs['pseudotime_malignant']``); ``'all'`` only the former, ``'malignant'`` only the latter (the
    all-cell pseudotime is then recorded as skipped, :func:`skip_pseudotime`).

    ``root``: ``'auto'`` (from stemness, rule in :func:`choose_root`), ``'cell:<barcode>'``,
    ``'cluster:<id>'``, ``'label:<value>'`` (with ``labels_key``), or ``None``: the root already in
    ``uns['pseudotime_root']`` (a previous :func:`choose_root` call), else ``'auto'``. The ``root_*``
    parameters are :func:`choose_root`'s (same defaults as the config schema's ``pseudotime`` section).

    Writes
    - ``obs[key_added]``: pseudotime rescaled to 0-1 over cells reachable from the root; NaN for cells in
      kNN components not connected to the root (their time is unknown, not late);
    - ``obs[key_added + '_reachable']`` (bool);
    - ``obsm['X_diffmap']``, ``uns['diffmap_evals']``, ``uns['iroot']`` (scanpy's keys) and
      ``uns['pseudotime_root']`` (see :func:`choose_root`);
    - ``uns[key_added]``: ``params`` used, ``method``, ``n_dcs``, ``n_cells``, ``n_reachable``,
      ``n_unreachable``, ``notes`` (sentences), ``components_left_out_json`` (JSON text: each component
      left out with its size, clusters and why; JSON because h5ad cannot store a list of records).

    With an automatic root and a stemness column that is all NaN (the stemness stage computed none), no
    pseudotime over all cells is computed: :func:`skip_pseudotime` records why (:func:`skip_reason`).

    Returns the AnnData when ``copy``, else None. Raises MetastemError for a missing graph, an unknown
    method, compartment or root, or no stemness column when the root is automatic.
    """
    adata = adata.copy() if copy else adata
    _require_graph(adata)
    if method != "dpt":
        raise MetastemError(f"pseudotime.method '{method}' is not implemented", fix="use 'dpt'")
    if compartment not in COMPARTMENTS:
        raise MetastemError(f"pseudotime.compartment '{compartment}' is not understood",
                            fix=f"use one of {', '.join(COMPARTMENTS)}")
    if compartment in ("malignant", "both"):
        malignant_pseudotime(adata, groupby=sample_key, malignant_key=malignant_key, csc_key=csc_key,
                             stemness_key=stemness_key, min_cells=malignant_min_cells, n_dcs=n_dcs,
                             root_top_fraction=root_top_fraction, n_root_candidates=n_root_candidates,
                             root_doublet_quantile=root_doublet_quantile, root_outlier_nmads=root_outlier_nmads,
                             doublet_key=doublet_key, graph=malignant_graph, random_state=random_state)
    reason = None if root is None and Uns.PSEUDOTIME_ROOT in adata.uns else skip_reason(adata, root=root,
                                                                                      stemness_key=stemness_key)
    if compartment == "malignant":
        reason = ("Pseudotime over all cells was not computed: pseudotime.compartment is 'malignant' (each "
                  "tumour's malignant cells are ordered on their own); set it to 'both' or 'all' to order all cells.")
    if reason:
        skip_pseudotime(adata, reason, key_added=key_added)
        return adata if copy else None
    params = {k: v for k, v in dict(
        root=root, method=method, n_dcs=n_dcs, root_min_cluster_fraction=root_min_cluster_fraction,
        root_top_fraction=root_top_fraction, n_root_candidates=n_root_candidates,
        root_doublet_quantile=root_doublet_quantile, root_outlier_nmads=root_outlier_nmads,
        stemness_key=stemness_key, groupby=groupby, labels_key=labels_key, doublet_key=doublet_key,
        compartment=compartment, malignant_graph=malignant_graph, malignant_min_cells=malignant_min_cells,
        random_state=random_state).items() if v is not None}
    notes = []
    used_dcs = min(n_dcs, adata.n_obs - 2)
    if used_dcs < n_dcs:
        notes.append(f"n_dcs reduced to {used_dcs} ({adata.n_obs} cells)")
    import scanpy as sc

    sc.tl.diffmap(adata, n_comps=used_dcs, random_state=random_state)
    if root is not None or Uns.PSEUDOTIME_ROOT not in adata.uns:
        choose_root(adata, root=root, stemness_key=stemness_key, groupby=groupby, labels_key=labels_key,
                    min_cluster_fraction=root_min_cluster_fraction, top_fraction=root_top_fraction,
                    n_candidates=n_root_candidates, doublet_key=doublet_key, doublet_quantile=root_doublet_quantile,
                    outlier_nmads=root_outlier_nmads, n_dcs=used_dcs, random_state=random_state)
    root_info = adata.uns[Uns.PSEUDOTIME_ROOT]
    index = int(adata.obs_names.get_loc(root_info["barcode"]))
    raw = dpt_from_root(adata, index, used_dcs)
    adata.uns[Uns.IROOT] = index
    adata.obs[key_added] = rescale_pseudotime(raw)
    adata.obs[f"{key_added}_reachable"] = np.isfinite(raw)
    n_unreachable = int((~np.isfinite(raw)).sum())
    left_out = components_left_out(adata, index, groupby=groupby) if n_unreachable else []
    if n_unreachable:
        largest = left_out[0]
        notes.append(
            f"{n_unreachable} of {adata.n_obs} cells ({n_unreachable / adata.n_obs:.1%}) lie in {len(left_out)} kNN "
            f"component(s) not connected to the root (largest: {largest['n_cells']} cells of {groupby} cluster(s) "
            f"{', '.join(list(largest['clusters'])[:8])}); their pseudotime is NaN and they are left out of every "
            "correlation")
    for note in notes:
        log.warning(note)
    adata.uns[key_added] = {
        "params": params, "method": "dpt", "n_dcs": int(used_dcs), "n_cells": int(adata.n_obs),
        "n_reachable": int(adata.n_obs - n_unreachable), "n_unreachable": n_unreachable,
        "n_components_left_out": len(left_out), "notes": np.array(notes, dtype=object).astype(str),
        "components_left_out_json": json.dumps(left_out),
    }
    return adata if copy else None


def skip_reason(adata: ad.AnnData, *, root: str | None = "auto", stemness_key: str = Obs.STEMNESS) -> str | None:
    """Why no pseudotime can be computed here, as one sentence for the report, or None when it can.

    The automatic root is chosen from stemness; when the stemness stage computed none (its column is
    there but all NaN: ``stemness.required: false`` on data where no score was possible, e.g. a gene
    panel) and no root is set, there is no start to order cells from. Guessing one would be a silent
    choice, so the stage writes honest empty outputs instead (:func:`skip_pseudotime`). A missing
    stemness column is not this case: :func:`pseudotime` refuses it (the stage was not run).
    """
    kind, _ = parse_root(root)
    if kind != "auto" or stemness_key not in adata.obs.columns:
        return None
    if np.isfinite(adata.obs[stemness_key].to_numpy(dtype=float)).any():
        return None
    return ("Pseudotime was not computed: the stemness stage computed no stemness (stemness.required is false and no "
            "stemness score was possible on these data) and pseudotime.root is 'auto', which roots the trajectory in "
            "the most stem-like cells; set pseudotime.root to 'label:<value>', 'cluster:<id>' or 'cell:<barcode>' to "
            "order the cells from a known start.")


def skip_pseudotime(adata: ad.AnnData, reason: str, *, key_added: str = Obs.PSEUDOTIME, copy: bool = False
                    ) -> ad.AnnData | None:
    """Record that no pseudotime was computed, for ``reason`` (see :func:`skip_reason`); in place.

    Writes ``obs[key_added]`` all NaN and ``obs[key_added + '_reachable']`` all False (the per-cell
    table keeps its columns, so later stages read it as usual and find no time), and ``uns[key_added]``
    with ``skipped`` (the reason), ``notes`` and ``n_cells``; no diffusion map, root or PAGA.
    :func:`pseudotime_info` and :func:`annotations` read it. Returns the AnnData when ``copy``.
    """
    adata = adata.copy() if copy else adata
    adata.obs[key_added] = np.full(adata.n_obs, np.nan)
    adata.obs[f"{key_added}_reachable"] = np.zeros(adata.n_obs, dtype=bool)
    adata.uns[key_added] = {"skipped": str(reason), "method": "dpt", "n_cells": int(adata.n_obs),
                            "notes": np.array([str(reason)], dtype=object).astype(str)}
    log.warning(reason)
    return adata if copy else None


def pseudotime_info(adata: ad.AnnData, *, key: str = Obs.PSEUDOTIME, root_key: str = Uns.PSEUDOTIME_ROOT
                    ) -> dict[str, Any]:
    """JSON-ready summary of a :func:`pseudotime` run (what ``pseudotime/info.json`` and the report hold).

    After :func:`skip_pseudotime` only ``skipped`` (the reason), ``method``, ``n_cells`` and ``notes``."""
    run = adata.uns[key]
    if "skipped" in run:
        return {"skipped": str(run["skipped"]), "method": str(run["method"]), "n_cells": int(run["n_cells"]),
                "notes": [str(n) for n in run["notes"]]}
    root = dict(adata.uns[root_key])
    left_out = json.loads(run["components_left_out_json"])
    return {
        "method": str(run["method"]), "n_dcs": int(run["n_dcs"]), "n_cells": int(run["n_cells"]),
        "n_reachable": int(run["n_reachable"]), "n_unreachable": int(run["n_unreachable"]),
        "stemness_key": str(run["params"].get("stemness_key", Obs.STEMNESS)),
        "notes": [str(n) for n in run["notes"]],
        "root": {"spec": str(root["spec"]), "index": int(root["index"]), "barcode": str(root["barcode"]),
                 "cluster": str(root["cluster"]), "why": str(root["why"]),
                 "candidates": [str(c) for c in root["candidates"]],
                 "excluded": {str(k): int(v) for k, v in dict(root.get("excluded", {})).items()}},
        "components_left_out": left_out[:_MAX_COMPONENTS_LISTED],
        "n_components_left_out": len(left_out),
        "params": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in dict(run["params"]).items()},
    }


# ----------------------------------------------------------------------------- diagnostics

def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Spearman over cells where both are finite; NaN when fewer than 3 such cells or a constant input."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan"), int(ok.sum())
    return float(spearmanr(x[ok], y[ok])[0]), int(ok.sum())


def root_stability(adata: ad.AnnData, candidates: list[str], n_dcs: int) -> tuple[float, float]:
    """Median and minimum pairwise Spearman of the pseudotimes obtained from each candidate root.

    Near 1: the ordering does not hinge on which of the plausible roots was taken.
    """
    idx = adata.obs_names.get_indexer(candidates)
    times = [rescale_pseudotime(dpt_from_root(adata, int(i), n_dcs)) for i in idx]
    rhos = [_spearman(a, b)[0] for a, b in itertools.combinations(times, 2)]
    rhos = [r for r in rhos if np.isfinite(r)]
    return (float(np.median(rhos)), float(np.min(rhos))) if rhos else (float("nan"), float("nan"))


def pseudotime_diagnostics(adata: ad.AnnData, *, key: str = Obs.PSEUDOTIME, stemness_key: str = Obs.STEMNESS,
                           groupby: str = Obs.LEIDEN, truth_key: str | None = None) -> pd.DataFrame:
    """Tidy metric/value/note table: direction, root stability, reachability, the root itself, and
    stem-like clusters that pseudotime places late or cannot reach. Reads what :func:`pseudotime` wrote.

    Correlations use reachable cells only. ``truth_key`` (e.g. the simulator's ``true_pseudotime``)
    adds the agreement with a known time when one exists.
    """
    info = pseudotime_info(adata, key=key)
    pt = adata.obs[key].to_numpy(dtype=float)
    root = info["root"]
    excluded = ", ".join(f"{v} by {k}" for k, v in root["excluded"].items()) or "none"
    rows = [("root_barcode", root["barcode"], root["why"]),
            ("root_cluster", root["cluster"], f"root specification: {root['spec']}"),
            ("root_candidates_excluded", int(sum(root["excluded"].values())),
             f"cells of the root's cluster left out as likely doublets or outliers ({excluded})"),
            ("n_cells", info["n_cells"], ""),
            ("n_unreachable", info["n_unreachable"],
             "cells in kNN components not connected to the root; pseudotime NaN, excluded from correlations"),
            ("n_components_left_out", info["n_components_left_out"],
             "; ".join(f"{c['n_cells']} cells ({', '.join(f'{k}: {v}' for k, v in list(c['clusters'].items())[:6])})"
                       for c in info["components_left_out"][:5]) or "every cell is connected to the root")]
    if stemness_key in adata.obs.columns:
        stemness = adata.obs[stemness_key].to_numpy(dtype=float)
        rho, n = _spearman(pt, stemness)
        rows.append(("spearman_pseudotime_stemness", rho,
                     f"over {n} reachable cells; expected clearly negative (stem-like cells early)"))
        late = late_stem_like_clusters(cluster_summary(adata, groupby=groupby, stemness_key=stemness_key,
                                                       pseudotime_key=key), stemness)
        rows.append(("n_cells_in_late_stem_like_clusters", int(late["n_cells"].sum()),
                     (f"{groupby} cluster(s) {', '.join(late['cluster'])} are stem-like (median {stemness_key} in the top "
                      "quartile) but placed late or unreachable: a distinct stem-like state, not differentiated cells"
                      if len(late) else "every stem-like cluster is early in pseudotime")))
    else:
        rows.append(("spearman_pseudotime_stemness", float("nan"), f"no '{stemness_key}' column"))
    med, worst = root_stability(adata, root["candidates"], info["n_dcs"])
    rows.append(("root_stability_median_spearman", med,
                 f"median pairwise Spearman of pseudotimes from the {len(root['candidates'])} top root candidates; "
                 "near 1 = the ordering does not hinge on the exact root"))
    rows.append(("root_stability_min_spearman", worst, "worst pair of root candidates"))
    if truth_key and truth_key in adata.obs.columns:
        rho, n = _spearman(pt, adata.obs[truth_key].to_numpy(dtype=float))
        rows.append((f"spearman_pseudotime_{truth_key}", rho, f"over {n} reachable cells; agreement with a known time"))
    return pd.DataFrame(rows, columns=["metric", "value", "note"])


def cluster_summary(adata: ad.AnnData, *, groupby: str = Obs.LEIDEN, stemness_key: str = Obs.STEMNESS,
                    pseudotime_key: str = Obs.PSEUDOTIME) -> pd.DataFrame:
    """Per cluster: cells, reachable cells, median pseudotime and median stemness (NaN-aware)."""
    obs = adata.obs
    grouped = obs.groupby(groupby, observed=True)
    out = pd.DataFrame({"n_cells": grouped.size()})
    if pseudotime_key in obs.columns:
        out["n_reachable"] = grouped[f"{pseudotime_key}_reachable"].sum().astype(int)
        out["median_pseudotime"] = grouped[pseudotime_key].median()
    else:
        out["n_reachable"], out["median_pseudotime"] = 0, np.nan
    out["median_stemness"] = (grouped[stemness_key].median() if stemness_key in obs.columns else np.nan)
    out.index = out.index.astype(str)
    return out.rename_axis("cluster").reset_index()


def late_stem_like_clusters(summary: pd.DataFrame, stemness: np.ndarray) -> pd.DataFrame:
    """Clusters that stemness calls stem-like but DPT places late (median > 0.5) or cannot reach.

    Stem-like = median stemness at or above the 75th percentile of all cells. Such a cluster is a
    stem-like state transcriptionally distinct from the root's (e.g. one carrying its own programme):
    distance-based pseudotime cannot put two distinct starting states both early, so the report must
    say so rather than let "late" be read as "differentiated".
    """
    cut = np.nanquantile(stemness, 0.75)
    late = (summary["median_stemness"] >= cut) & (~(summary["median_pseudotime"] <= 0.5))
    return summary[late]


# ----------------------------------------------------------------------------- within each tumour

# Per-sample table (tables/pseudotime_by_sample.tsv, info.json 'per_sample'), in this order.
BY_SAMPLE_COLUMNS = ["sample", "n_malignant", "n_csc_like", "n_ordered", "n_left_out", "root_barcode",
                     "spearman_stemness", "auroc_csc_like_early", "median_pseudotime_csc_like",
                     "median_pseudotime_other", "root_stability_median_spearman", "note"]


def _piece(adata: ad.AnnData, cells: np.ndarray, columns: list[str], graph: str = "rebuilt",
           random_state: int = 0) -> ad.AnnData:
    """``cells`` with the obs the root rule reads and a kNN graph: the shared graph restricted to them
    (``graph='restricted'``: edges to other cells dropped), or one built among them alone
    (``'rebuilt'``) in the representation and with the neighbours and metric the shared graph used."""
    obs = adata.obs.iloc[cells][[c for c in columns if c in adata.obs.columns]].copy()
    if graph == "restricted":
        conn = sp.csr_matrix(adata.obsp["connectivities"])[cells][:, cells]
        dist = sp.csr_matrix(adata.obsp["distances"])[cells][:, cells]
        return ad.AnnData(obs=obs, obsp={"connectivities": conn, "distances": dist},
                          uns={"neighbors": dict(adata.uns["neighbors"])})
    import scanpy as sc

    shared = dict(adata.uns["neighbors"].get("params", {}))
    rep = shared.get("use_rep") or Obsm.PCA
    rep = rep if rep in adata.obsm else Obsm.PCA
    x = np.asarray(adata.obsm[rep])[cells]
    n_pcs = shared.get("n_pcs")
    x = x[:, :n_pcs] if n_pcs else x
    piece = ad.AnnData(obs=obs, obsm={"X_rep": x})
    sc.pp.neighbors(piece, n_neighbors=min(int(shared.get("n_neighbors", 15)), cells.size - 1), use_rep="X_rep",
                    metric=shared.get("metric", "euclidean"), random_state=random_state)
    return piece


def _order_piece(adata: ad.AnnData, cells: np.ndarray, *, name: str, stemness_key: str, csc_key: str,
                 min_cells: int, n_dcs: int, top_fraction: float, n_candidates: int, doublet_key: str,
                 doublet_quantile: float, outlier_nmads: float, random_state: int, graph: str = "rebuilt"
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """DPT over one sample's malignant cells: 0-1 pseudotime for ``cells`` (NaN where not ordered) and
    the record of how (root, why, components left out, stability, note)."""
    import scanpy as sc

    out = np.full(cells.size, np.nan)
    csc = adata.obs[csc_key].to_numpy(dtype=bool)[cells] if csc_key in adata.obs.columns else np.zeros(cells.size, bool)
    record: dict[str, Any] = {"sample": name, "n_malignant": int(cells.size), "n_csc_like": int(csc.sum()),
                              "n_ordered": 0, "n_left_out": int(cells.size), "root_barcode": "", "why": "",
                              "candidates": [], "components_left_out": [], "root_stability_median_spearman":
                              float("nan"), "note": ""}
    if cells.size == 0:
        record["note"] = "no malignant cell: nothing to order"
        return out, record
    if cells.size < min_cells:
        record["note"] = (f"{cells.size} malignant cells, fewer than pseudotime.malignant_min_cells={min_cells}: "
                          "not ordered")
        return out, record
    if not csc.any():
        record["note"] = "no CSC-like cell to root the sample's trajectory in: not ordered"
        return out, record
    piece = _piece(adata, cells, [stemness_key, csc_key, doublet_key, Obs.N_GENES, Obs.TOTAL_COUNTS, Obs.LEIDEN],
                   graph, random_state)
    comp = _graph_components(piece)
    # the component holding most CSC-like cells is ordered (one root, as over all cells); the others are left out
    target = int(np.bincount(comp[csc], minlength=comp.max() + 1).argmax())
    inside = np.flatnonzero(comp == target)
    for c in np.unique(comp[comp != target]):
        members = comp == c
        record["components_left_out"].append({"n_cells": int(members.sum()), "n_csc_like": int((members & csc).sum())})
    record["components_left_out"].sort(key=lambda d: -d["n_cells"])
    if inside.size < min_cells:
        record["note"] = (f"its CSC-like cells lie in a kNN component of {inside.size} cells (the sample's malignant "
                          f"cells fall into {comp.max() + 1} components on their {graph} kNN graph), fewer than "
                          f"pseudotime.malignant_min_cells={min_cells}: not ordered")
        return out, record
    sub = piece[inside].copy()
    used = min(n_dcs, sub.n_obs - 2)
    sc.tl.diffmap(sub, n_comps=used, random_state=random_state)
    stem = sub.obs[stemness_key].to_numpy(dtype=float) if stemness_key in sub.obs.columns else None
    members = np.flatnonzero(sub.obs[csc_key].to_numpy(dtype=bool))
    lead = f"Sample {name}: root among its {members.size} CSC-like malignant cells"
    root, why, candidates, _ = _root_among(sub, members, lead, stem, stemness_key=stemness_key,
                                           top_fraction=top_fraction, n_candidates=n_candidates,
                                           doublet_key=doublet_key, doublet_quantile=doublet_quantile,
                                           outlier_nmads=outlier_nmads, n_dcs=used)
    raw = dpt_from_root(sub, root, used)
    out[inside] = rescale_pseudotime(raw)
    candidates = [str(b) for b in sub.obs_names[candidates[:max(n_candidates, 1)]]]
    med, _ = root_stability(sub, candidates, used)
    n_ordered = int(np.isfinite(out).sum())
    record.update(n_ordered=n_ordered, n_left_out=int(cells.size - n_ordered), root_barcode=str(sub.obs_names[root]),
                  why=why, candidates=candidates, root_stability_median_spearman=med)
    if record["components_left_out"]:
        record["note"] = (f"{cells.size - inside.size} of its malignant cells lie in {len(record['components_left_out'])} "
                          f"other component(s) of their {graph} kNN graph, with no edge to the root's: pseudotime NaN")
    return out, record


def malignant_pseudotime(adata: ad.AnnData, *, groupby: str = Obs.SAMPLE, malignant_key: str = Obs.MALIGNANT,
                         csc_key: str = Obs.CSC_LIKE, stemness_key: str = Obs.STEMNESS, min_cells: int = 30,
                         n_dcs: int = 10, root_top_fraction: float = 0.05, n_root_candidates: int = 5,
                         root_doublet_quantile: float = 0.9, root_outlier_nmads: float = 1.25,
                         doublet_key: str = Obs.DOUBLET_SCORE, graph: str = "rebuilt", random_state: int = 0,
                         key_added: str = Obs.PSEUDOTIME_MALIGNANT, copy: bool = False) -> ad.AnnData | None:
    """Diffusion pseudotime within each tumour: each sample's malignant cells, rooted in its CSC-like cells; in place.

    Why: over all cells, one root orders every tumour and the normal cells along one axis, so a patient's
    position reflects how far its cells lie from the root patient's, not how its own cells differentiate
    (issue 15). Here each sample's malignant cells are one piece with its own kNN graph, a diffusion map
    of that piece, and DPT from a root chosen among the sample's ``csc_key`` cells by the rule of
    :func:`choose_root` (steps 2-4: their largest kNN component, likely doublets and outliers left out,
    the most stem-like region by kNN-averaged ``stemness_key``, its tip in diffusion space). When the
    piece falls into several kNN components, the one holding most CSC-like cells is ordered and the
    others are left out (NaN), as over all cells.

    ``graph``: ``'rebuilt'`` (default) builds each piece's kNN graph among its own cells, in the
    representation, neighbour count and metric of the clustering's graph (``uns['neighbors']['params']``,
    e.g. Harmony-corrected PCs); ``'restricted'`` keeps only the clustering's edges between the piece's
    cells. Why rebuilt: Harmony connects like cells of different patients, so restricting its graph to one
    patient cuts exactly those edges. Measured on ``simulate_tumour(1500, 2000)`` (3 patients, seeds 0-2,
    malignant = truth, real stemness and CSC-like calls): Spearman with the planted time per patient
    0.898-0.978 (median 0.969) rebuilt vs 0.881-0.966 (median 0.918) restricted, and restricted left one
    patient (seed 1, P1: 8 % stem-like) unordered, its CSC-like cells cut off in a 12-cell component.

    Writes
    - ``obs[key_added]``: 0-1 within each sample (0 = its root); NaN for normal cells, for samples with
      fewer than ``min_cells`` malignant cells or no CSC-like cell, and for malignant cells not connected
      to the root. Times are comparable within a sample, not between samples.
    - ``uns[key_added]``: ``params``, ``notes`` (sentences), ``per_sample_json`` (JSON text, one record per
      sample: cells, CSC-like cells, cells ordered, root barcode, why, candidates, components left out,
      root stability, note); :func:`malignant_pseudotime_table` reads it.

    Without ``obs[malignant_key]`` every cell counts as malignant (a note says so). Returns the AnnData
    when ``copy``, else None.
    """
    adata = adata.copy() if copy else adata
    _require_graph(adata)
    if graph not in MALIGNANT_GRAPHS:
        raise MetastemError(f"pseudotime.malignant_graph '{graph}' is not understood",
                            fix=f"use one of {', '.join(MALIGNANT_GRAPHS)}")
    notes = []
    if malignant_key in adata.obs.columns:
        malignant = adata.obs[malignant_key].fillna(False).to_numpy(dtype=bool)
    else:
        malignant = np.ones(adata.n_obs, dtype=bool)
        notes.append(f"no obs['{malignant_key}']: every cell is treated as malignant")
    if groupby in adata.obs.columns:
        groups = adata.obs[groupby].astype(str).to_numpy()
    else:
        groups = np.full(adata.n_obs, "all")
        notes.append(f"no obs['{groupby}']: all malignant cells are one piece")
    if csc_key not in adata.obs.columns or not adata.obs[csc_key].fillna(False).astype(bool).any():
        notes.append(f"no CSC-like cell (obs['{csc_key}']) in any sample: no pseudotime within the malignant "
                     "compartment")
    values = np.full(adata.n_obs, np.nan)
    records = []
    for name in sorted(pd.unique(groups)):  # every sample, also one without malignant cells (said so)
        cells = np.flatnonzero(malignant & (groups == name))
        values[cells], record = _order_piece(
            adata, cells, name=str(name), stemness_key=stemness_key, csc_key=csc_key, min_cells=min_cells,
            n_dcs=n_dcs, top_fraction=root_top_fraction, n_candidates=n_root_candidates, doublet_key=doublet_key,
            doublet_quantile=root_doublet_quantile, outlier_nmads=root_outlier_nmads, random_state=random_state,
            graph=graph)
        records.append(record)
    if not malignant.any():
        notes.append("no malignant cell: no pseudotime within the malignant compartment")
    not_ordered = [r["sample"] for r in records if r["n_ordered"] == 0]
    if not_ordered and len(not_ordered) < len(records):
        notes.append(f"pseudotime within malignant cells not computed for sample(s) {', '.join(not_ordered)} "
                     "(see the per-sample table)")
    for note in notes:
        log.warning(note)
    adata.obs[key_added] = values
    params = {"groupby": groupby, "malignant_key": malignant_key, "csc_key": csc_key, "stemness_key": stemness_key,
              "min_cells": min_cells, "n_dcs": n_dcs, "root_top_fraction": root_top_fraction,
              "n_root_candidates": n_root_candidates, "root_doublet_quantile": root_doublet_quantile,
              "root_outlier_nmads": root_outlier_nmads, "doublet_key": doublet_key, "graph": graph,
              "random_state": random_state}
    adata.uns[key_added] = {"params": params, "notes": np.array(notes, dtype=object).astype(str),
                            "per_sample_json": json.dumps(records)}
    return adata if copy else None


def malignant_pseudotime_table(adata: ad.AnnData, *, key: str = Obs.PSEUDOTIME_MALIGNANT,
                               stemness_key: str = Obs.STEMNESS, truth_key: str | None = None) -> pd.DataFrame:
    """One row per sample: what :func:`malignant_pseudotime` did and how the ordering agrees with stemness.

    ``spearman_stemness`` (over the sample's ordered cells; expected negative: stem-like cells early),
    ``auroc_csc_like_early`` (probability that a CSC-like cell of the sample has an earlier pseudotime than
    one of its other ordered malignant cells; 0.5 = no difference, 1 = every CSC-like cell earlier), the
    median pseudotime of both, root stability (median pairwise Spearman of the pseudotimes from the top
    root candidates); with ``truth_key`` (the simulator's ``true_pseudotime``) also
    ``spearman_<truth_key>``. Columns ``BY_SAMPLE_COLUMNS`` (+ the truth column before ``note``).
    """
    run = adata.uns[key]
    records = json.loads(run["per_sample_json"])
    params = dict(run["params"])
    pt = adata.obs[key].to_numpy(dtype=float)
    groups = (adata.obs[params["groupby"]].astype(str).to_numpy() if params["groupby"] in adata.obs.columns
              else np.full(adata.n_obs, "all"))
    csc = (adata.obs[params["csc_key"]].fillna(False).to_numpy(dtype=bool) if params["csc_key"] in adata.obs.columns
           else np.zeros(adata.n_obs, dtype=bool))
    stem = adata.obs[stemness_key].to_numpy(dtype=float) if stemness_key in adata.obs.columns else None
    truth = (adata.obs[truth_key].to_numpy(dtype=float) if truth_key and truth_key in adata.obs.columns else None)
    rows = []
    for r in records:
        here = (groups == r["sample"]) & np.isfinite(pt)
        row = {c: r.get(c) for c in BY_SAMPLE_COLUMNS if c in r}
        row["spearman_stemness"] = _spearman(pt[here], stem[here])[0] if stem is not None else float("nan")
        a, b = pt[here & csc], pt[here & ~csc]
        if a.size and b.size:
            from scipy.stats import mannwhitneyu

            row["auroc_csc_like_early"] = float(mannwhitneyu(b, a).statistic / (a.size * b.size))
        else:
            row["auroc_csc_like_early"] = float("nan")
        row["median_pseudotime_csc_like"] = float(np.median(a)) if a.size else float("nan")
        row["median_pseudotime_other"] = float(np.median(b)) if b.size else float("nan")
        if truth is not None:
            row[f"spearman_{truth_key}"] = _spearman(pt[here], truth[here])[0]
        rows.append(row)
    columns = BY_SAMPLE_COLUMNS[:-1] + ([f"spearman_{truth_key}"] if truth is not None else []) + ["note"]
    return pd.DataFrame(rows, columns=columns)


def malignant_pseudotime_info(adata: ad.AnnData, table: pd.DataFrame, *, key: str = Obs.PSEUDOTIME_MALIGNANT
                              ) -> dict[str, Any]:
    """JSON-ready summary for ``info.json``: ``per_sample`` (the table's rows, with each root's ``why``),
    ``notes``, ``params`` and ``n_samples_ordered``."""
    run = adata.uns[key]
    why = {r["sample"]: r for r in json.loads(run["per_sample_json"])}
    per_sample = _records(table)
    for row in per_sample:
        rec = why.get(str(row["sample"]), {})
        row["root_why"] = rec.get("why", "")
        row["components_left_out"] = rec.get("components_left_out", [])[:_MAX_COMPONENTS_LISTED]
    return {"per_sample": per_sample, "n_samples": len(per_sample),
            "n_samples_ordered": int(sum(1 for r in per_sample if (r["n_ordered"] or 0) > 0)),
            "n_cells_ordered": int(np.isfinite(adata.obs[key].to_numpy(dtype=float)).sum()),
            "notes": [str(n) for n in run["notes"]],
            "params": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in dict(run["params"]).items()}}


# ----------------------------------------------------------------------------- PAGA

def n_inter_cluster_edges(adata: ad.AnnData, groupby: str = Obs.LEIDEN) -> int:
    """kNN edges joining two different clusters. Zero (disjoint cell types, or one cluster) is where
    ``sc.tl.paga`` fails (igraph/scipy: 'mismatching number of index arrays', igraph issue #871)."""
    codes = adata.obs[groupby].cat.codes.to_numpy()
    m = sp.coo_matrix(adata.obsp["distances"])
    return int((codes[m.row] != codes[m.col]).sum())


def _layout_without_edges(adata: ad.AnnData, groupby: str) -> np.ndarray:
    """PAGA positions when no cluster connects to another: each cluster at its median on the UMAP
    (as ``sc.pl.paga_compare`` places nodes), or on a circle when there is no UMAP."""
    k = len(adata.obs[groupby].cat.categories)
    if Obsm.UMAP in adata.obsm:
        xy = pd.DataFrame(np.asarray(adata.obsm[Obsm.UMAP])[:, :2], index=adata.obs_names)
        pos = xy.groupby(adata.obs[groupby].to_numpy(), observed=False).median()
        return pos.reindex(adata.obs[groupby].cat.categories).fillna(0).to_numpy(dtype=float)
    angle = 2 * np.pi * np.arange(k) / max(k, 1)
    return np.column_stack([np.cos(angle), np.sin(angle)])


def paga(adata: ad.AnnData, *, groupby: str = Obs.LEIDEN, paga_umap_max_cells: int = 5000, min_dist: float = 0.5,
         random_state: int = 0, copy: bool = False) -> ad.AnnData | None:
    """PAGA between clusters, its layout, and a PAGA-initialised UMAP for datasets up to
    ``paga_umap_max_cells`` cells; in place.

    Writes ``uns['paga']`` in scanpy's layout (``connectivities``, ``connectivities_tree``, ``groups``,
    ``pos``), so ``sc.pl.paga`` reads it, and ``obsm['X_umap_paga']``: UMAP started from the PAGA layout
    keeps the coarse topology of the abstracted graph, which spectral initialisation can tear (its cost
    is about the clustering's UMAP, hence the cell limit; 0 never draws it).

    Disjoint cell types (kNN components with no edge between any two clusters) make ``sc.tl.paga`` fail
    inside igraph; then the abstracted graph is what it is, no edge at all: zero connectivities and
    tree, each cluster placed at its median on the UMAP. (With such a graph ``sc.pl.paga``'s own layout
    also fails in scanpy 1.11; pass ``pos=adata.uns['paga']['pos']``.) Components that do have
    inter-cluster edges get scanpy's PAGA, with no edge between components.
    Returns the AnnData when ``copy``, else None.
    """
    import scanpy as sc

    adata = adata.copy() if copy else adata
    _require_graph(adata)
    if not isinstance(adata.obs[groupby].dtype, pd.CategoricalDtype):
        adata.obs[groupby] = adata.obs[groupby].astype(str).astype("category")
    k = len(adata.obs[groupby].cat.categories)
    if n_inter_cluster_edges(adata, groupby) == 0:
        adata.uns[Uns.PAGA] = {"connectivities": sp.csr_matrix((k, k)), "connectivities_tree": sp.csr_matrix((k, k)),
                               "groups": groupby, "pos": _layout_without_edges(adata, groupby)}
    else:
        sc.tl.paga(adata, groups=groupby)
        sc.pl.paga(adata, plot=False, random_state=random_state, add_pos=True)
    if 0 < adata.n_obs <= paga_umap_max_cells:
        sc.tl.umap(adata, init_pos="paga", min_dist=min_dist, random_state=random_state, key_added=Obsm.UMAP_PAGA)
    return adata if copy else None


def paga_connectivity_table(adata: ad.AnnData) -> pd.DataFrame:
    """Every cluster pair with non-zero PAGA connectivity, strongest first; ``in_tree`` marks PAGA's tree."""
    names = np.asarray(adata.obs[adata.uns[Uns.PAGA]["groups"]].cat.categories.astype(str))
    conn = sp.triu(sp.csr_matrix(adata.uns[Uns.PAGA]["connectivities"]), k=1).tocoo()
    tree = sp.csr_matrix(adata.uns[Uns.PAGA]["connectivities_tree"])
    tree = tree + tree.T
    df = pd.DataFrame({"source": names[conn.row], "target": names[conn.col], "connectivity": conn.data,
                       "in_tree": np.asarray(tree[conn.row, conn.col]).ravel() > 0 if conn.nnz else np.zeros(0, bool)})
    return df.sort_values("connectivity", ascending=False, kind="stable").reset_index(drop=True)


def paga_summary(adata: ad.AnnData, *, stemness_key: str = Obs.STEMNESS, pseudotime_key: str = Obs.PSEUDOTIME
                 ) -> dict[str, Any]:
    """What the report and the PAGA figure need, JSON-ready: nodes (cluster, size, position, median
    pseudotime and stemness, kNN component), edges (connectivity, whether in PAGA's spanning tree), the
    number of kNN components, and a note when no two clusters are connected."""
    groupby = adata.uns[Uns.PAGA]["groups"]
    nodes = cluster_summary(adata, groupby=groupby, stemness_key=stemness_key, pseudotime_key=pseudotime_key)
    names = list(adata.obs[groupby].cat.categories.astype(str))
    nodes = nodes.set_index("cluster").reindex(names).reset_index()
    pos = np.asarray(adata.uns[Uns.PAGA]["pos"], dtype=float)
    nodes["x"], nodes["y"] = pos[:, 0], pos[:, 1]
    comp = pd.Series(_graph_components(adata), index=adata.obs_names)
    nodes["component"] = [int(comp[adata.obs[groupby].astype(str).to_numpy() == n].mode().iloc[0]) for n in names]
    edges = paga_connectivity_table(adata)
    n_components = int(comp.nunique())
    note = ""
    if edges.empty and len(names) > 1:
        note = (f"no kNN edge joins any two of the {len(names)} clusters ({n_components} kNN components): the PAGA "
                "graph has no edges, each cluster is its own island")
    elif n_components > 1:
        note = f"the kNN graph has {n_components} components: PAGA has no edge between them"
    return {"groupby": groupby, "edge_threshold": PAGA_EDGE_THRESHOLD, "umap_paga": Obsm.UMAP_PAGA in adata.obsm,
            "n_components": n_components, "note": note, "nodes": _records(nodes), "edges": _records(edges)}


def annotations(adata: ad.AnnData, *, key: str = Obs.PSEUDOTIME) -> ad.AnnData:
    """This stage's results as an AnnData without X (n_obs x 0), for ``pseudotime/annotations.h5ad``.

    Holds ``obs[key]``, ``obs[key + '_reachable']`` (and ``obs['pseudotime_malignant']`` when computed),
    ``obsm['X_diffmap']``, ``uns['paga']``
    (connectivities, connectivities_tree, groups, pos), ``uns['iroot']``, ``uns['diffmap_evals']``:
    what the final AnnData needs for ``sc.pl.paga`` and ``sc.tl.dpt`` (docs/CONTRACTS.md, DAG).
    After :func:`skip_pseudotime`: the two obs columns only (NaN, False), still a valid file to join.
    """
    obs = adata.obs[[key, f"{key}_reachable"] + [c for c in (Obs.PSEUDOTIME_MALIGNANT,) if c in adata.obs]].copy()
    if "skipped" in adata.uns.get(key, {}):  # nothing computed: the obs columns (NaN / False) only
        return ad.AnnData(obs=obs)
    paga_uns = {k: adata.uns[Uns.PAGA][k] for k in ("connectivities", "connectivities_tree", "groups", "pos")
                if k in adata.uns[Uns.PAGA]}
    paga_uns["connectivities"] = sp.csr_matrix(paga_uns["connectivities"])
    paga_uns["connectivities_tree"] = sp.csr_matrix(paga_uns["connectivities_tree"])
    return ad.AnnData(obs=obs,
                      obsm={Obsm.DIFFMAP: np.asarray(adata.obsm[Obsm.DIFFMAP])},
                      uns={Uns.PAGA: paga_uns, Uns.IROOT: int(adata.uns[Uns.IROOT]),
                           Uns.DIFFMAP_EVALS: np.asarray(adata.uns[Uns.DIFFMAP_EVALS])})


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain-Python dicts (NaN -> None) so that json.dumps accepts them."""
    clean = df.astype(object).where(df.notna(), None)
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
            for row in clean.to_dict("records")]
