"""Plots (``ms.pl``): every figure of the report, for a notebook as for the workflow.

Each function draws on ``ax`` where it has a single panel, returns the Figure with ``return_fig=True``
and writes a file only when ``save`` names one (atomically, so a half-written PNG never looks done).
"""
from __future__ import annotations

import os

import anndata as ad
import pandas as pd

from metastem._keys import Obs, Obsm
from metastem.cnv import plot_cnv_heatmap as cnv_heatmap
from metastem.cnv import plot_cnv_score_umap as cnv_score_umap
from metastem.integration import plot_integration as integration
from metastem.integration import plot_sample_mixing as sample_mixing
from metastem.niche import plot_niche as niche
from metastem.plots import plot_qc_metrics as qc_metrics
from metastem.plots import plot_qc_metrics_by_sample as qc_metrics_by_sample
from metastem.plots_pathways import plot_cluster_heatmap as pathway_heatmap
from metastem.plots_pathways import plot_gsea_top as gsea_top
from metastem.plots_pathways import plot_pathway_effects as pathway_effects
from metastem.plots_pathways import plot_pseudotime_trends as pathway_trends
from metastem.plots_pseudotime import plot_paga_graph as paga
from metastem.plots_pseudotime import plot_pseudotime_embedding as pseudotime
from metastem.plots_pseudotime import plot_stemness_along_pseudotime as stemness_along_pseudotime
from metastem.plots_stemness import plot_cluster_stemness as stemness_clusters
from metastem.plots_stemness import plot_stemness_by_label as stemness_by_label
from metastem.plots_stemness import plot_stemness_vs_gene_counts as stemness_vs_gene_counts
from metastem.plots_stemness import plot_umap_stemness as stemness_umap

__all__ = ["clusters", "cnv_heatmap", "cnv_score_umap", "gsea_top", "integration", "niche", "paga",
           "pathway_effects", "pathway_heatmap", "pathway_trends", "pseudotime", "qc_metrics",
           "qc_metrics_by_sample", "sample_mixing", "stemness_along_pseudotime", "stemness_by_label",
           "stemness_clusters", "stemness_umap", "stemness_vs_gene_counts"]


def clusters(adata: ad.AnnData, *, groupby: str = Obs.LEIDEN, labels_key: str | None = None,
             basis: str = Obsm.UMAP, save: str | os.PathLike | None = None, return_fig: bool = False):
    """The embedding coloured by cluster, and beside it by known labels when ``labels_key`` names a column."""
    from metastem.plots import plot_clusters

    labels: pd.Series | None = adata.obs[labels_key] if labels_key else None
    return plot_clusters(adata.obsm[basis], adata.obs[groupby], save, labels=labels, return_fig=return_fig)
