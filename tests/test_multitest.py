"""metastem.multitest.bh_adjust: the one Benjamini-Hochberg of markers, pathways and niche."""
import numpy as np
from scipy.stats import false_discovery_control

from metastem.multitest import bh_adjust


def test_equals_scipy_and_leaves_untested_out():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-3, size=20)])
    np.testing.assert_allclose(bh_adjust(p), false_discovery_control(p), rtol=1e-12)
    with_nan = np.concatenate([p, [np.nan] * 50])
    q = bh_adjust(with_nan)
    assert np.isnan(q[-50:]).all()
    np.testing.assert_allclose(q[:-50], false_discovery_control(p), rtol=1e-12)   # NaN not counted as tests


def test_nan_as_one_counts_them_like_scanpy():
    p = np.array([0.01, 0.02, np.nan, 0.5])
    np.testing.assert_allclose(bh_adjust(p, nan="one"), false_discovery_control([0.01, 0.02, 1.0, 0.5]))
    assert (bh_adjust(p, nan="one") >= np.nan_to_num(bh_adjust(p))).all()
    assert bh_adjust(np.array([])).size == 0 and np.isnan(bh_adjust(np.array([np.nan]))).all()
