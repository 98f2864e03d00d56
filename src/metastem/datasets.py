"""Datasets (``ms.datasets``): the built-in simulated tumour, with its ground truth in ``obs``.

Nothing is downloaded: real example data come from the packages that ship them (e.g.
``scanpy.datasets.pbmc68k_reduced()``, infercnvpy's oligodendroglioma example).
"""
from __future__ import annotations

import anndata as ad

from metastem.simulate import simulate_tumour

__all__ = ["demo", "simulate_tumour"]


def demo(n_cells: int = 3000, n_genes: int = 4000, *, seed: int = 0, **kwargs) -> ad.AnnData:
    """The workflow's demo tumour (raw UMI counts): three patients, malignant cells with planted copy-number
    changes and a stem-like compartment of a different size in each patient, normal immune, stromal and
    endothelial cells, doublets and low-quality cells. Truth in ``obs['true_*']``; see
    :func:`metastem.simulate.simulate_tumour` for every parameter."""
    return simulate_tumour(n_cells, n_genes, seed=seed, **kwargs)
