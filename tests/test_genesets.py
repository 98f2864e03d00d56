"""GMT parsing, alias-aware matching, the shipped curated files and the AUCell-style scorer."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from metastem.errors import MetastemError
from metastem.genesets import aucell_matrix, aucell_score, gene_set_coverage, read_aliases, read_gmt, resolve_genes

GENE_SETS = "src/metastem/data/gene_sets"


def _write(tmp_path, text: str, name: str = "mine.gmt"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, words", [
    ("SET1 desc A B C\n", "not 'name<TAB>"),                      # spaces instead of tabs
    ("SET1\tdesc\n", "not 'name<TAB>"),                            # no genes
    ("SET1\tdesc\tA\nSET1\tdesc\tB\n", "defined twice"),
    ("SET1\tdesc\tA B\tC\n", "contains spaces"),
    ("# only a comment\n\n", "holds no sets"),
    ("A/B\tdesc\tX\n", "contains '/'"),
])
def test_bad_gmt_is_a_metastem_error(tmp_path, text, words):
    p = _write(tmp_path, text)
    with pytest.raises(MetastemError, match=words) as err:
        read_gmt(p)
    assert str(p) in str(err.value) and "Fix:" in str(err.value)


def test_unreadable_and_missing_gmt(tmp_path):
    p = tmp_path / "binary.gmt"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(MetastemError, match="cannot be read as text"):
        read_gmt(p)
    with pytest.raises(MetastemError, match="not found"):
        read_gmt(tmp_path / "absent.gmt")


def test_shipped_gmts_parse_with_gseapy_and_agree(repo):
    """Our reader and gseapy's agree; human and mouse files hold the same sets."""
    from gseapy.parser import read_gmt as gp_read_gmt

    for species in ("human", "mouse"):
        path = repo / GENE_SETS / f"metastasis_{species}.gmt"
        ours, theirs = read_gmt(path), gp_read_gmt(str(path))
        assert ours == theirs
        assert len(ours) >= 15
    human, mouse = (read_gmt(repo / GENE_SETS / f"metastasis_{s}.gmt") for s in ("human", "mouse"))
    assert list(human) == list(mouse)


def test_every_symbol_is_in_the_shipped_ortholog_mapping(repo):
    orth = pd.read_csv(repo / GENE_SETS / "orthologs_human_mouse.tsv", sep="\t", comment="#", dtype=str)
    used = orth[orth["used"] == "True"]
    human = {g for gs in read_gmt(repo / GENE_SETS / "metastasis_human.gmt").values() for g in gs}
    mouse = {g for gs in read_gmt(repo / GENE_SETS / "metastasis_mouse.gmt").values() for g in gs}
    assert human <= set(used["human_symbol"])
    assert mouse <= set(used["mouse_symbol"])
    pairs = set(zip(used["human_symbol"], used["mouse_symbol"]))
    for h, m in [("KITLG", "Kitl"), ("CD24", "Cd24a"), ("CCL21", "Ccl21a"), ("MMP1", "Mmp1a"), ("CA9", "Car9"),
                 ("CCN2", "Ccn2")]:
        assert (h, m) in pairs


def test_mouse_gmt_is_what_the_build_script_writes(repo, tmp_path, monkeypatch):
    """The shipped mouse GMT is regenerated exactly from the human GMT and the ortholog table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_mouse_sets", repo / GENE_SETS / "build_mouse_sets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = pd.read_csv(mod.ORTHOLOGS, sep="\t", comment="#", dtype=str)
    built = mod.mouse_sets(mod.read_gmt_lines(mod.HUMAN_GMT), table)
    assert {n: g for n, _, g in built} == read_gmt(repo / GENE_SETS / "metastasis_mouse.gmt")


def test_provenance_covers_every_set(repo):
    prov = pd.read_csv(repo / GENE_SETS / "metastasis_provenance.tsv", sep="\t", comment="#")
    assert set(prov["set"]) == set(read_gmt(repo / GENE_SETS / "metastasis_human.gmt"))
    assert set(prov["kind"]) <= {"target-gene readout", "ligand/receptor list", "mixed"}
    assert set(prov["review_link_verified"]) == {"no"}  # the review's full text was not available


def test_aliases_match_old_names_both_ways(repo):
    human = read_aliases(repo / GENE_SETS / "aliases_human.tsv", "human")
    mouse = read_aliases(repo / GENE_SETS / "aliases_human.tsv", "mouse")
    assert human["CTGF"] == "CCN2" and human["IL8"] == "CXCL8" and mouse["Ctgf"] == "Ccn2"
    # data annotated with the old name, set with the new one
    found, via = resolve_genes(["CCN2", "MMP1", "NOPE"], {"CTGF", "MMP1"}, human)
    assert found == ["CTGF", "MMP1"] and via == {"CCN2": "CTGF"}
    # set with the old name, data with the new one; a present gene is never replaced by an alias
    assert resolve_genes(["IL8", "CCN2"], {"CXCL8", "CCN2", "CTGF"}, human)[0] == ["CXCL8", "CCN2"]
    cov = gene_set_coverage({"S": ["CCN2", "IL11"]}, pd.Index(["CTGF", "IL11"]), human).iloc[0]
    assert cov["coverage"] == 1.0 and cov["genes_found"] == "CTGF,IL11" and cov["aliases_used"] == "CCN2=CTGF"


def _aucell_reference(X, gene_idx, top_frac=0.05):
    """Straightforward per-cell AUCell with ties shared: each gene of a block of tied values gets the
    mean weight max(n_top - p, 0) over the positions p the block occupies."""
    n_cells, n_genes = X.shape
    n_top = max(1, int(round(top_frac * n_genes)))
    in_set = np.zeros(n_genes, dtype=bool)
    in_set[gene_idx] = True
    out = np.zeros(n_cells)
    for i in range(n_cells):
        s, e = X.indptr[i], X.indptr[i + 1]
        vals, genes = X.data[s:e], X.indices[s:e]
        keep = vals > 0
        vals, genes = vals[keep], genes[keep]
        order = np.argsort(-vals, kind="stable")
        vals, genes = vals[order], genes[order]
        total, pos = 0.0, 0
        for v in np.unique(vals)[::-1]:
            block = np.flatnonzero(vals == v)
            weights = np.maximum(n_top - np.arange(pos, pos + block.size), 0)
            total += weights.mean() * in_set[genes[block]].sum()
            pos += block.size
        out[i] = total / (n_top * len(gene_idx))
    return out


@pytest.mark.parametrize("top_frac", [0.01, 0.05, 0.5, 1.0])
def test_compiled_aucell_equals_per_cell_reference(top_frac):
    rng = np.random.default_rng(1)
    X = sp.random(300, 800, density=0.25, format="csr", random_state=1, dtype=np.float32)
    X.data = np.log1p(rng.poisson(1.5, X.data.size).astype(np.float32))  # many ties, like UMI data
    X.eliminate_zeros()
    idx = rng.choice(800, 12, replace=False)
    np.testing.assert_allclose(aucell_score(X, idx, top_frac), _aucell_reference(X, idx, top_frac), atol=1e-12)
    many = aucell_matrix(X, {"a": idx, "b": idx[:3]}, top_frac)
    np.testing.assert_allclose(many["b"], _aucell_reference(X, idx[:3], top_frac), atol=1e-12)


def test_shared_ties_are_the_mean_over_random_tie_breaks():
    """What pySCENIC/ctxcore's shuffle-then-rank estimates with one draw, here exactly."""
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(0.3, (40, 200)).astype(np.float32))
    idx = rng.choice(200, 10, replace=False)
    exact = aucell_score(X, idx, 0.05)
    n_top, acc = 10, np.zeros(40)
    for _ in range(400):
        perm = rng.permutation(200)
        for i in range(40):
            v, g = X.data[X.indptr[i]:X.indptr[i + 1]], X.indices[X.indptr[i]:X.indptr[i + 1]]
            top = g[np.lexsort((perm[g], -v))][:n_top]
            acc[i] += np.sum((n_top - np.arange(top.size))[np.isin(top, idx)]) / (n_top * 10)
    np.testing.assert_allclose(acc / 400, exact, atol=0.01)   # Monte Carlo error at 400 draws: < 0.005


def test_aucell_scores_do_not_depend_on_gene_order():
    """Depth-only Poisson counts (ties at 1-2 by the hundred): per-cell scores after a random
    permutation of var_names against the original. Breaking ties by gene index gave Spearman 0.30."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    counts = rng.poisson(np.outer(rng.lognormal(0, 0.5, 1000), rng.lognormal(-1.0, 1.5, 5000))).astype(np.float32)
    X = sp.csr_matrix(np.log1p(counts))
    genes = np.array([f"G{i}" for i in range(5000)])
    sets = {f"S{k}": rng.choice(5000, 10, replace=False) for k in range(5)}
    perm = rng.permutation(5000)
    where = np.empty(5000, dtype=int)
    where[perm] = np.arange(5000)                 # new position of each original gene
    Xp = sp.csr_matrix(X[:, perm])
    assert (genes[perm][where[sets["S0"]]] == genes[sets["S0"]]).all()
    a = aucell_matrix(X, sets)
    b = aucell_matrix(Xp, {k: where[v] for k, v in sets.items()})
    for k in sets:
        assert spearmanr(a[k], b[k])[0] >= 0.99, k
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-12)  # exactly equal, in fact


def test_grouped_aucell_sums_equal_per_cell_scores():
    from metastem.genesets import aucell_grouped

    rng = np.random.default_rng(2)
    X = sp.csr_matrix(np.log1p(rng.poisson(0.8, (500, 400)).astype(np.float32)))
    sets = [rng.choice(400, k, replace=False) for k in (3, 8, 20, 8)]
    group = rng.integers(-1, 4, 500)
    cells, S, Q, NZ = aucell_grouped(X, sets, group, 4, n_cell_sets=2, n_chunks=3)
    full = aucell_matrix(X, {str(i): s for i, s in enumerate(sets)}).to_numpy()
    np.testing.assert_allclose(cells, full[:, :2], atol=1e-12)
    for g in range(4):
        np.testing.assert_allclose(S[g], full[group == g].sum(0), atol=1e-10)
        np.testing.assert_allclose(Q[g], (full[group == g] ** 2).sum(0), atol=1e-10)
        assert (NZ[g] == (full[group == g] > 0).sum(0)).all()


def test_aucell_recovers_a_planted_set():
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, size=(400, 1000)).astype(np.float32)
    planted = np.arange(10)
    counts[:100, planted] += rng.poisson(6.0, size=(100, 10))
    s = aucell_score(sp.csr_matrix(np.log1p(counts)), planted)
    assert s[:100].min() > np.quantile(s[100:], 0.95)


def test_score_genes_matrix_equals_scanpy(demo_clustered):
    """The all-sets-at-once score_genes gives scanpy's values (same control genes, same seed)."""
    import scanpy as sc

    from metastem.genesets import score_genes_matrix

    adata = demo_clustered.copy()
    sets = {"planted": ["CXCR4", "CXCL12", "MET", "HGF"], "stem": ["SOX2", "PROM1", "CD44", "NES", "NOT_A_GENE"],
            "one": ["VIM"]}
    ours = score_genes_matrix(adata.X, adata.var_names, sets, ctrl_size=50, seed=3)
    for name, genes in sets.items():
        sc.tl.score_genes(adata, [g for g in genes if g in adata.var_names], ctrl_size=50, random_state=3,
                          score_name=name, use_raw=False)
        # same control genes; the values agree to float32 precision (X is float32)
        np.testing.assert_allclose(ours[name], adata.obs[name], rtol=0, atol=1e-6)
