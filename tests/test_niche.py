"""Niche ligand-receptor analysis: planted interactions recovered, offline, honest fallbacks, h5ad-safe output."""
from __future__ import annotations

import json
import socket

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from metastem import niche
from metastem.errors import MetastemError

GROUPS = {"malignant_csc": 60, "malignant_other": 300, "fibroblast": 150, "T cell": 150, "myeloid": 120,
          "endothelial": 100}


def _planted(seed: int = 0, plant: bool = True, genes_seed: int | None = None) -> ad.AnnData:
    """Log-normalised Poisson data over 400 resource genes: random group-specific expression everywhere
    (so that many pairs are 'specific' by chance), plus CXCL12 high in fibroblasts and CXCR4 high in
    CSC-like cells when ``plant``. ``genes_seed``: choose the genes with their own seed (same genes, new data)."""
    rng = np.random.default_rng(seed)
    res = niche.load_resource()
    genes = sorted({g for c in pd.concat([res["ligand"], res["receptor"]]) for g in c.split("_")})
    genes = list((rng if genes_seed is None else np.random.default_rng(genes_seed)).choice([g for g in genes if g not in ("CXCL12", "CXCR4")], 398, replace=False))
    genes += ["CXCL12", "CXCR4"]
    kinds = np.repeat(list(GROUPS), list(GROUPS.values()))
    mu = {k: rng.lognormal(-1.0, 1.0, len(genes)) for k in GROUPS}  # group-level means
    if plant:
        for k in GROUPS:
            mu[k][-2:] = 0.05
        mu["fibroblast"][-2], mu["malignant_csc"][-1] = 6.0, 5.0
    lam = np.stack([mu[k] for k in kinds]) * rng.lognormal(0, 0.3, (len(kinds), 1))
    X = np.log1p(rng.poisson(lam).astype(np.float32))
    obs = pd.DataFrame({"malignant": [k.startswith("malignant") for k in kinds],
                        "csc_like": kinds == "malignant_csc",
                        "cell_type": pd.Categorical([k.replace("malignant_", "mal ") for k in kinds])},
                       index=[f"c{i}" for i in range(len(kinds))])
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=genes))


@pytest.fixture(scope="module")
def planted():
    adata = _planted()
    niche.niche_interactions(adata, groupby="cell_type", n_perms=300, seed=0)
    return adata


def test_planted_stromal_cxcl12_to_csc_cxcr4_ranks_on_top(planted):
    t = niche.interactions_table(planted)
    assert list(t.columns) == niche.COLUMNS and (t["rank"].to_numpy() == np.arange(1, len(t) + 1)).all()
    # every scored pair involves the CSC-like cells, both directions and autocrine
    assert ((t["sender"] == niche.CSC_GROUP) | (t["receiver"] == niche.CSC_GROUP)).all()
    pairs = set(zip(t["sender"], t["receiver"]))
    assert ("fibroblast", niche.CSC_GROUP) in pairs and (niche.CSC_GROUP, "fibroblast") in pairs
    assert (niche.CSC_GROUP, niche.CSC_GROUP) in pairs
    hit = t[(t["ligand"] == "CXCL12") & (t["receptor"] == "CXCR4")].set_index("sender")
    top = hit.loc["fibroblast"]
    assert top["receiver"] == niche.CSC_GROUP and top["review_axis"] == "CXCL12->CXCR4"
    assert top["p"] < 0.01 and top["rank"] <= 5, top.to_dict()   # among ~10^3-10^4 rows
    assert top["ligand_prop"] > 0.9 and top["receptor_prop"] > 0.9
    # the same pair from other senders is neither specific nor near the top
    others = hit.drop(index="fibroblast", errors="ignore")
    assert (others["rank"] > 10 * top["rank"]).all() and (others["p"] >= 0.05).all()


def test_without_the_planted_pair_it_is_not_on_top():
    adata = _planted(plant=False)
    niche.niche_interactions(adata, groupby="cell_type", n_perms=200, seed=0)
    t = niche.interactions_table(adata)
    hit = t[(t["ligand"] == "CXCL12") & (t["receptor"] == "CXCR4") & (t["sender"] == "fibroblast")]
    assert hit.empty or hit["rank"].min() > 20


def test_review_axes_are_flagged_across_complexes_and_species():
    assert niche.review_axis("VEGFA", "FLT1_KDR") == "VEGFA/PGF->FLT1/KDR"
    assert niche.review_axis("WNT3A", "FZD1_LRP6") == "Wnt"
    assert niche.review_axis("S100A9", "TLR4") == "S100A8/A9->TLR4/AGER"
    assert niche.review_axis("Kitl", "Kit", species="mouse") == "KITLG->KIT"
    assert niche.review_axis("Ccl21a", "Ccr7", species="mouse") == "CCL19/21->CCR7"
    assert niche.review_axis("COL1A1", "CD44") == "" and niche.review_axis("CXCR4", "CXCL12") == ""
    res = niche.load_resource()
    pairs = set(zip(res["ligand"], res["receptor"]))
    # every axis the review names is in the shipped resource, so it can be found at all
    for lr in [("CXCL12", "CXCR4"), ("HGF", "MET"), ("KITLG", "KIT"), ("SPP1", "CD44"), ("HAS2", "CD44"),
               ("S100A8", "TLR4"), ("JAG1", "NOTCH1"), ("SHH", "PTCH1_SMO"), ("TGFB1", "TGFBR1_TGFBR2")]:
        assert lr in pairs, lr
    assert len(niche.load_resource(species="mouse")) > 3000


def test_runs_with_the_network_unusable(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    adata = _planted(seed=1)
    niche.niche_interactions(adata, groupby="cell_type", n_perms=50, max_cells_per_group=80, seed=1)
    t = niche.interactions_table(adata)
    assert len(t) > 100 and t["p"].between(0, 1).all()
    groups = pd.DataFrame(adata.uns["niche"]["groups"]).set_index("group")
    assert groups["n_used"].max() == 80 and groups.loc[niche.CSC_GROUP, "n_used"] == 60


def test_output_round_trips_through_h5ad_and_the_plot_is_drawn(planted, tmp_path):
    path = tmp_path / "n.h5ad"
    planted.write_h5ad(path)
    back = ad.read_h5ad(path)
    pd.testing.assert_frame_equal(niche.interactions_table(back), niche.interactions_table(planted),
                                  check_dtype=False, check_categorical=False)
    params = json.loads(back.uns["niche"]["params_json"])
    assert params["n_perms"] == 300 and params["resource"] == "liana_consensus"
    assert set(back.obs["niche_group"].dropna()) == {niche.CSC_GROUP, niche.MALIGNANT_GROUP, "fibroblast",
                                                      "T cell", "myeloid", "endothelial"}
    fig = niche.plot_niche(planted, return_fig=True, save=tmp_path / "dot.png")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert "CXCL12 -> CXCR4  [CXCL12->CXCR4]" in labels and len(labels) <= 20
    assert (tmp_path / "dot.png").stat().st_size > 10000


def test_fallbacks_are_noted_not_guessed():
    adata = _planted()
    # no malignant call: every non-CSC cell by its group, with a note
    a = adata.copy()
    del a.obs["malignant"]
    labels, notes, has_csc = niche.niche_groups(a, groupby="cell_type")
    assert has_csc and "mal other" in set(labels) and niche.MALIGNANT_GROUP not in set(labels)
    assert any("not identified" in n for n in notes)
    # no normal reference (all malignant, evidence 'none'): same fallback
    a = adata.copy()
    a.obs["malignant"], a.obs["malignant_evidence"] = True, "none"
    assert any("not identified" in n for n in niche.niche_groups(a, groupby="cell_type")[1])
    # numeric clusters get the column name
    a.obs["leiden"] = pd.Categorical(np.arange(a.n_obs) % 3)
    assert set(niche.niche_groups(a)[0]) >= {"leiden 0", niche.CSC_GROUP}
    # too few CSC-like cells: an empty table and a note, not an error
    a = adata.copy()
    a.obs["csc_like"] = False
    a.obs.iloc[:3, a.obs.columns.get_loc("csc_like")] = True
    niche.niche_interactions(a, groupby="cell_type", n_perms=20)
    assert niche.interactions_table(a).empty and any("CSC-like cells" in n for n in niche.notes(a))
    fig = niche.plot_niche(a, return_fig=True)
    assert fig.axes[0].texts
    with pytest.raises(MetastemError, match="no column 'nope'"):
        niche.niche_interactions(adata, groupby="nope")
    with pytest.raises(MetastemError, match="resource not found"):
        niche.niche_interactions(adata, groupby="cell_type", resource="/no/such.tsv")


def test_the_simulators_planted_interaction_is_found():
    """The cohort simulator plants fibroblast CXCL12 -> stem-like CXCR4 and HGF -> MET, endothelial JAG1 -> NOTCH1
    and myeloid SPP1 -> CD44. Measured: each p = 1/301 (the floor), overall ranks 1, 2, 4 and 28 of 724 rows
    (HGF -> MET is outranked by HGF -> CD44: CD44 is also a stem gene, so the planted ligand meets a stronger
    receptor); the four best rows are the planted ligands from their planted senders to CSC-like cells."""
    from metastem import simulate

    planted = getattr(simulate, "PLANTED_INTERACTIONS", None)
    if not planted:
        pytest.skip("this simulator plants no ligand-receptor interaction")
    import scanpy as sc

    adata = simulate.simulate_tumour(2500, 3000, seed=0, n_samples=1, frac_normal=0.4, n_cnv_arms=0,
                                     frac_doublets=0.0, frac_low_quality=0.0)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    obs = adata.obs
    obs["malignant"] = obs["true_malignant"].astype(bool)
    obs["csc_like"] = obs["malignant"] & obs["true_stem_like"].astype(bool)
    obs["cell_type"] = np.where(obs["malignant"], "malignant", obs["true_cell_type"].astype(str))
    niche.niche_interactions(adata, groupby="cell_type", n_perms=300, seed=0)
    t = niche.interactions_table(adata)
    for pi in planted:
        row = t[(t["ligand"] == pi["ligand"]) & (t["receptor"] == pi["receptor"]) & (t["sender"] == pi["sender"])
                & (t["receiver"] == niche.CSC_GROUP)]
        assert len(row) == 1 and row["p"].iloc[0] < 0.01, (pi, row.to_dict("records"))
        assert row["rank"].iloc[0] <= max(10, 0.05 * len(t)), (pi, int(row["rank"].iloc[0]), len(t))
    top = t.head(len(planted))
    assert (top["receiver"] == niche.CSC_GROUP).all()
    assert set(zip(top["sender"], top["ligand"])) <= {(pi["sender"], pi["ligand"]) for pi in planted}, top


def test_schema_defaults_equal_the_signature_and_the_rule_script_runs(repo, tmp_path):
    """The workflow script end to end on a small final.h5ad (with a counts layer it must not need)."""
    import inspect
    import runpy
    from types import SimpleNamespace

    from metastem.smk.config import load_schema, validate_with_defaults

    cfg = validate_with_defaults({}, load_schema(repo / "workflow/schemas/config.schema.yaml"), where="defaults")
    sig = inspect.signature(niche.niche_interactions).parameters
    for key, value in cfg["niche"].items():
        if key in sig:
            assert sig[key].default == value, key
    assert inspect.signature(niche.plot_niche).parameters["n_top"].default == cfg["niche"]["n_top"]
    adata = _planted(seed=2)
    adata.layers["counts"] = adata.X.copy()
    adata.obs["leiden"] = pd.Categorical(adata.obs["cell_type"].cat.codes.astype(str))
    adata.write_h5ad(tmp_path / "final.h5ad")
    out = _outputs(tmp_path)
    smk = SimpleNamespace(input=SimpleNamespace(h5ad=str(tmp_path / "final.h5ad")),
                          output=SimpleNamespace(**{k: str(v) for k, v in out.items()}),
                          params=SimpleNamespace(row={"species": "human", "labels": "cell_type"},
                                                 params={"niche": {**cfg["niche"], "n_perms": 100}, "seed": 0}),
                          log=[str(tmp_path / "niche.log")], threads=1, rule="niche",
                          wildcards=SimpleNamespace(dataset="tiny"), scriptdir=str(repo / "workflow/scripts"))
    runpy.run_path(str(repo / "workflow/scripts/niche.py"), init_globals={"snakemake": smk})
    table = pd.read_csv(out["interactions"], sep="\t", keep_default_na=False)
    assert list(table.columns) == niche.COLUMNS
    top = table.iloc[0]
    assert (top["sender"], top["receiver"], top["ligand"], top["receptor"]) == ("fibroblast", niche.CSC_GROUP,
                                                                                 "CXCL12", "CXCR4")
    info = json.loads(out["info"].read_text())
    assert info["params"]["groupby_used"] == "cell_type" and "CXCL12->CXCR4" in info["review_axes_specific"]
    assert info["n_interactions"] == len(table) and out["figure"].stat().st_size > 10000
    # no obs 'sample': one sample, so every interaction is descriptive and the per-sample rows are the pooled run
    by = pd.read_csv(out["by_sample"], sep="\t", keep_default_na=False)
    assert list(by.columns) == niche.BY_SAMPLE_COLUMNS and set(by["sample"]) == {"all cells"}
    assert (table["replication"] == "descriptive (n = 1 sample)").all()
    assert info["replication"]["n_samples"] == 1 and "skipped" not in info


def _outputs(tmp_path):
    return {"info": tmp_path / "niche/info.json", "interactions": tmp_path / "tables/niche_interactions.tsv",
            "by_sample": tmp_path / "tables/niche_by_sample.tsv", "figure": tmp_path / "figures/niche_interactions.png"}


def test_without_csc_like_cells_the_stage_writes_skipped_outputs(repo, tmp_path):
    """stemness.required: false on data without stemness genes: stemness NaN, no CSC-like cell. The stage completes
    with info.json 'skipped', tables with their headers and an empty figure named in figure_notes."""
    import runpy
    from types import SimpleNamespace

    from metastem.smk.config import load_schema, validate_with_defaults

    cfg = validate_with_defaults({}, load_schema(repo / "workflow/schemas/config.schema.yaml"), where="defaults")
    adata = _planted(seed=4)
    adata.obs["csc_like"] = False
    adata.obs["stemness"] = np.nan
    adata.obs["leiden"] = pd.Categorical(adata.obs["cell_type"].cat.codes.astype(str))
    assert "no stemness score" in niche.skip_reason(adata)
    called = adata.copy()
    called.obs["stemness"] = 0.5
    assert "no malignant cell was called CSC-like" in niche.skip_reason(called)
    called.obs["csc_like"] = called.obs["malignant"] & (np.arange(called.n_obs) % 7 == 0)
    assert niche.skip_reason(called) is None
    adata.write_h5ad(tmp_path / "final.h5ad")
    out = _outputs(tmp_path)
    smk = SimpleNamespace(input=SimpleNamespace(h5ad=str(tmp_path / "final.h5ad")),
                          output=SimpleNamespace(**{k: str(v) for k, v in out.items()}),
                          params=SimpleNamespace(row={"species": "human", "labels": ""},
                                                 params={"niche": cfg["niche"], "seed": 0}),
                          log=[str(tmp_path / "niche.log")], threads=1, rule="niche",
                          wildcards=SimpleNamespace(dataset="nostem"), scriptdir=str(repo / "workflow/scripts"))
    runpy.run_path(str(repo / "workflow/scripts/niche.py"), init_globals={"snakemake": smk})
    info = json.loads(out["info"].read_text())
    assert "no stemness score" in info["skipped"] and info["n_interactions"] == 0
    assert info["figure_notes"] == {"niche_interactions": info["skipped"]}
    assert out["figure"].is_file() and out["figure"].stat().st_size == 0
    for key, cols in (("interactions", niche.COLUMNS), ("by_sample", niche.BY_SAMPLE_COLUMNS)):
        tab = pd.read_csv(out[key], sep="\t")
        assert list(tab.columns) == cols and tab.empty, key


def _samples(n: int, absent_in: tuple[int, ...] = ()) -> ad.AnnData:
    """``n`` tumours of the planted data (each its own random background); CXCR4 silenced in the samples listed
    in ``absent_in``; the last sample's endothelial cells cut to 5 (below min_cells)."""
    parts = []
    for i in range(n):
        a = _planted(seed=10 + i, genes_seed=10)
        if i in absent_in:
            X = a.X.tolil()
            X[:, a.var_names.get_loc("CXCR4")] = 0
            a.X = sp.csr_matrix(X)
        if i == n - 1:
            endo = np.flatnonzero(a.obs["cell_type"] == "endothelial")
            a = a[np.setdiff1d(np.arange(a.n_obs), endo[5:])].copy()
        a.obs_names = [f"S{i}_{c}" for c in a.obs_names]
        a.obs["sample"] = f"S{i}"
        parts.append(a)
    return ad.concat(parts, merge="same")


def test_per_sample_replication_counts_samples_not_cells():
    """A pair planted in every sample is 'replicated (k of k samples)'; silenced in one of four samples (present in
    3 of 4, below 80 %) it is not; with two samples it is descriptive. Groups too small in a sample are skipped
    there with a note."""
    kw = dict(groupby="cell_type", n_perms=100, max_cells_per_group=120, seed=0)

    def pair(a):
        t = niche.interactions_table(a)
        return t[(t["sender"] == "fibroblast") & (t["receiver"] == niche.CSC_GROUP) & (t["ligand"] == "CXCL12")
                 & (t["receptor"] == "CXCR4")].iloc[0]

    a = _samples(3)
    niche.niche_interactions(a, **kw)
    row = pair(a)
    assert row["replication"] == "replicated (3 of 3 samples)" and row["n_samples_present"] == 3, row.to_dict()
    by = niche.by_sample_table(a)
    assert list(by.columns) == niche.BY_SAMPLE_COLUMNS and set(by["sample"]) == {"S0", "S1", "S2"}
    # endothelial cells of S2 are 5 (< min_cells 10): S2 tests no endothelial pair, and says so
    endo = by[(by["sender"] == "endothelial") | (by["receiver"] == "endothelial")]
    assert len(endo) and "S2" not in set(endo["sample"])
    assert any(n.startswith("Sample S2: 1 group(s)") and "endothelial" in n for n in niche.notes(a))
    t = niche.interactions_table(a)
    assert (t.loc[t["sender"] == "endothelial", "n_samples_tested"] == 2).all()
    assert t.loc[t["sender"] == "endothelial", "replication"].str.startswith("descriptive (n = 2").all()

    b = _samples(4, absent_in=(1,))
    niche.niche_interactions(b, **kw)
    row = pair(b)
    assert row["p"] < 0.05 and row["replication"] == "not replicated (3 of 4 samples)", row.to_dict()
    s1 = niche.by_sample_table(b).set_index(["sample", "sender", "receiver", "ligand", "receptor"])
    assert not s1.loc[("S1", "fibroblast", niche.CSC_GROUP, "CXCL12", "CXCR4"), "present"]

    c = _samples(2)
    niche.niche_interactions(c, **kw)
    assert pair(c)["replication"] == "descriptive (n = 2 samples)"
    assert niche.MIN_REPLICATION_SAMPLES == 3 and niche.MIN_PRESENT_FRACTION == 0.8  # the pathway stage's rule
    from metastem import pathways

    assert (pathways.MIN_REPLICATION_SAMPLES, pathways.MIN_SIGN_FRACTION) == (3, 0.8)


def test_mouse_data_use_the_mouse_resource_and_axes():
    adata = _planted(seed=3)
    adata.var_names = [g.capitalize() for g in adata.var_names]
    niche.niche_interactions(adata, groupby="cell_type", species="mouse", n_perms=100, seed=0)
    t = niche.interactions_table(adata)
    top = t.iloc[0]
    assert (top["sender"], top["ligand"], top["receptor"], top["review_axis"]) == ("fibroblast", "Cxcl12", "Cxcr4",
                                                                                  "CXCL12->CXCR4")
