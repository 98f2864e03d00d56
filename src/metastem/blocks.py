"""Row blocks of a cells x genes matrix: statistics of X (or of a transform of X) without copying X whole.

A stage's largest allocation is usually a transformed copy of X made only to read a few numbers per gene
(scanpy's HVG un-logs two copies; a census-normalised copy for correlations). Working through blocks of
rows keeps the peak near one X plus one block.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

BLOCK_ROWS = 10_000  # cells per block


def row_blocks(n: int, block: int = BLOCK_ROWS) -> Iterator[slice]:
    """Consecutive slices of at most ``block`` rows covering ``range(n)``."""
    return (slice(start, min(start + block, n)) for start in range(0, n, block))


def row_block(X: sp.spmatrix | np.ndarray, rows: slice) -> sp.spmatrix | np.ndarray:
    """Rows of X without copying: a CSR view on X's own arrays (scipy's row slice copies them)."""
    if sp.issparse(X) and X.format == "csr":
        lo, hi = X.indptr[rows.start], X.indptr[rows.stop]
        return sp.csr_matrix((X.data[lo:hi], X.indices[lo:hi], X.indptr[rows.start:rows.stop + 1] - lo),
                             shape=(rows.stop - rows.start, X.shape[1]), copy=False)
    return X[rows]
