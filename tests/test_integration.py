"""Several samples: batch-aware genes, Harmony on the PCA before the shared kNN graph, the mixing diagnostic."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from metastem import cluster, integration, qc


def shifted_samples(adata, n_samples: int = 3, *, seed: int = 1, sd: float = 0.8, frac_genes: float = 0.25):
    """The demo split at random into patients P1.. with a per-patient batch shift: a quarter of the genes
    scaled by exp(N(0, sd)) in each patient (counts resampled from Poisson), as chemistry or dissociation
    shifts every cell of a sample. Every cell state is present in every patient, so every cluster is a
    shared cell type."""
    rng = np.random.default_rng(seed)
    patient = rng.integers(0, n_samples, adata.n_obs)
    X = sp.csr_matrix(adata.X, copy=True)
    row_of = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    lfc = np.where(rng.random((n_samples, adata.n_vars)) < frac_genes,
                   rng.normal(0, sd, (n_samples, adata.n_vars)), 0.0)
    X.data = rng.poisson(X.data * np.exp(lfc[patient[row_of], X.indices])).astype(np.float32)
    X.eliminate_zeros()
    out = adata.copy()
    out.X = X
    out.obs["sample"] = pd.Categorical([f"P{i + 1}" for i in patient])
    return out


def _clustered(raw, defaults, integration_mode: str):
    a, _, _ = qc.run_qc(raw.copy(), defaults["qc"], values="counts", species="human", seed=0)
    cluster.normalize(a, values="counts", target_sum=defaults["cluster"]["target_sum"])
    cluster.embed_and_cluster(a, {**defaults["cluster"], "integration": integration_mode}, seed=0)
    return a


@pytest.fixture(scope="module")
def multi(demo_raw):
    return shifted_samples(demo_raw)


@pytest.fixture(scope="module")
def integrated(multi, defaults):
    return _clustered(multi, defaults, "harmony")


def test_harmony_mixes_shared_cell_types(multi, integrated, defaults):
    plain = _clustered(multi, defaults, "none")
    per_plain, _, _ = integration.sample_mixing(plain)
    per, shares, summary = integration.sample_mixing(integrated)
    # without integration the batch shift makes clusters of patients (so the test below can fail) ...
    assert per_plain["top_sample_share"].max() > 0.9
    # ... with Harmony no cluster of these shared cell states is more than 60 % one patient
    states = pd.crosstab(integrated.obs["leiden"], integrated.obs["true_state"], normalize="index")
    assert (states.max(axis=1) > 0.5).all(), "every cluster is mostly one true cell state"
    assert per["top_sample_share"].max() <= 0.6, per.to_string()
    assert per["n_samples"].min() == 3
    # the kNN mixing score rises from near 0 (patients apart) to near 1 (neighbourhoods like the whole)
    assert summary["mean_mixing"]["X_pca"] < 0.2 and summary["mean_mixing"]["X_pca_harmony"] > 0.7
    assert (per["mixing_pca_harmony"] > per["mixing_pca"]).all()
    assert np.allclose(shares.groupby("cluster")["share"].sum(), 1.0)
    # the biology survives: clusters still separate the planted states (not everything merged)
    assert integrated.obs["leiden"].nunique() >= 4
    assert states.max(axis=1).mean() > 0.7


def test_harmony_embedding_is_numpy_and_recorded(integrated):
    Z = integrated.obsm["X_pca_harmony"]
    assert isinstance(Z, np.ndarray) and Z.dtype == np.float32 and Z.shape == integrated.obsm["X_pca"].shape
    assert not np.allclose(Z, integrated.obsm["X_pca"])
    rec = integrated.uns["X_pca_harmony"]
    assert rec["batch_key"] == "sample" and rec["n_samples"] == 3 and rec["theta"] == 2.0
    assert all(v is not None for v in rec.values())
    assert integrated.uns["hvg"].get("batch_key") == "sample"
    assert integrated.var["highly_variable_nbatches"].max() == 3


def test_one_sample_is_not_integrated(demo_clustered):
    assert "X_pca_harmony" not in demo_clustered.obsm
    a = demo_clustered.copy()
    a.obs["sample"] = "only"
    per, shares, summary = integration.sample_mixing(a)
    assert (per["top_sample_share"] == 1.0).all() and np.isnan(per["mixing_pca"]).all()


def test_a_patient_specific_population_stays_apart(demo_raw, defaults):
    """Harmony must not dissolve a population only one patient has (a tumour's own malignant cells)."""
    m = shifted_samples(demo_raw)
    own = (m.obs["true_state"] == "branch_B").to_numpy()
    keep = ~own | (m.obs["sample"] == "P3").to_numpy()   # branch B only in patient P3
    a = _clustered(m[keep].copy(), defaults, "harmony")
    b = (a.obs["true_state"] == "branch_B").to_numpy()
    home = a.obs["leiden"][b].value_counts().idxmax()      # the cluster holding most branch-B cells
    in_home = (a.obs["leiden"] == home).to_numpy()
    assert (b & in_home).sum() / b.sum() > 0.9              # they stay together ...
    assert (b & in_home).sum() / in_home.sum() > 0.6        # ... as a cluster of their own, not merged away
    assert (a.obs["sample"][in_home] == "P3").mean() > 0.6  # and that cluster is mostly the one patient

def test_batch_hvg_prefers_genes_variable_in_every_sample(multi, defaults):
    a, _, _ = qc.run_qc(multi.copy(), {**defaults["qc"], "doublets": False}, values="counts", species="human")
    cluster.normalize(a, values="counts", target_sum=1e4)
    integration.highly_variable_genes_batch(a, 500, batch_key="sample")
    hv = a.var["highly_variable"].to_numpy()
    assert hv.sum() == 500
    nb = a.var["highly_variable_nbatches"].to_numpy()
    # ordered by votes first: no unselected gene has more votes than the weakest selected one
    assert nb[~hv].max() <= nb[hv].min()

