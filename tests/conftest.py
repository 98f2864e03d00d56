"""Shared fixtures: paths, the real datasets in ../shared, small simulated data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import metastem

metastem.enable_numba_cache()  # as every workflow job does: numba code compiled once per machine

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("METASTEM_SHARED", REPO.parent / "shared")) / "datasets"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# `make test` runs the suite on two pytest-xdist workers. Each test module stays on one worker (its module fixtures
# are built once), and modules that share a whole-workflow run kept in module state go to the same worker: the demo
# run of test_pipeline_demo (reused by test_resume and test_determinism) and the local reference run of
# tests/slurm/workflow_runs.py (test_slurm, test_module). (xdist's own `xdist_group` marks were not honoured by
# --dist loadgroup in pytest-xdist 3.8 here, so the grouping is a scheduler.)
SHARED_RUNS = {"test_resume": "test_pipeline_demo", "test_determinism": "test_pipeline_demo",
               "test_module": "test_slurm"}

try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:   # pytest-xdist absent: the suite runs in one process (TEST_WORKERS=0)
    pass
else:
    class SharedRunScheduling(LoadScopeScheduling):
        """Whole modules to workers, modules sharing a workflow run (SHARED_RUNS) as one unit."""

        def _split_scope(self, nodeid: str) -> str:
            stem = Path(nodeid.split("::", 1)[0]).stem
            return SHARED_RUNS.get(stem, stem)

    def pytest_xdist_make_scheduler(config, log):
        return SharedRunScheduling(config, log)


def require(condition: bool, reason: str) -> None:
    """Skip with a reason on a developer machine; fail in CI, where every test must run."""
    if not condition:
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    require(SHARED.is_dir(), f"real datasets folder {SHARED} is absent (set METASTEM_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def demo_raw():
    """A small simulated tumour (raw counts), shared read-only across tests: copy before changing."""
    from metastem.simulate import simulate_tumour

    return simulate_tumour(1500, 3000, seed=0, n_samples=1, frac_normal=0.0, n_cnv_arms=0)  # single-sample model


@pytest.fixture(scope="session")
def demo_clustered(demo_raw):
    """The small demo through QC and clustering, as the later stages receive it. Copy before changing."""
    from metastem import cluster, qc
    from metastem.smk.config import load_schema, validate_with_defaults

    cfg = validate_with_defaults({}, load_schema(REPO / "workflow/schemas/config.schema.yaml"), where="defaults")
    adata, _, _ = qc.run_qc(demo_raw.copy(), cfg["qc"], values="counts", species="human", seed=0)
    cluster.normalize(adata, values="counts", target_sum=cfg["cluster"]["target_sum"])
    cluster.embed_and_cluster(adata, cfg["cluster"], seed=0)
    adata.uns["metastem"] = {"dataset": "demo", "species": "human", "values": "counts"}
    return adata


@pytest.fixture(scope="session")
def defaults() -> dict:
    """The config with every schema default filled in."""
    from metastem.smk.config import load_schema, validate_with_defaults

    return validate_with_defaults({}, load_schema(REPO / "workflow/schemas/config.schema.yaml"), where="defaults")


@pytest.fixture(scope="session")
def oligodendroglioma(shared_datasets):
    """The shared oligodendroglioma data (Tirosh 2016; TPM-like, 184 cells): obs 'label' from the annotation and
    'sample' = the patient (barcode prefix). Shared read-only: copy before changing."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    expr = pd.read_csv(shared_datasets / "oligodendroglioma_expression_downsampled.counts.matrix.gz",
                       sep="\t", index_col=0)
    ann = pd.read_csv(shared_datasets / "oligodendroglioma_annotations_downsampled.txt", sep="\t",
                      header=None, index_col=0)[1]
    adata = ad.AnnData(sp.csr_matrix(expr.T.to_numpy(dtype=np.float32)),
                       obs=pd.DataFrame({"label": ann.loc[expr.columns].to_numpy()}, index=expr.columns),
                       var=pd.DataFrame(index=expr.index))
    adata.obs["sample"] = [c.split("_")[0] for c in adata.obs_names]
    return adata
