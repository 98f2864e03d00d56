"""Tools (``ms.tl``): embedding and clusters, malignant cells, stemness, CSC-like calls, pseudotime,
pathway statistics and niche signalling — each annotating the AnnData in place under ``key_added``.

The order a tumour analysis follows (the workflow's stages)::

    ms.tl.cluster(adata)            # HVG, PCA (+ Harmony across samples), kNN graph, UMAP, Leiden
    ms.tl.infer_malignant(adata)    # copy-number profiles against reference normal cells
    ms.tl.score_stemness(adata)     # consensus stemness and how sure its direction is
    ms.tl.call_csc_like(adata)      # per sample, among malignant cells
    ms.tl.pseudotime(adata)         # diffusion pseudotime rooted in stemness
    ms.tl.score_pathways(adata)     # CSC-like vs other malignant cells against matched random sets
    ms.tl.niche_interactions(adata) # ligand-receptor pairs between CSC-like cells and their niche
"""
from __future__ import annotations

import json

import anndata as ad
import pandas as pd

from metastem import cluster as _cluster
from metastem._keys import Obs
from metastem.cnv import infer_malignant, malignant_summary
from metastem.csc import call_csc_like, csc_summary
from metastem.integration import harmony, sample_mixing
from metastem.niche import interactions_table, niche_interactions
from metastem.pathways import score_pathways
from metastem.pseudotime import choose_root, paga, pseudotime, pseudotime_diagnostics
from metastem.stemness import score_cytotrace, score_stemness

__all__ = ["call_csc_like", "choose_root", "cluster", "csc_summary", "harmony", "infer_malignant",
           "interactions_table", "malignant_summary", "markers", "niche_interactions", "paga", "pseudotime",
           "pseudotime_diagnostics", "sample_mixing", "score_cytotrace", "score_pathways", "score_stemness"]


def cluster(adata: ad.AnnData, *, n_top_genes: int = 2000, n_pcs: int = 30, n_neighbors: int = 15,
            resolution: float = 1.0, umap_min_dist: float = 0.5, umap_n_epochs: int | None = None,
            integration: str = "harmony",
            batch_key: str = Obs.SAMPLE, harmony_theta: float = 2.0, harmony_max_iter: int = 10, seed: int = 0,
            key_added: str = Obs.LEIDEN) -> list[str]:
    """Variable genes, PCA, the kNN graph, UMAP and Leiden clusters, in place.

    Why one graph: clustering, the stemness diffusion and pseudotime all read the same kNN graph, so
    with several samples (``obs[batch_key]``) and ``integration='harmony'`` genes are chosen across
    samples and the graph is built on Harmony-corrected PCs: like cells of different patients connect.

    Writes ``var['highly_variable']``, ``obsm['X_pca']`` (+ ``'X_pca_harmony'``), ``obsp['connectivities',
    'distances']``, ``obsm['X_umap']``, ``obs[key_added]`` (Leiden), ``obs['knn_component']`` (graph
    components, largest '0') and ``uns['cluster']`` (the parameters, JSON text). Returns the notes
    (e.g. a disconnected graph) that a report should show.
    """
    params = {k: v for k, v in locals().items() if k not in ("adata", "seed", "key_added")}
    notes = _cluster.embed_and_cluster(adata, params, seed=seed)
    if key_added != Obs.LEIDEN:
        adata.obs[key_added] = adata.obs.pop(Obs.LEIDEN)
    adata.uns["cluster"] = {"params": json.dumps({**params, "seed": seed})}
    return notes


def markers(adata: ad.AnnData, *, n_markers: int = 25, markers_max_cells: int = 1000, seed: int = 0,
            key_added: str = "rank_genes_groups") -> pd.DataFrame:
    """Wilcoxon marker genes of every Leiden cluster against the rest; returns the tidy table.

    Each cluster is subsampled (seeded) to at most ``markers_max_cells`` cells: the test's cost grows
    with cells times genes while a few hundred cells per cluster rank its markers stably. scanpy's result
    is kept in ``uns[key_added]``, so ``sc.pl.rank_genes_groups_dotplot`` works on the object.
    """
    return _cluster.marker_genes(adata, n_markers, max_cells_per_cluster=markers_max_cells, seed=seed,
                                 key_added=key_added)
