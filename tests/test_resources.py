"""Resource requests: sizes read from headers without loading the matrix, and requests that cover the
peaks measured by benchmarks/run.py on the 2-core, 24 GB reference machine."""
from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from metastem.smk.resources import dataset_size, estimate_resources

STAGES = ["qc", "cluster", "malignant", "stemness", "pseudotime", "pathways", "niche", "report"]

# (non-zeros, {stage: peak RSS MB}) from benchmarks/run.py (probe job_peak_rss_mb), commit 62df59f and later:
# 10k and 105k cells x 20k genes (library 2000), and QC and clustering of 1.05M cells x 20k genes (library
# 1100, ed1c42c).
MEASURED = [
    (17_346_391, {"qc": 1148, "cluster": 913, "stemness": 789, "pseudotime": 313, "pathways": 1307, "report": 211}),
    (173_980_999, {"qc": 4527, "cluster": 2857, "stemness": 2478, "pseudotime": 675, "pathways": 2871,
                   "report": 289}),
    (1_112_996_999, {"qc": 17705, "cluster": 18137}),
    # the first complete 1.05M-cell run (library 1100 with the tumour simulator, 774M non-zeros, all rules)
    (773_712_676, {"qc": 12704, "cluster": 14032, "malignant": 11909, "stemness": 8034, "pseudotime": 4265,
                   "pathways": 8922, "niche": 7484, "report": 2069}),
]
# wall minutes of that run (a shared machine, load 2-3): runtime requests must cover them
MEASURED_MINUTES = (773_712_676, {"qc": 20.2, "cluster": 28.4, "malignant": 3.3, "stemness": 6.3, "pseudotime": 8.7,
                                  "pathways": 5.7, "niche": 0.5})
NODE_MB = 24_000  # the reference machine


def test_h5ad_size_from_headers(tmp_path):
    X = sp.random(40, 30, density=0.2, format="csr", random_state=0, dtype=np.float32)
    ad.AnnData(X=X).write_h5ad(tmp_path / "sparse.h5ad")
    ad.AnnData(X=X.toarray()).write_h5ad(tmp_path / "dense.h5ad")
    assert dataset_size({"format": "h5ad", "path": str(tmp_path / "sparse.h5ad")}, {}) == (40, 30, X.nnz)
    assert dataset_size({"format": "h5ad", "path": str(tmp_path / "dense.h5ad")}, {}) == (40, 30, 1200)


def test_10x_h5_size_from_headers(tmp_path):
    X = sp.random(25, 60, density=0.1, format="csc", random_state=1)  # genes x cells, as 10x stores it
    with h5py.File(tmp_path / "m.h5", "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"], g["shape"] = X.data, X.indices, X.indptr, np.array(X.shape)
    assert dataset_size({"format": "10x_h5", "path": str(tmp_path / "m.h5")}, {}) == (60, 25, X.nnz)


def test_simulated_and_unreadable_sizes(tmp_path):
    sim = {"simulate": {"n_cells": 1000, "n_genes": 20000, "frac_doublets": 0.05, "mean_library_size": 2000}}
    cells, genes, nnz = dataset_size({"format": "simulated", "path": ""}, sim)
    assert (cells, genes) == (1050, 20000) and nnz == 1050 * 1600
    text = tmp_path / "m.tsv"
    text.write_bytes(b"x" * 6_000_000)
    cells, genes, nnz = dataset_size({"format": "tsv", "path": str(text)}, {})
    assert nnz == 1_000_000 and cells > 0


@pytest.mark.parametrize("stage", STAGES)
def test_requests_cover_measured_peaks_and_grow(stage):
    for nnz, peaks in MEASURED:
        if stage in peaks:
            assert estimate_resources(stage, nnz)["mem_mb"] >= 1.1 * peaks[stage], (stage, nnz)
    nnz, minutes = MEASURED_MINUTES
    if stage in minutes:
        assert estimate_resources(stage, nnz)["runtime"] >= 1.1 * minutes[stage], (stage, nnz)
    small, large = estimate_resources(stage, 1e7), estimate_resources(stage, 1e9)
    assert large["mem_mb"] > small["mem_mb"] and large["runtime"] >= small["runtime"]
    first, retry = estimate_resources(stage, 1e8), estimate_resources(stage, 1e8, attempt=2)
    assert abs(retry["mem_mb"] - 1.5 * first["mem_mb"]) <= 2 and retry["runtime"] >= first["runtime"]


@pytest.mark.parametrize("stage", ["qc", "cluster"])
def test_a_million_cells_asks_for_no_more_than_the_node_it_ran_on(stage):
    assert estimate_resources(stage, 1_112_996_999)["mem_mb"] < NODE_MB
