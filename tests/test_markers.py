"""The sparse Wilcoxon marker test equals scanpy's rank_genes_groups(method='wilcoxon')."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from scipy import stats

from metastem import cluster, markers


def _log_counts(n_cells=600, n_genes=300, n_groups=5, seed=0):
    """Log-normalised Poisson counts: many zeros and many ties at small counts, group-specific genes."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, n_cells)
    rate = rng.gamma(0.5, 1.0, n_genes)[None, :] * np.ones((n_cells, 1))
    for g in range(n_groups):
        rate[groups == g, g * 10:(g + 1) * 10] = 4 * rate[groups == g, g * 10:(g + 1) * 10] + 1
    counts = rng.poisson(rate * rng.lognormal(0, 0.3, (n_cells, 1)))
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)))
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    adata.obs["leiden"] = pd.Categorical([str(g) for g in groups])
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def test_rank_sums_are_scipy_rank_sums_with_zeros_and_ties():
    rng = np.random.default_rng(1)
    dense = rng.poisson(0.7, (200, 30)).astype(np.float32)  # heavy ties at 0, 1, 2
    X = sp.csr_matrix(dense)
    X.data[:5] = 0.0  # stored zeros rank with the zeros
    dense = X.toarray()
    codes = rng.integers(0, 3, 200)
    got = markers.rank_sums(X, codes, 3)
    ranks = np.apply_along_axis(stats.rankdata, 0, dense)
    want = np.stack([ranks[codes == g].sum(0) for g in range(3)])
    np.testing.assert_allclose(got["rank_sum"], want, rtol=1e-12)
    np.testing.assert_allclose(got["nonzero"], np.stack([(dense[codes == g] > 0).sum(0) for g in range(3)]))


@pytest.mark.parametrize("base", [None, 2.0])
def test_wilcoxon_equals_scanpy(base):
    adata = _log_counts()
    if base:  # log2 data: fold changes read the base as scanpy does
        adata.X = adata.X / np.log(2)
        adata.uns["log1p"] = {"base": 2.0}
    sc.tl.rank_genes_groups(adata, "leiden", method="wilcoxon", pts=True, use_raw=False)
    theirs = sc.get.rank_genes_groups_df(adata, None)
    ours = markers.wilcoxon_vs_rest(adata.X, adata.obs["leiden"], var_names=adata.var_names, log_base=base)
    for group, d in theirs.groupby("group", observed=True):
        d = d.set_index("names")
        for key, col in (("scores", "scores"), ("logfoldchanges", "logfoldchanges"), ("pts", "pct_nz_group"),
                         ("pts_rest", "pct_nz_reference")):
            np.testing.assert_allclose(ours[key][str(group)].reindex(d.index), d[col], rtol=1e-5, atol=1e-5)
        for key in ("pvals", "pvals_adj"):
            np.testing.assert_allclose(ours[key][str(group)].reindex(d.index), d[key], rtol=1e-4, atol=1e-300)
    # the planted genes of group 0 come first in its ranking
    assert set(ours["scores"]["0"].nlargest(10).index) == {f"g{i}" for i in range(10)}


def test_marker_genes_table_and_scanpy_layout(tmp_path):
    adata = _log_counts(seed=2)
    table = cluster.marker_genes(adata, 5, key_added="rank_genes_groups")
    assert table.groupby("cluster").size().eq(5).all()
    top = table[table["cluster"] == "3"]["gene"]
    assert set(top) <= {f"g{i}" for i in range(30, 40)}
    # scanpy's readers work on the stored result, also after an h5ad round trip
    df = sc.get.rank_genes_groups_df(adata, "3")
    assert list(df["names"][:5]) == list(top)
    sc.pl.rank_genes_groups_dotplot(adata, n_genes=2, show=False)
    adata.write_h5ad(tmp_path / "m.h5ad")
    back = ad.read_h5ad(tmp_path / "m.h5ad")
    assert list(sc.get.rank_genes_groups_df(back, "3")["names"][:5]) == list(top)


def test_negative_values_rank_below_the_zeros():
    rng = np.random.default_rng(2)
    dense = rng.poisson(0.6, (150, 8)).astype(np.float32)
    dense[::2, 3] *= -1
    dense[::5, 4] = rng.normal(size=30)
    codes = rng.integers(0, 2, 150)
    ranks = np.apply_along_axis(stats.rankdata, 0, dense)
    want = np.stack([ranks[codes == g].sum(0) for g in range(2)])
    np.testing.assert_allclose(markers.rank_sums(sp.csr_matrix(dense), codes, 2)["rank_sum"], want, rtol=1e-12)


def test_two_group_z_is_scipys_tie_corrected_mann_whitney():
    rng = np.random.default_rng(7)
    dense = rng.poisson(0.8, (300, 12)).astype(np.float32)
    dense[:, 5] = 0.0  # constant gene: no rank information
    in_group = rng.random(300) < 0.2
    z = markers.wilcoxon_z(sp.csr_matrix(dense), in_group)
    assert np.isnan(z[5])
    for j in (0, 3, 11):
        res = stats.mannwhitneyu(dense[in_group, j], dense[~in_group, j], method="asymptotic", use_continuity=False)
        u_mean = in_group.sum() * (~in_group).sum() / 2
        expected = np.sign(res.statistic - u_mean) * stats.norm.isf(res.pvalue / 2)
        assert z[j] == pytest.approx(expected, rel=1e-6, abs=1e-9)
