"""Benjamini-Hochberg adjustment, the one implementation the stages share (markers, pathways, niche)."""
from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd


def bh_adjust(p: np.ndarray | pd.Series, *, nan: Literal["omit", "one"] = "omit") -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (statsmodels' ``fdr_bh``, scipy's ``false_discovery_control``).

    ``nan='omit'``: a NaN p-value (a test that was not run) stays NaN and is not counted among the tests, so it
    cannot make the others' q-values larger. ``nan='one'``: NaN counts as a test with p = 1, as scanpy's
    ``rank_genes_groups`` does (marker tables stay comparable with scanpy's).
    """
    p = np.asarray(p, dtype=float)
    if nan == "one":
        p = np.where(np.isnan(p), 1.0, p)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    n = int(ok.sum())
    if n:
        order = np.argsort(p[ok])
        ranked = p[ok][order] * n / np.arange(1, n + 1)
        res = np.empty(n)
        res[order] = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
        out[ok] = res
    return out
