"""Persistent numba compilation across processes.

Every Snakemake job is a fresh Python process, and pynndescent/umap compile dozens of numba functions
on first use (tens of seconds per job). Most of them are declared without ``cache=True``, so numba's
on-disk cache (``NUMBA_CACHE_DIR``) never applies. Defaulting ``cache=True`` for functions defined
after this module is imported lets the second and later jobs load the compiled code instead.
Functions numba cannot cache (dynamic globals) are compiled as before.
"""
from __future__ import annotations

import functools
import os
import warnings
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
