"""Normalisation, graph, Leiden and markers: real data, a >=5000-cell pynndescent graph, edge cases."""
from __future__ import annotations

import copy
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from metastem import cluster, qc
from metastem.errors import MetastemError
from metastem.io import read_dataset


def _row(path, fmt, values, species, orientation="", labels=""):
    return {"dataset": "real", "path": str(path), "format": fmt, "orientation": orientation, "species": species,
            "values": values, "labels": labels, "params": ""}


def check_clustered(adata: ad.AnnData, values: str) -> None:
    """The clustered-AnnData contract of docs/CONTRACTS.md (what this module can produce)."""
    assert sp.isspmatrix_csr(adata.X) or isinstance(adata.X, sp.csr_array)
    assert adata.X.dtype == np.float32
    assert "counts" not in adata.layers  # raw counts stay in qc.h5ad; final.h5ad gets them back
    assert isinstance(adata.obs["leiden"].dtype, pd.CategoricalDtype) and adata.obs["leiden"].nunique() >= 2
    assert isinstance(adata.obs["knn_component"].dtype, pd.CategoricalDtype)
    for key in ("X_pca", "X_umap"):
        assert adata.obsm[key].shape[0] == adata.n_obs and np.isfinite(adata.obsm[key]).all()
    for key in ("connectivities", "distances"):
        assert adata.obsp[key].shape == (adata.n_obs, adata.n_obs)
    assert "neighbors" in adata.uns


def _qc_and_cluster(adata, defaults, values, species, **cluster_params):
    p = copy.deepcopy(defaults)
    filtered, _, _ = qc.run_qc(adata, p["qc"], values=values, species=species, seed=0)
    note = cluster.normalize(filtered, values=values, target_sum=p["cluster"]["target_sum"])
    notes = cluster.embed_and_cluster(filtered, {**p["cluster"], **cluster_params}, seed=0)
    return filtered, note, notes


def test_ginhoux_log_values_cluster(shared_datasets, defaults):
    adata = read_dataset(_row(shared_datasets / "ginhoux_dc_progenitors.h5ad", "h5ad", "log", "mouse",
                              labels="group"), defaults)
    file_max = float(adata.X.max())   # run_qc and normalize change adata in place
    out, note, _ = _qc_and_cluster(adata, defaults, "log", "mouse")
    check_clustered(out, "log")
    assert "log2 values converted to natural log1p units" in note and out.n_obs >= 200
    # log2 input (detected at read time) rescaled to ln(1 + v): the same values un-logged, not log1p'd again
    np.testing.assert_allclose(out.X.max(), file_max * np.log(2), rtol=1e-6)
    assert out.uns["log1p"].get("base") is None
    markers = cluster.marker_genes(out, 5)
    assert set(markers["cluster"]) == set(out.obs["leiden"].cat.categories)
    # the known progenitor groups are not all mixed up: some cluster is dominated by one group
    purity = pd.crosstab(out.obs["leiden"], out.obs["group"], normalize="index").max(axis=1)
    assert purity.max() > 0.8


def test_oligodendroglioma_tpm_cluster(shared_datasets, defaults):
    path = shared_datasets / "oligodendroglioma_expression_downsampled.counts.matrix.gz"
    adata = read_dataset(_row(path, "tsv", "normalized", "human", orientation="genes_x_cells"), defaults)
    out, note, _ = _qc_and_cluster(adata, defaults, "normalized", "human")
    check_clustered(out, "normalized")
    assert "log1p-transformed" in note
    ann = pd.read_csv(shared_datasets / "oligodendroglioma_annotations_downsampled.txt", sep="\t", header=None,
                      index_col=0)[1]
    malignant = ann.reindex(out.obs_names).str.startswith("malignant").to_numpy()
    # normal (non-malignant) cells and tumour cells end up mostly in different clusters
    frac = pd.Series(malignant).groupby(out.obs["leiden"].to_numpy(), observed=True).mean()
    assert frac.min() < 0.2 and frac.max() > 0.8


def test_pynndescent_graph_at_5000_cells(defaults, monkeypatch):
    """Above cluster.EXACT_KNN_MAX_CELLS (and from 4096 cells) scanpy uses pynndescent; 0.7 returns csr_array and
    breaks scanpy 1.11 (getnnz). The threshold is lowered here so that 5000 cells take that path."""
    import pynndescent

    monkeypatch.setattr(cluster, "EXACT_KNN_MAX_CELLS", 0)
    from packaging.version import Version

    from metastem.simulate import simulate_tumour

    assert Version(pynndescent.__version__) < Version("0.7"), pynndescent.__version__
    adata = simulate_tumour(5000, 1000, seed=0, frac_doublets=0.0, frac_low_quality=0.0)
    assert adata.n_obs >= 5000
    cluster.normalize(adata, values="counts", target_sum=1e4)
    notes = cluster.build_graph(adata, {**defaults["cluster"], "n_top_genes": 500, "n_pcs": 20}, seed=0)
    assert adata.uns["neighbors"]["params"]["method"] == "umap"
    for key in ("connectivities", "distances"):
        g = adata.obsp[key]
        assert sp.issparse(g) and g.shape == (adata.n_obs, adata.n_obs)
        assert g.nnz >= adata.n_obs * (defaults["cluster"]["n_neighbors"] - 1)
    assert "knn_component" in adata.obs and isinstance(notes, list)


def test_exact_graph_below_the_threshold_has_the_true_neighbours(defaults):
    """Up to EXACT_KNN_MAX_CELLS the graph is exact (no pynndescent JIT): every cell's neighbours in
    obsp['distances'] are its true nearest neighbours in the representation the graph was built on."""
    from sklearn.neighbors import NearestNeighbors

    from metastem.simulate import simulate_tumour

    adata = simulate_tumour(5000, 1000, seed=1, frac_doublets=0.0, frac_low_quality=0.0, n_samples=1,
                            frac_normal=0.0, n_cnv_arms=0)
    assert 4096 < adata.n_obs <= cluster.EXACT_KNN_MAX_CELLS
    cluster.normalize(adata, values="counts", target_sum=1e4)
    cluster.build_graph(adata, {**defaults["cluster"], "n_top_genes": 500, "n_pcs": 20}, seed=0)
    k = defaults["cluster"]["n_neighbors"]
    rep = adata.obsm["X_pca"][:, :20]
    _, truth = NearestNeighbors(n_neighbors=k).fit(rep).kneighbors(rep)
    D = adata.obsp["distances"].tocsr()
    rows = np.random.default_rng(0).choice(adata.n_obs, 200, replace=False)
    recall = np.mean([len(set(D[i].indices) & set(truth[i][1:])) / (k - 1) for i in rows])
    assert recall > 0.99, recall


def _two_worlds(n=150, n_genes=200, seed=0):
    """Two groups of cells with no gene in common: a kNN graph with two components."""
    rng = np.random.default_rng(seed)
    X = np.zeros((2 * n, n_genes), dtype=np.float32)
    X[:n, : n_genes // 2] = rng.poisson(3.0, size=(n, n_genes // 2))
    X[n:, n_genes // 2:] = rng.poisson(3.0, size=(n, n_genes // 2))
    return ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(2 * n)]),
                      var=pd.DataFrame(index=[f"GENE{i}" for i in range(n_genes)]))


def test_disconnected_graph_is_a_warning_not_an_error(defaults, caplog):
    adata = _two_worlds()
    cluster.normalize(adata, values="counts", target_sum=1e4)
    with caplog.at_level(logging.WARNING):
        notes = cluster.embed_and_cluster(adata, defaults["cluster"], seed=0)
    assert adata.obs["knn_component"].nunique() == 2
    assert any("disconnected components" in n for n in notes) and "disconnected components" in caplog.text
    assert adata.obs["knn_component"].value_counts().tolist() == [150, 150]


def test_single_cluster_names_the_resolution(defaults):
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, size=(120, 150)).astype(np.float32)  # one homogeneous population
    adata = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(120)]),
                       var=pd.DataFrame(index=[f"GENE{i}" for i in range(150)]))
    cluster.normalize(adata, values="counts", target_sum=1e4)
    with pytest.raises(MetastemError, match="single cluster") as err:
        cluster.embed_and_cluster(adata, {**defaults["cluster"], "resolution": 0.01}, seed=0)
    assert "cluster.resolution" in err.value.fix and "cluster.resolution=0.01" in err.value.problem


def test_markers_skip_single_cell_clusters(defaults):
    adata = _two_worlds(n=60)
    cluster.normalize(adata, values="counts", target_sum=1e4)
    cluster.embed_and_cluster(adata, defaults["cluster"], seed=0)
    cats = list(adata.obs["leiden"].cat.categories)
    adata.obs["leiden"] = pd.Categorical(["lonely"] + list(adata.obs["leiden"].astype(str)[1:]),
                                         categories=cats + ["lonely"])
    m = cluster.marker_genes(adata, 3)
    assert "lonely" not in set(m["cluster"]) and len(m) > 0


def test_embedding_is_deterministic(demo_raw, demo_clustered, defaults):
    """Same data, same seed: identical graph, UMAP and Leiden (the conftest fixture is run 1)."""
    adata, _, _ = qc.run_qc(demo_raw.copy(), defaults["qc"], values="counts", species="human", seed=0)
    cluster.normalize(adata, values="counts", target_sum=defaults["cluster"]["target_sum"])
    cluster.embed_and_cluster(adata, defaults["cluster"], seed=0)
    assert list(adata.obs_names) == list(demo_clustered.obs_names)
    assert (adata.obs["leiden"].astype(str) == demo_clustered.obs["leiden"].astype(str)).all()
    np.testing.assert_array_equal(adata.obsm["X_pca"], demo_clustered.obsm["X_pca"])
    np.testing.assert_array_equal(adata.obsm["X_umap"], demo_clustered.obsm["X_umap"])
    assert (adata.obsp["connectivities"] != demo_clustered.obsp["connectivities"]).nnz == 0


def test_subsampled_markers_agree_with_all_cells(demo_clustered):
    """Markers on at most 150 cells per cluster recover the markers found on every cell."""
    full = cluster.marker_genes(demo_clustered, 10)
    sub = cluster.marker_genes(demo_clustered, 10, max_cells_per_cluster=150, seed=0)
    assert set(sub["cluster"]) == set(full["cluster"])
    for c, genes in full.groupby("cluster")["gene"]:
        top_sub = set(sub.loc[sub["cluster"] == c, "gene"])
        assert len(top_sub & set(genes)) >= 5, (c, sorted(top_sub), list(genes))


def _normalised(adata: ad.AnnData) -> ad.AnnData:
    adata = adata.copy()
    cluster.normalize(adata, values="counts", target_sum=1e4)
    return adata


@pytest.mark.parametrize("fmt", ["csr", "dense"])
@pytest.mark.parametrize("n_top", [50, 500])
def test_blockwise_hvg_selects_scanpys_genes(demo_raw, fmt, n_top, monkeypatch):
    """Same genes, means and dispersions as sc.pp.highly_variable_genes(flavor='seurat'), across blocks."""
    import scanpy as sc

    import metastem.cluster as cl

    monkeypatch.setattr(cl, "row_blocks", lambda n: (slice(s, min(s + 97, n)) for s in range(0, n, 97)))
    ours = _normalised(demo_raw)
    if fmt == "dense":
        ours.X = ours.X.toarray()
    ref = ours.copy()
    cl.highly_variable_genes_seurat(ours, n_top)
    sc.pp.highly_variable_genes(ref, n_top_genes=n_top, flavor="seurat")
    assert ours.var["highly_variable"].sum() >= n_top
    assert (ours.var["highly_variable"] == ref.var["highly_variable"]).all()
    for col in ("means", "dispersions", "dispersions_norm"):
        np.testing.assert_allclose(ours.var[col], ref.var[col], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_blockwise_hvg_on_real_counts(shared_datasets):
    """Real data (Ginhoux DC progenitors): the 2000 genes scanpy selects."""
    import scanpy as sc

    adata = ad.read_h5ad(shared_datasets / "ginhoux_dc_progenitors.h5ad")
    values = "counts" if np.allclose(adata.X.data[:1000], np.round(adata.X.data[:1000])) else "log"
    cluster.normalize(adata, values=values, target_sum=1e4)
    ref = adata.copy()
    cluster.highly_variable_genes_seurat(adata, 2000)
    sc.pp.highly_variable_genes(ref, n_top_genes=2000, flavor="seurat")
    assert (adata.var["highly_variable"] == ref.var["highly_variable"]).all()
