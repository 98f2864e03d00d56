"""QC on constructed data with known outliers, doublet recovery, and real raw counts."""
from __future__ import annotations

import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from metastem import qc
from metastem.errors import MetastemError

# Measured on simulate_tumour(1500, 3000, seed=0) (the session fixture): scrublet doublet-score AUROC
# 0.88 over all cells (calls: 17 of 75 doublets, precision 0.94). The floor leaves room for
# scrublet/simulator changes while staying far from chance (0.5).
DOUBLET_AUROC_FLOOR = 0.80


def planted(n_cells=400, n_genes=300, seed=1):
    """Healthy Poisson cells with planted outliers: 10 with 1/20 of the counts, 10 with 40% mito."""
    rng = np.random.default_rng(seed)
    genes = [f"MT-ND{i}" for i in range(1, 8)] + [f"GENE{i}" for i in range(n_genes - 7)]
    mu = rng.gamma(1.0, 1.0, size=n_genes)
    mu[:7] = 0.05 * mu[7:].sum() / 7  # ~5% mitochondrial reads in healthy cells
    lib = rng.lognormal(0, 0.2, size=n_cells)[:, None]
    lam = mu[None, :] * lib * 5
    low, mito = np.arange(10), np.arange(10, 20)
    lam[low] /= 20
    lam[np.ix_(mito, np.arange(7))] *= 12
    X = rng.poisson(lam).astype(np.float32)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_cells)])
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=genes)), low, mito


def test_planted_outliers_are_removed_and_others_kept(defaults):
    adata, low, mito = planted()
    p = {**defaults["qc"], "doublets": False}
    filtered, cells, info = qc.run_qc(adata, p, values="counts", species="human")
    assert not cells["kept"].iloc[low].any() and not cells["kept"].iloc[mito].any()
    assert cells["low_or_high_counts"].iloc[low].all() and cells["high_mito"].iloc[mito].all()
    healthy = cells["kept"].iloc[20:]
    # 3 MADs of % mito (best-practices default) is about 2 SD of binomial noise: ~2.5% of healthy cells go
    assert healthy.mean() >= 0.95, f"{(~healthy).sum()} healthy cells removed"
    assert cells[["low_or_high_counts", "low_or_high_genes"]].iloc[20:].to_numpy().sum() <= 2
    assert filtered.n_obs == int(cells["kept"].sum()) and list(filtered.obs_names) == list(cells.index[cells["kept"]])
    assert info["cells_in"] == 400 and info["removed"]["high_mito"] >= 10
    table = qc.qc_summary_table(info)
    assert {"cells_in", "cells_out", "threshold_pct_counts_mt_high"} <= set(table["metric"])


def test_fixed_thresholds_and_gene_filter(defaults):
    adata, _, _ = planted()
    p = {**defaults["qc"], "doublets": False, "min_counts": 1000, "min_cells_per_gene": 300}
    filtered, cells, info = qc.run_qc(adata, p, values="counts", species="human")
    assert (cells.loc[cells["kept"], "total_counts"] >= 1000).all() and cells["fixed_threshold"].any()
    assert filtered.n_vars == info["genes_out"] < info["genes_in"]
    assert (np.asarray((filtered.X > 0).sum(axis=0)).ravel() >= 300).all()


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_genes_detected_in_counts_non_zeros_of_kept_rows(fmt):
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.3, size=(53, 11)).astype(np.float32)
    rows = rng.random(53) < 0.6
    X = sp.csr_matrix(dense)
    X.data[::5] = 0  # explicit zeros stored in the matrix are not detections
    dense = X.toarray()
    got = qc.genes_detected_in(X if fmt == "csr" else dense, rows, block=7)
    np.testing.assert_array_equal(got, (dense[rows] != 0).sum(axis=0))


@pytest.mark.parametrize("owned", [True, False])
def test_subset_csr_in_place_equals_scipy_subsetting(owned):
    rng = np.random.default_rng(2)
    dense = rng.poisson(0.4, size=(61, 17)).astype(np.float32)
    dense[7] = 0                                           # an empty row
    rows, cols = rng.random(61) < 0.7, rng.random(17) < 0.6
    X = sp.csr_matrix(dense)
    expected = X[rows][:, cols].toarray()
    if not owned:                                          # arrays that are views of a larger buffer
        X = sp.csr_matrix((np.concatenate([X.data, [9.0]]).astype(np.float32)[:-1], X.indices, X.indptr),
                          shape=X.shape, copy=False)
    got = qc.subset_csr_in_place(X, rows, cols, block=5)
    assert got.shape == (rows.sum(), cols.sum()) and got.nnz == np.count_nonzero(expected)
    np.testing.assert_array_equal(got.toarray(), expected)


def test_zero_mad_does_not_remove_every_differing_cell(defaults):
    """Most cells without any mito read: MAD = 0 must not make 'any mito read' an outlier."""
    adata, _, _ = planted()
    X = adata.X.toarray()
    X[:, :7] = 0
    X[::10, 0] = 1  # one mito read in a tenth of the cells
    adata.X = sp.csr_matrix(X)
    _, cells, info = qc.run_qc(adata, {**defaults["qc"], "doublets": False}, values="counts", species="human")
    assert cells["high_mito"].sum() == 0
    assert qc.mad_bounds(np.zeros(10), 3) == (-np.inf, np.inf)


def test_empty_cells_are_always_removed(defaults):
    adata, _, _ = planted()
    X = adata.X.toarray()
    X[5] = 0
    adata.X = sp.csr_matrix(X)
    _, cells, _ = qc.run_qc(adata, {**defaults["qc"], "doublets": False}, values="log", species="human")
    assert not cells["kept"].iloc[5]


def test_no_mito_genes_is_a_note_not_a_crash(defaults):
    adata, _, _ = planted()
    adata.var_names = [f"GENE{i}" for i in range(adata.n_vars)]
    _, _, info = qc.run_qc(adata, {**defaults["qc"], "doublets": False}, values="normalized", species="human")
    assert any("no mitochondrial genes" in n and "% mito" in n for n in info["notes"])
    assert any("total-counts filter is off" in n for n in info["notes"])


@pytest.mark.parametrize("n_cells, params, words", [
    (30, {}, "only 30 cells, fewer than qc.min_cells=50"),
    (400, {"max_pct_mito": 0.0}, "QC kept 0 of 400 cells, fewer than qc.min_cells=50"),
])
def test_too_few_cells_names_qc_min_cells(defaults, n_cells, params, words):
    adata, _, _ = planted(n_cells=n_cells)
    with pytest.raises(MetastemError, match="Fix:") as err:
        qc.run_qc(adata, {**defaults["qc"], "doublets": False, **params}, values="counts", species="human")
    assert words in str(err.value) and "qc.min_cells" in err.value.fix


def test_doublet_scores_recover_simulated_doublets(demo_raw, defaults):
    from sklearn.metrics import roc_auc_score

    adata = demo_raw.copy()
    _, cells, info = qc.run_qc(adata, defaults["qc"], values="counts", species="human", seed=0)
    truth = demo_raw.obs["true_doublet"].to_numpy()
    auroc = roc_auc_score(truth, cells["doublet_score"])
    print(f"doublet AUROC {auroc:.3f}; called {int(cells['doublet'].sum())}, true {int(truth.sum())}, "
          f"precision {float(truth[cells['doublet'].to_numpy()].mean()):.2f}")
    assert auroc >= DOUBLET_AUROC_FLOOR
    called = cells["doublet"].to_numpy()
    assert called.any() and truth[called].mean() > 3 * truth.mean()  # calls are enriched for true doublets
    # low-quality cells are removed, healthy singlets mostly kept
    lq = demo_raw.obs["true_low_quality"].to_numpy()
    assert (~cells["kept"].to_numpy()[lq]).mean() >= 0.9
    assert cells["kept"].to_numpy()[~lq & ~truth].mean() >= 0.93


def test_doublet_scores_are_deterministic(defaults):
    from metastem.simulate import simulate_tumour

    a = simulate_tumour(300, 800, seed=2)
    s1 = qc.run_qc(a.copy(), defaults["qc"], values="counts", species="human", seed=5)[1]["doublet_score"]
    s2 = qc.run_qc(a.copy(), defaults["qc"], values="counts", species="human", seed=5)[1]["doublet_score"]
    np.testing.assert_array_equal(s1.to_numpy(), s2.to_numpy())


def test_pancreas_raw_counts_through_qc(shared_datasets, defaults, repo):
    """50 real mouse cells: needs qc.min_cells lowered (a per-dataset override in the sheet)."""
    from metastem.smk.config import dataset_params, load_schema
    from metastem.io import read_dataset

    row = {"dataset": "pancreas", "path": str(shared_datasets / "pancreas_50obs_raw.h5ad"), "format": "h5ad",
           "orientation": "", "species": "mouse", "values": "counts", "labels": "", "params": ""}
    schema = load_schema(repo / "workflow/schemas/config.schema.yaml")
    adata = read_dataset(row, defaults)
    # all 50 cells pass QC here, so the default qc.min_cells=50 is just met; any removal would fail it
    p = dataset_params(copy.deepcopy(defaults), {**row, "params": "qc.min_cells=20"}, schema)
    filtered, cells, info = qc.run_qc(adata, p["qc"], values="counts", species="mouse", seed=0)
    assert info["cells_in"] == 50 and 20 <= info["cells_out"] <= 50
    assert cells["pct_counts_mt"].max() > 0 and "pct_counts_mt" in info["thresholds"]
    assert any("too few for scrublet" in n for n in info["notes"])
    assert filtered.n_vars == info["genes_out"] < info["genes_in"]  # genes seen in < 3 cells are gone
    assert np.all(filtered.X.data == np.round(filtered.X.data))  # values as given


def test_homogeneous_cells_are_not_all_called_doublets(defaults):
    """scrublet's automatic threshold fails on one homogeneous population; calls stay near the expected rate."""
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, size=(150, 200)).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(150)]),
                       var=pd.DataFrame(index=[f"MT-CO{i}" for i in range(1, 4)] + [f"GENE{i}" for i in range(197)]))
    _, cells, _ = qc.run_qc(adata, defaults["qc"], values="counts", species="human", seed=0)
    assert cells["doublet"].mean() <= qc.MAX_DOUBLET_FACTOR * defaults["qc"]["doublet_rate"]


# ----------------------------------------------------------------------------------------- ERCC spike-ins (13.4)
def _with_spike_ins(n_cells=80, n_genes=150, n_ercc=6, seed=3):
    """Smart-seq-like counts with ERCC controls at a known, varying share of each cell's reads."""
    rng = np.random.default_rng(seed)
    genes = [f"MT-ND{i}" for i in range(1, 4)] + [f"GENE{i}" for i in range(n_genes - 3)]
    ercc = [f"ERCC-{i:05d}" for i in (2, 3, 4, 9, 12, 13)][:n_ercc]
    G = rng.poisson(rng.gamma(1.0, 3.0, size=n_genes), size=(n_cells, n_genes))
    share = rng.uniform(0.02, 0.3, size=n_cells)        # planted ERCC share of all counts
    target = np.round(G.sum(axis=1) * share / (1 - share)).astype(int)
    E = np.array([rng.multinomial(t, np.ones(n_ercc) / n_ercc) if n_ercc else [] for t in target],
                 dtype=int).reshape(n_cells, n_ercc)
    X = np.hstack([G[:, :50], E, G[:, 50:]]).astype(np.float32)    # spike-ins among the genes
    var = pd.DataFrame(index=genes[:50] + ercc + genes[50:])
    return ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]), var=var), G, E


def test_ercc_spike_ins_are_recorded_then_removed(defaults):
    adata, G, E = _with_spike_ins()
    expected = 100 * E.sum(axis=1) / (E.sum(axis=1) + G.sum(axis=1))
    p = copy.deepcopy(defaults["qc"]) | {"doublets": False}
    out, cells, info = qc.run_qc(adata, p, values="counts", species="human", seed=0)
    assert not out.var_names.str.startswith("ERCC").any()
    np.testing.assert_allclose(cells["pct_counts_ercc"].to_numpy(), expected, rtol=1e-6)
    # QC metrics count genes only: totals and genes detected exclude the controls
    np.testing.assert_array_equal(cells["total_counts"].to_numpy(), G.sum(axis=1))
    np.testing.assert_array_equal(cells["n_genes_by_counts"].to_numpy(), (G > 0).sum(axis=1))
    assert info["n_spike_ins_removed"] == 6 and any("6 ERCC spike-ins removed" in n for n in info["notes"])
    assert "pct_counts_ercc" in out.obs and info["genes_in"] == 150


def test_ercc_share_of_log_values_is_taken_on_unlogged_values():
    adata, G, E = _with_spike_ins()
    counts = adata.X.toarray().astype(np.float64)
    adata.X = sp.csr_matrix(np.log2(1 + counts).astype(np.float32))
    adata.uns["log1p"] = {"base": 2.0}
    assert qc.remove_spike_ins(adata) == 6
    expected = 100 * E.sum(axis=1) / (E.sum(axis=1) + G.sum(axis=1))
    np.testing.assert_allclose(adata.obs["pct_counts_ercc"].to_numpy(), expected, rtol=1e-4)
    assert adata.n_vars == 150


def test_no_spike_ins_changes_nothing():
    adata, *_ = _with_spike_ins(n_ercc=0)
    assert qc.remove_spike_ins(adata) == 0 and "pct_counts_ercc" not in adata.obs and adata.n_vars == 150
