"""Issue 16 validation on the demo tumour (3 patients): every planted readout that keeps the minimum genes is called
with its sign at empirical p < 0.01, no unplanted set is called, and each sample's bootstrap CI covers the planted
effect.

Two definitions of CSC-like, each where it belongs:

- **the calls** use CSC-like cells as the library makes them (QC, clustering, the CNV malignant call, the stemness
  score and ``csc.call_csc_like``), with the stemness score's genes left out of every set as the stage does: the
  demo's claim is about what a user of the pipeline gets;
- **the CI coverage** uses the simulator's truth (stem-like among clean malignant cells). A CI is a statement about
  a parameter: the effect between *given* groups in the population of cells the sample was drawn from. For the
  called groups that parameter has no planted value (they are a noisy cut of a stemness score); for the true groups
  it has one. The planted effect on the CI's own scale (Cohen's d of AUCell scores, per sample) is measured on a
  ten times larger draw of the same tumours: the simulator draws every gene-level parameter (genes, baselines,
  batch shifts, CNVs) before any cell (tests/test_simulate.py), so ``simulate_tumour(10 x n, seed)`` is a larger
  sample of the same patients, scored on the same genes with the same code. Its own sampling error is ~1/3 of the
  small sample's, so a calibrated 95 % interval misses it ~6 % of the time.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import stats

from metastem import cluster, cnv, csc, qc, simulate, stemness
from metastem import pathways as pw

SEEDS = (0, 1)          # the demo's seed and one other
N_CELLS = 3000          # simulate_tumour's default (3 patients, 4000 genes)
REFERENCE_FACTOR = 10   # the planted effect's population value: 10x more cells of the same tumours


def _designed_genes() -> set[str]:
    """Genes the simulator makes differ between stem-like and other malignant cells."""
    return ({g for genes in simulate.PLANTED_PROGRAMMES.values() for g in genes}
            | {p["receptor"] for p in simulate.PLANTED_INTERACTIONS}
            | set(simulate.STEM_GENES) | set(simulate.CYCLING_GENES)
            | set(simulate.BRANCH_A_GENES) | set(simulate.BRANCH_B_GENES))


@pytest.fixture(scope="module", params=SEEDS)
def library_run(request, defaults):
    """The demo through the library's stages up to score_pathways (defaults: 1000 matched null sets, 1000
    bootstrap replicates)."""
    seed = request.param
    raw = simulate.simulate_tumour(N_CELLS, seed=seed)
    a, _, _ = qc.run_qc(raw.copy(), defaults["qc"], values="counts", species="human", seed=seed)
    cluster.normalize(a, values="counts", target_sum=defaults["cluster"]["target_sum"])
    cluster.embed_and_cluster(a, defaults["cluster"], seed=seed)
    cnv.infer_malignant(a)
    s = {k: v for k, v in defaults["stemness"].items() if k not in ("csc_groupby", "csc_rule")}
    info = stemness.score_stemness(a, species="human", seed=seed, **s)
    csc.call_csc_like(a, groupby=defaults["stemness"]["csc_groupby"], quantile=defaults["stemness"]["csc_quantile"],
                      rule=defaults["stemness"]["csc_rule"], seed=seed)
    # the genes the stemness stage records and the pathway stage leaves out (signature + stemness sets)
    sets = [g for rec in info["gene_set_coverage"] for g in str(rec.get("genes_found", "")).split(",") if g]
    exclude = list(dict.fromkeys(info["signature_genes"] + sets))
    p = defaults["pathways"]
    st = pw.score_pathways(a, n_null=p["n_null"], n_boot=p["n_boot"], min_genes_found=p["min_genes_found"],
                           fdr=p["fdr"], exclude_genes=exclude, seed=seed)
    return seed, raw, st


def test_planted_readouts_are_called_with_their_sign_and_unplanted_sets_are_not(library_run, defaults):
    """Measured (seeds 0 / 1): all 5 planted sets keep >= 3 genes (4-6 / 4-7 after the stemness genes go) and are
    called with their sign, p_null 0.001 / 0.001-0.004, every sample on the planted side of its null (frac_same_sign
    1.0); Cohen's d +1.8..+2.5 and -1.9 (EMT_CORE_DN) / +2.6..+2.8 and -1.7. 'replicated' (the across-sample t-test,
    BH) is yes at seed 0 (q 0.043) and no at seed 1 (q 0.060-0.070): with 3 samples it is not asserted. Unplanted
    tumour-side sets: 6 / 4 tested, none called. The 11 *_NICHE sets (ligands and niche-cell receptors) are scored
    per cell but never contrasted: no effect, no null, no per-sample row, never called."""
    seed, raw, st = library_run
    truth = simulate.planted_truth(raw).set_index("set")
    d = st.details.set_index("set")
    cov = st.coverage.set_index("set")
    min_genes = defaults["pathways"]["min_genes_found"]
    assert st.n_samples == 3 and st.unit == "sample"

    reached = [s for s in truth.index if cov.loc[s, "n_used"] >= min_genes]
    assert len(reached) >= 4, cov.loc[list(truth.index), ["n_used", "genes_excluded_stemness"]]
    for s in reached:
        row = d.loc[s]
        want = "up in CSC-like" if truth.loc[s, "direction"] == "up" else "down in CSC-like"
        assert row["flag"] == "ok" and row["called"] and row["call"] == want, (seed, s, row.to_dict())
        assert row["p_null"] < 0.01, (seed, s, row["p_null"])
        assert np.sign(row["effect_vs_null"]) == (1 if truth.loc[s, "direction"] == "up" else -1), (seed, s)
        # the sample is the unit: every sample's effect lies on the planted side of its own null mean
        assert row["n_samples"] == 3 and row["frac_same_sign"] == 1.0, (seed, s, row.to_dict())

    designed = _designed_genes()
    found = cov["genes_found"].fillna("").str.split(",")
    unplanted = [s for s in d.index if d.loc[s, "role"] == "pathway" and not set(found[s]) & designed]
    tested = [s for s in unplanted if d.loc[s, "flag"] == "ok"]
    assert len(tested) >= 4, (seed, d.loc[unplanted, "flag"].to_dict())
    called = d.loc[tested, "called"]
    assert not called.any(), (seed, d.loc[called[called].index, ["effect", "p_null", "q_null"]])
    assert (d.loc[tested, "replicated"] != "yes").all()
    niche = d[d["role"] == "niche"]
    assert len(niche) == 11 and niche.index.str.endswith("_NICHE").all()
    assert niche["effect"].isna().all() and niche["p_null"].isna().all() and not niche["called"].any()
    assert (niche.loc[niche["flag"] == "ok", "call"] == pw.CALL_NICHE).all()
    assert (niche["replicated"] == "not tested").all()
    assert not st.per_sample["set"].isin(niche.index).any()
    # the positive control separates the cells it helped define and is never a finding
    assert d.loc["CSC_MARKERS", "effect"] > 2 and not d.loc["CSC_MARKERS", "called"]


def _truth_effects(seed: int, n_cells: int, sets: dict[str, list[str]], n_boot: int) -> pd.DataFrame:
    """Per-sample Cohen's d (and bootstrap CI) of CSC-like vs other malignant cells, with CSC-like = the
    simulator's stem-like cells among clean malignant cells (no doublet, not low quality): the same cells in a
    draw of any size."""
    a = simulate.simulate_tumour(n_cells, seed=seed)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    o = a.obs
    clean = o["true_malignant"].to_numpy(bool) & ~o["true_doublet"].to_numpy(bool) & ~o["true_low_quality"].to_numpy(bool)
    o["malignant"] = clean
    o["csc_like"] = clean & o["true_stem_like"].to_numpy(bool)
    st = pw.score_pathways(a, gene_sets=sets, aliases=None, exclude_genes=[], n_null=0, n_boot=n_boot, seed=seed)
    return st.per_sample


def test_per_sample_bootstrap_cis_cover_the_planted_effect(library_run, defaults):
    """Each sample's 95 % bootstrap CI (true groups, the sets scored on the genes the pipeline used) against the
    planted effect's population value. Allowed misses: the 99th percentile of Binomial(n, 0.06), so a calibrated CI
    passes (4 of 15); a wrong reference fails: measured 15 / 15 intervals covered at seed 0 and 14 / 15 at seed 1,
    but only 4 / 15 and 5 / 15 cover the planted effect shrunk by 20 %, and none covers 0.

    The other tested sets (no planted effect, often sparse) are held to the same coverage where an interval is
    given, and none is given from fewer than ``MIN_SIGNAL_CELLS`` CSC-like cells with signal: without that floor
    78 % of all intervals covered, 13 % of those with no such cell (benchmarks/pathway_ci_coverage.py)."""
    seed, raw, st = library_run
    cov = st.coverage.set_index("set")
    d = st.details.set_index("set")
    min_genes = defaults["pathways"]["min_genes_found"]
    planted = [s for s in simulate.PLANTED_PROGRAMMES if cov.loc[s, "n_used"] >= min_genes]
    others = [s for s in d.index if s not in planted and d.loc[s, "role"] == "pathway" and d.loc[s, "flag"] == "ok"]
    assert len(others) >= 4, d["flag"].to_dict()
    sets = {s: cov.loc[s, "genes_used"].split(",") for s in planted + others}
    small = _truth_effects(seed, N_CELLS, sets, defaults["pathways"]["n_boot"])
    big = _truth_effects(seed, REFERENCE_FACTOR * N_CELLS, sets, n_boot=10)
    both = small.merge(big[["set", "sample", "effect"]].rename(columns={"effect": "planted"}), on=["set", "sample"])
    ps = both[both["set"].isin(planted)]
    assert len(ps) == 3 * len(planted) and ps[["effect", "ci_low", "ci_high", "planted"]].notna().all().all()
    direction = simulate.planted_truth(raw).set_index("set")["direction"]
    assert (np.sign(ps["planted"]) == ps["set"].map(direction).map({"up": 1, "down": -1})).all(), ps

    def misses(tab: pd.DataFrame, ref: pd.Series) -> int:
        return int((~((tab["ci_low"] <= ref) & (ref <= tab["ci_high"]))).sum())

    allowed = int(stats.binom.ppf(0.99, len(ps), 0.06))
    assert misses(ps, ps["planted"]) <= allowed, ps
    # the check has power: a reference 20 % off, or no effect, falls outside most intervals
    assert misses(ps, 0.8 * ps["planted"]) > allowed, ps
    assert misses(ps, 0 * ps["planted"]) == len(ps)

    rest = both[both["set"].isin(others)]
    sparse = rest["n_signal_csc_like"] < pw.MIN_SIGNAL_CELLS
    assert rest.loc[sparse, ["ci_low", "ci_high"]].isna().all().all()
    given = rest[~sparse]
    assert given[["ci_low", "ci_high", "planted"]].notna().all().all() and len(given) >= 4, rest
    assert misses(given, given["planted"]) <= int(stats.binom.ppf(0.99, len(given), 0.06)), given
