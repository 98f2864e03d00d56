"""metastem: cancer-stem-cell signatures in single-cell RNA-seq, as plain functions on AnnData.

``import metastem as ms`` gives scanpy-shaped namespaces, loaded on first use (so that Snakemake, which
imports only the configuration helpers, does not pay for scanpy and matplotlib):

- ``ms.io``: reading any supported input into one validated AnnData (``ms.io.read``)
- ``ms.pp``: QC metrics, per-sample thresholds, doublets, normalisation
- ``ms.tl``: stemness, CSC-like calls, pseudotime root and pseudotime, pathway scores, niche signalling
- ``ms.pl``: every figure of the report, drawn on an ``ax`` or returned, saved only when asked
- ``ms.datasets``: the built-in tumour simulator

Nothing here changes other libraries on import. The Snakemake job wrapper (:mod:`metastem.smk`) turns
on numba's on-disk cache for pynndescent/umap (:func:`metastem.enable_numba_cache`); a notebook may too.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from metastem.errors import MetastemError

__version__ = "0.2.0"
__all__ = ["MetastemError", "__version__", "datasets", "enable_numba_cache", "io", "pl", "pp", "tl"]

_SUBMODULES = ("datasets", "io", "pl", "pp", "tl")

if TYPE_CHECKING:  # pragma: no cover
    from metastem import datasets, io, pl, pp, tl  # noqa: F401


def enable_numba_cache() -> None:
    """Compile pynndescent's and umap's numba functions once per machine and reuse them in later processes.

    Opt-in: it makes ``numba.njit`` default to ``cache=True`` for functions defined afterwards, so call it
    before scanpy first builds a kNN graph. Every Snakemake job of the workflow calls it.
    """
    from metastem import _numba_cache

    _numba_cache.enable()


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"metastem.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'metastem' has no attribute '{name}'")
