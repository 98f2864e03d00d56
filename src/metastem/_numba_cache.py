"""Persistent numba compilation across processes.

Every Snakemake job is a fresh Python process, and pynndescent/umap compile dozens of numba functions
on first use (tens of seconds per job). Most of them are declared without ``cache=True``, so numba's
on-disk cache (``NUMBA_CACHE_DIR``) never applies. Defaulting ``cache=True`` for functions defined
after this module is imported lets the second and later jobs load the compiled code instead.
Functions numba cannot cache (dynamic globals) are compiled as before.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path


def enable() -> None:
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "metastem" / "numba"))
    import numba
    from numba.core.errors import NumbaWarning

    if getattr(numba, "_metastem_cache_patch", False):
        return

    def with_cache(decorator):
        @functools.wraps(decorator)
        def wrapped(*args, **kwargs):
            kwargs.setdefault("cache", True)
            return decorator(*args, **kwargs)

        return wrapped

    numba.njit = with_cache(numba.njit)
    numba.jit = with_cache(numba.jit)
    numba._metastem_cache_patch = True
    # "cannot cache function ... as it uses dynamic globals": harmless, the function is compiled as usual.
    warnings.filterwarnings("ignore", category=NumbaWarning, message=".*[Cc]annot cache.*")


@contextlib.contextmanager
def graph_only_nndescent() -> Iterator[None]:
    """Build kNN graphs with pynndescent without preparing its index for later queries.

    ``PyNNDescentTransformer.fit_transform`` ends with ``compress_index()``, which JIT-compiles search
    closures that numba cannot cache: about 20 s in every process (measured at 100k cells: 24 of the
    cluster job's 45 s of ``pp.neighbors``), and again for each scrublet block. scanpy's neighbors and
    scrublet only read the graph of the fitted points, never query the index, so within this context
    ``fit_transform`` returns that graph (the same matrix as before) and skips the compression.
    """
    from pynndescent import PyNNDescentTransformer

    original = PyNNDescentTransformer.fit_transform

    def fit_transform(self, X, y=None, **fit_params):
        self.fit(X, compress_index=False)
        return self.transform(X=None)

    PyNNDescentTransformer.fit_transform = fit_transform
    try:
        yield
    finally:
        PyNNDescentTransformer.fit_transform = original
