"""Preprocessing (``ms.pp``): QC metrics, per-sample thresholds, doublets, filtering, normalisation.

Functions take the AnnData first, change it in place and keep their defaults in the signature; the
workflow's config schema holds the same defaults (tests/test_api.py checks they agree).
"""
from __future__ import annotations

import json

import anndata as ad
import pandas as pd

from metastem import cluster as _cluster
from metastem import qc as _qc
from metastem._keys import Obs
from metastem.qc import qc_summary_table, remove_spike_ins

__all__ = ["normalize", "qc", "qc_summary_table", "remove_spike_ins"]


def qc(adata: ad.AnnData, *, species: str = "human", values: str = "counts", nmads_counts: float = 5,
       nmads_genes: float = 5, nmads_mito: float = 3, max_pct_mito: float | None = 20,
       max_pct_hb: float | None = None, min_genes: int | None = None, max_genes: int | None = None,
       min_counts: int | None = None, max_counts: int | None = None, min_cells_per_gene: int = 3,
       doublets: bool = True, doublet_rate: float = 0.05, doublet_sim_ratio: float = 1.0, min_cells: int = 50,
       sample_key: str = Obs.SAMPLE, seed: int = 0, key_added: str = "qc") -> pd.DataFrame:
    """Flag and remove low-quality cells and doublets, then rarely detected genes; in place.

    Why per sample: sequencing depth and quality differ between samples, so the adaptive thresholds
    (``nmads_*`` median absolute deviations of log counts, log genes and % mitochondrial counts, with the
    hard ceiling ``max_pct_mito``) and scrublet (a doublet is two cells of one sample) run within each
    ``obs[sample_key]`` group. ERCC spike-ins are removed first and kept as ``obs['pct_counts_ercc']``.
    The filter runs in X's own arrays, so X is never held twice (the largest object of a large dataset).

    Writes ``obs``: ``n_genes_by_counts``, ``total_counts``, ``pct_counts_mt``, ``pct_counts_ribo``,
    ``pct_counts_hb``, ``doublet_score`` (counts only); ``uns[key_added]``: ``params`` and ``summary``
    (thresholds, cells removed per reason, per-sample figures, notes), both as JSON text so the file stays
    h5ad-writable.

    Returns
    -------
    The per-cell table of every input cell (metrics, one column per removal reason, ``kept``), for plots
    such as :func:`metastem.pl.qc_metrics`.
    """
    params = {k: v for k, v in locals().items() if k not in ("adata", "species", "values", "sample_key", "seed",
                                                             "key_added")}
    _, cells, info = _qc.run_qc(adata, params, values=values, species=species, seed=seed, sample_key=sample_key)
    adata.uns[key_added] = {"params": json.dumps({**params, "species": species, "values": values,
                                                  "sample_key": sample_key, "seed": seed}),
                            "summary": json.dumps(info, default=str)}
    return cells


def normalize(adata: ad.AnnData, *, values: str = "counts", target_sum: float = 10000) -> str:
    """Bring X to natural-log-normalised values in place and return the sentence for a methods section.

    Counts are scaled to ``target_sum`` per cell and log1p-transformed; 'normalized' values are only
    log1p-transformed; 'log' values are used as given, rescaled to natural-log units when their base
    (``uns['log1p']['base']``, detected at read time) is 2 or 10, so that every later step un-logs alike.
    """
    return _cluster.normalize(adata, values=values, target_sum=target_sum)
