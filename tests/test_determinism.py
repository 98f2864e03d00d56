"""Two runs of the same config give byte-identical tables and identical obs in every h5ad output."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from test_pipeline_demo import (DEMO_ROW, TRACEBACK, comparable_files, demo_run, make_workdir, new_tmpdir, obs_table,
                                run_snakemake)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runs():
    first = demo_run()
    second = make_workdir(new_tmpdir("metastem-determinism-"), [DEMO_ROW])
    res = run_snakemake(second)
    assert res.returncode == 0 and TRACEBACK not in res.stderr, res.stderr[-4000:]
    return first, second


def test_tables_are_byte_identical(two_runs):
    first, second = two_runs
    a, b = comparable_files(first), comparable_files(second)
    assert a.keys() == b.keys() and any(k.endswith(".tsv.gz") for k in a) and any(k.endswith(".tsv") for k in a)
    differing = [rel for rel in a if a[rel].read_bytes() != b[rel].read_bytes()]
    assert not differing, f"differ between two identical runs: {differing}"


def test_h5ad_outputs_are_identical(two_runs):
    first, second = two_runs
    outputs = sorted(p.relative_to(first) for p in (first / "results").rglob("*.h5ad") if not p.name.startswith("."))
    assert outputs
    for rel in outputs:
        pd.testing.assert_frame_equal(obs_table(first / rel), obs_table(second / rel))
        x, y = ad.read_h5ad(first / rel), ad.read_h5ad(second / rel)
        assert list(x.var_names) == list(y.var_names)
        if x.X is None or y.X is None:  # e.g. pseudotime/annotations.h5ad holds no matrix
            assert x.X is None and y.X is None, rel
        else:
            assert (x.X != y.X).nnz == 0, rel
        for key in x.obsm:
            np.testing.assert_array_equal(x.obsm[key], y.obsm[key], err_msg=f"{rel} obsm[{key}]")
