"""metastem: cancer-stem-cell signatures in single-cell RNA-seq.

Analysis logic as plain functions on AnnData; the Snakemake rules in ``workflow/`` call them.
"""
from metastem import _numba_cache

# Before anything imports pynndescent or umap: compile once, reuse in every later Snakemake job.
_numba_cache.enable()

from metastem.errors import MetastemError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["MetastemError", "__version__"]
