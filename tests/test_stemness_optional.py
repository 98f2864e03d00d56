"""Gene panels where no stemness score is possible (issue 17, item 3): refused in one line, or, with
``stemness.required: false``, completed without the stemness-dependent stages, the report saying which
were skipped and why, the cohort index saying "not computed" (never 0 %).

Fast tests: the pathway stage's functions and its rule script on a panel cut from the small demo (no
stemness or differentiation gene measured), and the report built from such stage files. Slow tests:
the whole workflow through the Snakemake CLI on a simulated panel.
"""
from __future__ import annotations

import json
import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from metastem import pathways as pw
from metastem.genesets import read_gmt, resolve_path

STEMNESS_GMTS = ("metastem:stemness_{species}.gmt", "metastem:stemness_differentiation_{species}.gmt")
PATHWAY_GMT = "metastem:metastasis_{species}.gmt"


def panel_genes(var_names, n_genes: int = 400, seed: int = 0) -> list[str]:
    """A panel of ``n_genes`` genes: every pathway-set gene the data hold, the rest drawn at random, and no
    gene of any stemness or differentiation set (so no stemness score is possible on it)."""
    stem = {g for f in STEMNESS_GMTS for genes in read_gmt(resolve_path(f, "human")).values() for g in genes}
    path = {g for genes in read_gmt(resolve_path(PATHWAY_GMT, "human")).values() for g in genes}
    names = [str(g) for g in var_names if not str(g).startswith("MT-") and str(g) not in stem]
    keep = [g for g in names if g in path]
    rest = [g for g in names if g not in set(keep)]
    rng = np.random.default_rng(seed)
    return keep + list(rng.choice(rest, n_genes - len(keep), replace=False))


# ----------------------------------------------------------------------------- fast: the pathway stage

@pytest.fixture(scope="module")
def panel(demo_clustered):
    """The clustered demo cut to a 400-gene panel, with the stemness stage run as ``required: false`` left
    it (stemness NaN, nothing CSC-like) and every cluster but the first called malignant."""
    from metastem import stemness

    a = demo_clustered[:, panel_genes(demo_clustered.var_names)].copy()
    first = a.obs["leiden"].cat.categories[0]
    a.obs["malignant"] = (a.obs["leiden"] != first).to_numpy()
    info = stemness.score_stemness(a, species="human", seed=0, required=False)
    assert info["status"] == "not_computed"  # the premise: on this panel no stemness score is possible
    return a, info


def test_pathway_scores_without_csc_like_cells_equal_those_with_them(panel, defaults, repo, monkeypatch):
    """No CSC-like cell: the per-cell scores and cluster means are those of a run with a contrast (they never
    read stemness), no null set is drawn, every contrast column is NaN and the sets say 'not tested'."""
    monkeypatch.chdir(repo)
    a, _ = panel
    params = dict(defaults["pathways"], n_null=50, n_boot=20, gsea_permutations=20)
    with_csc = a.copy()
    with_csc.obs["csc_like"] = with_csc.obs["malignant"].to_numpy() & (np.arange(a.n_obs) % 7 == 0)
    ref = pw.run_pathways(with_csc, params, species="human", seed=0, exclude_genes=[])
    assert ref.skipped is None and ref.ranking is not None

    def no_null_sets(*args, **kwargs):
        raise AssertionError("matched null sets were drawn although there is no contrast")

    monkeypatch.setattr(pw, "matched_null_sets", no_null_sets)
    b = a.copy()
    res = pw.run_pathways(b, params, species="human", seed=0, exclude_genes=[])
    cols = [f"pathway_{s}" for s in pw.scored_sets(b)]
    assert cols and cols == [f"pathway_{s}" for s in pw.scored_sets(with_csc)]
    scores = b.obs[cols].to_numpy(float)
    assert np.isfinite(scores).all() and (scores.std(axis=0) > 0).sum() >= len(cols) // 2
    np.testing.assert_array_equal(scores, with_csc.obs[cols].to_numpy(float))
    pd.testing.assert_frame_equal(res.cluster_means, ref.cluster_means)
    assert list(res.cluster_means.index) == list(b.obs["leiden"].cat.categories)

    n_malignant = int(b.obs["malignant"].sum())
    assert res.skipped and f"none of the {n_malignant} analysed malignant cells is CSC-like" in res.skipped
    assert any(n.startswith("CSC-like contrast skipped") for n in res.notes)
    d = res.details
    contrast = ["effect", "ci_low", "ci_high", "null_mean", "p_null", "q_null", "effect_vs_null", "p_replication",
                "auroc_pooled", "frac_cells_nonzero"]
    assert d[contrast].isna().all().all() and not d["called"].any()
    tested = d[(d["role"] == pw.ROLE_PATHWAY) & (d["flag"] == pw.FLAG_OK)]
    assert len(tested) and (tested["call"] == "not tested: no CSC-like cells").all()
    assert (d["replicated"] == "not tested").all() and res.unit == "none (no CSC-like cells)"
    assert res.per_sample.empty and "effect" in res.per_sample.columns
    assert res.ranking is None and res.gsea.empty and list(res.gsea.columns)[:3] == ["set", "gsea_es", "gsea_nes"]
    assert not res.ssgsea.empty  # ssGSEA of cluster pseudobulks needs no CSC-like cells
    assert list(res.summary.columns) == pw.SUMMARY_COLUMNS
    assert "No CSC-like contrast" in pw.methods_text(params, 0, 0, res.unit, 0, skipped=res.skipped)


def test_no_stemness_means_no_gene_is_excluded_from_the_pathway_sets(tmp_path):
    """stemness/info.json 'not_computed': nothing to be circular with, so the pathway sets keep every gene (the
    gene-count signature is still recorded, and on a panel it alone would empty most sets)."""
    table = tmp_path / "stemness_gene_sets.tsv"
    pd.DataFrame({"set": ["A"], "role": ["stem"], "genes_found": ["CD44,PROM1"]}).to_csv(table, sep="\t", index=False)
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"status": "computed", "signature_genes": ["NES", "SOX2"]}))
    assert pw.stemness_genes(info, table) == ["NES", "SOX2", "CD44", "PROM1"]
    info.write_text(json.dumps({"status": "not_computed", "signature_genes": ["NES", "SOX2"]}))
    assert pw.stemness_genes(info, table) == []


PATHWAY_OUTPUTS = {
    "h5ad": "final.h5ad", "info": "pathways/info.json", "effects": "figures/pathways_effects.png",
    "summary": "tables/pathways_summary.tsv", "details": "tables/pathways_details.tsv",
    "per_sample": "tables/pathways_per_sample.tsv", "coverage": "tables/pathways_coverage.tsv",
    "cluster_means": "tables/pathways_cluster_means.tsv", "gsea": "tables/gsea_prerank.tsv",
    "ssgsea": "tables/gsea_ssgsea_clusters.tsv", "heatmap": "figures/pathways_heatmap.png",
    "trends": "figures/pathways_pseudotime.png", "gsea_plot": "figures/pathways_gsea.png"}


def write_stage_inputs(d: Path, a: ad.AnnData, stem_info: dict) -> dict[str, str]:
    """What the pathway rule reads, as the earlier stages write it after ``stemness.required: false`` on a
    panel: stemness NaN and nothing CSC-like, pseudotime skipped (no root), the malignant calls."""
    from metastem import pseudotime as pt

    d.mkdir(parents=True, exist_ok=True)
    clustered = a.copy()
    for col in ("stemness", "csc_like", "malignant"):
        del clustered.obs[col]
    clustered.write_h5ad(d / "clustered.h5ad")
    a.obs[["stemness", "csc_like"]].to_csv(d / "stemness.tsv.gz", sep="\t", index_label="cell")
    a.obs[["malignant"]].to_csv(d / "malignant.tsv.gz", sep="\t", index_label="cell")
    (d / "stemness_info.json").write_text(json.dumps({k: v for k, v in stem_info.items() if k != "gene_set_coverage"}))
    pd.DataFrame(stem_info["gene_set_coverage"]).to_csv(d / "stemness_gene_sets.tsv", sep="\t", index=False)
    b = a.copy()
    reason = pt.skip_reason(b, root="auto")
    assert reason, "pseudotime should be skipped without stemness and without a root"
    pt.skip_pseudotime(b, reason)
    b.obs[["pseudotime", "pseudotime_reachable"]].to_csv(d / "pseudotime.tsv.gz", sep="\t", index_label="cell")
    pt.annotations(b).write_h5ad(d / "annotations.h5ad")
    (d / "pseudotime_info.json").write_text(json.dumps(pt.pseudotime_info(b)))
    return {"h5ad": str(d / "clustered.h5ad"), "qc_h5ad": str(d / "clustered.h5ad"),
            "stemness": str(d / "stemness.tsv.gz"), "malignant": str(d / "malignant.tsv.gz"),
            "stemness_info": str(d / "stemness_info.json"), "stemness_gene_sets": str(d / "stemness_gene_sets.tsv"),
            "pseudotime": str(d / "pseudotime.tsv.gz"), "annotations": str(d / "annotations.h5ad"),
            "aliases": resolve_path("metastem:aliases_human.tsv", "human")}


@pytest.fixture(scope="module")
def pathway_rule(panel, defaults, repo, tmp_path_factory):
    """workflow/scripts/pathways.py on the panel, as Snakemake runs it; returns the result folder."""
    a, stem_info = panel
    d = tmp_path_factory.mktemp("panel") / "panel"
    inputs = write_stage_inputs(d / "inputs", a, stem_info)
    params = {**defaults, "pathways": dict(defaults["pathways"], n_null=100, n_boot=50, gsea_permutations=20)}
    smk = SimpleNamespace(input=SimpleNamespace(**inputs),
                          output=SimpleNamespace(**{k: str(d / v) for k, v in PATHWAY_OUTPUTS.items()}),
                          params=SimpleNamespace(row={"species": "human", "values": "log", "labels": ""},
                                                 params=params),
                          log=[str(d / "pathways.log")], threads=1, rule="pathways",
                          wildcards=SimpleNamespace(dataset="panel"), scriptdir=str(repo / "workflow/scripts"))
    runpy.run_path(str(repo / "workflow/scripts/pathways.py"), init_globals={"snakemake": smk})
    return d


def test_pathway_rule_completes_without_a_contrast(panel, pathway_rule):
    """The final rule on stemness NaN / no CSC-like cells: final.h5ad as the contract says, tables with their
    headers, figures that need the contrast or a pseudotime are empty files with a sentence each."""
    a, _ = panel
    d = pathway_rule
    info = json.loads((d / "pathways/info.json").read_text())
    assert info["skipped"].startswith("The CSC-like pathway contrast was not computed: stemness was not computed "
                                      "(stemness.required is false)")
    assert info["skipped_what"] == "the CSC-like pathway contrast"
    assert info["n_csc_like"] == 0 and info["n_called"] == 0 and info["n_stemness_genes_excluded"] == 0
    assert info["n_scored"] > 0 and "No CSC-like contrast" in info["methods"]
    assert set(info["figure_notes"]) == {"pathways_effects", "pathways_pseudotime", "pathways_gsea"}
    for stem in info["figure_notes"]:
        assert (d / "figures" / f"{stem}.png").stat().st_size == 0
    assert (d / "figures/pathways_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tables = {k: pd.read_csv(d / v, sep="\t") for k, v in PATHWAY_OUTPUTS.items() if v.endswith(".tsv")}
    assert list(tables["summary"].columns) == pw.SUMMARY_COLUMNS and len(tables["summary"]) == len(tables["coverage"])
    assert tables["per_sample"].empty and {"set", "sample", "effect"} <= set(tables["per_sample"].columns)
    assert tables["gsea"].empty and "gsea_nes" in tables["gsea"].columns
    assert len(tables["cluster_means"]) == a.obs["leiden"].nunique()
    assert (tables["coverage"]["n_excluded_stemness"] == 0).all()

    final = ad.read_h5ad(d / "final.h5ad")
    assert final.n_obs == a.n_obs and final.obs["stemness"].isna().all()
    assert final.obs["csc_like"].dtype == bool and not final.obs["csc_like"].any()
    assert final.obs["pseudotime"].isna().all() and "X_diffmap" not in final.obsm
    assert {"malignant", "leiden"} <= set(final.obs.columns)
    scored = [c for c in final.obs if c.startswith("pathway_")]
    assert len(scored) == info["n_scored"] and np.isfinite(final.obs[scored].to_numpy(float)).all()
    assert all(isinstance(v, np.ndarray) for v in final.obsm.values())


# ----------------------------------------------------------------------------- fast: the report

def _stage_files(d: Path, pathway_dir: Path, stem_info: dict, niche_info: dict) -> dict[str, list[str]]:
    """The report rule's inputs: the pathway rule's real outputs, the stemness and pseudotime info.json as
    those stages write them on the panel, and a niche info.json."""
    from metastem.smk import write_json_atomic

    write_json_atomic({k: v for k, v in stem_info.items() if k != "gene_set_coverage"}, d / "stemness/info.json")
    (d / "pseudotime").mkdir(parents=True, exist_ok=True)
    (d / "pseudotime/info.json").write_text((pathway_dir / "inputs/pseudotime_info.json").read_text())
    write_json_atomic(niche_info, d / "niche/info.json")
    return {"stemness": [str(d / "stemness/info.json")], "pseudotime": [str(d / "pseudotime/info.json")],
            "pathways": [str(pathway_dir / v) for v in PATHWAY_OUTPUTS.values() if not v.endswith(".h5ad")],
            "niche": [str(d / "niche/info.json")]}


def test_report_box_lists_what_the_stages_say_they_skipped(panel, pathway_rule, defaults, tmp_path):
    """One box near the top: the stemness stage's reason, then each skipped stage named, from their info.json:
    a stage whose info.json skips nothing is not named (nothing is hard-coded)."""
    from test_report import parse

    from metastem.smk import report

    _, stem_info = panel
    niche_skip = "The niche interactions were not computed: no cell is CSC-like."
    files = _stage_files(tmp_path / "a", pathway_rule, stem_info, {"skipped": niche_skip, "notes": [niche_skip]})
    out = tmp_path / "report.html"
    report.write_report(out, "panel", files, row={"format": "h5ad", "species": "human", "labels": ""},
                        params=defaults)
    text = parse(out).plain
    reason = " ".join(stem_info["direction_reason"].split())
    sentence = (f"Stemness was not computed: {reason}. Skipped: CSC-like calls, pseudotime, the CSC-like pathway "
                "contrast, the niche interactions.")
    assert sentence in text
    assert text.index(sentence) < text.index("What was analysed")   # near the top, before the first section
    assert niche_skip in text and "Pseudotime was not computed" in text
    assert "CSC-like cells not computed" in text and "CSC-like cells 0.0%" not in text
    assert "Pseudotime not computed" in text and "Interactions not scored" in text  # the stages' facts

    # the niche ran (its info.json skips nothing): it is not named
    files = _stage_files(tmp_path / "b", pathway_rule, stem_info, {"notes": ["147 interactions scored"]})
    report.write_report(out, "panel", files, row={"format": "h5ad", "species": "human", "labels": ""},
                        params=defaults)
    text = parse(out).plain
    assert (f"Stemness was not computed: {reason}. Skipped: CSC-like calls, pseudotime, the CSC-like pathway "
            "contrast.") in text
    assert "the niche interactions" not in text

    # stemness computed, nothing skipped: no box at all
    files = _stage_files(tmp_path / "c", pathway_rule, {**stem_info, "status": "computed"}, {"notes": []})
    (tmp_path / "c/pseudotime/info.json").write_text(json.dumps({"method": "dpt", "notes": []}))
    files["pathways"] = []
    assert report.skipped_summary({k: report.load_stage(k, files.get(k, []), None) for k in report.STAGES}) is None


def test_index_says_not_computed_never_zero_percent(panel, pathway_rule, tmp_path):
    from test_report import parse

    from metastem.smk import report, write_json_atomic

    _, stem_info = panel
    d = tmp_path / "results/panel"
    _stage_files(d, pathway_rule, stem_info, {"skipped": "The niche interactions were not computed."})
    for v in PATHWAY_OUTPUTS.values():
        if v.endswith((".tsv", ".json")):
            (d / v).parent.mkdir(parents=True, exist_ok=True)
            (d / v).write_bytes((pathway_rule / v).read_bytes())
    write_json_atomic({"cells_out": 1500, "per_sample": {"P1": {"cells_in": 1600, "cells_out": 1000},
                                                         "P2": {"cells_in": 600, "cells_out": 500}}},
                      d / "qc/info.json")
    pd.DataFrame(columns=["sample", "n_cells", "n_malignant", "n_csc_like", "frac_csc_like", "distinct"]).to_csv(
        d / "tables/csc_by_sample.tsv", sep="\t", index=False)
    pd.DataFrame({"sample": ["P1", "P2", "all"], "n_cells": [1000, 500, 1500], "n_malignant": [800, 100, 900]}).to_csv(
        d / "tables/malignant_summary.tsv", sep="\t", index=False)
    (d / "report.html").write_text("<html></html>")
    report.write_index(tmp_path / "results/index.html", [d / "report.html"])
    text = parse(tmp_path / "results/index.html").plain
    for sample, malignant in (("P1", "80.0%"), ("P2", "20.0%")):
        assert f"panel {sample} " in text
        row = text[text.index(f"panel {sample} "):]
        row = row[:row.index("skipped:") + 120]
        assert f"{malignant} not computed not computed" in row
        assert "not tested (no CSC-like cells)" in row
        assert "skipped: pseudotime, the CSC-like pathway contrast, the niche interactions" in row
    assert not re.search(r"(?<![\d.])0\.0%", text)  # 80.0% is fine, 0.0% is not


# ----------------------------------------------------------------------------- slow: the whole workflow

@pytest.fixture(scope="module")
def panel_runs():
    """The workflow on a simulated 400-gene panel: 'panel' (stemness.required false), 'rooted' (the same, with
    pseudotime.root set), and in a second work dir 'refused' (stemness.required true, the default)."""
    from test_pipeline_demo import make_workdir, new_tmpdir, run_snakemake

    from metastem.simulate import simulate_tumour

    base = new_tmpdir("metastem-panel-")
    sim = simulate_tumour(900, 2000, seed=0, n_samples=2)
    p = sim[:, panel_genes(sim.var_names)].copy()
    row = {"path": "panel.h5ad", "format": "h5ad", "species": "human", "values": "counts"}
    ok = make_workdir(base / "ok", [{**row, "dataset": "panel", "params": "stemness.required=false"},
                                    {**row, "dataset": "rooted",
                                     "params": "stemness.required=false;pseudotime.root=cluster:0"}],
                      config={"outdir": "results", "seed": 0})
    p.write_h5ad(ok / "panel.h5ad")
    bad = make_workdir(base / "bad", [{**row, "dataset": "refused"}], config={"outdir": "results", "seed": 0})
    p.write_h5ad(bad / "panel.h5ad")
    return ok, run_snakemake(ok, timeout=1500), bad, run_snakemake(bad, timeout=900)


@pytest.mark.slow
def test_panel_without_stemness_completes_and_says_what_was_skipped(panel_runs):
    from test_pipeline_demo import TRACEBACK
    from test_report import parse

    ok, res, _, _ = panel_runs
    assert res.returncode == 0, res.stderr[-4000:]
    assert TRACEBACK not in res.stderr
    results = ok / "results"
    for ds in ("panel", "rooted"):
        final = ad.read_h5ad(results / ds / "final.h5ad")
        assert final.obs["stemness"].isna().all()
        assert final.obs["csc_like"].dtype == bool and not final.obs["csc_like"].any()
        for col in ("sample", "malignant", "cnv_score", "leiden", "pseudotime"):
            assert col in final.obs, col
        scored = [c for c in final.obs if c.startswith("pathway_")]
        assert scored and np.isfinite(final.obs[scored].to_numpy(float)).all()
        assert "counts" in final.layers
    assert final.obs["pseudotime"].notna().any()  # 'rooted': pseudotime from the configured root
    assert ad.read_h5ad(results / "panel/final.h5ad").obs["pseudotime"].isna().all()

    reason = " ".join(json.loads((results / "panel/stemness/info.json").read_text())["direction_reason"].split())
    panel = parse(results / "panel/report.html").plain
    assert (f"Stemness was not computed: {reason}. Skipped: CSC-like calls, pseudotime, the CSC-like pathway "
            "contrast, the niche interactions.") in panel
    rooted = parse(results / "rooted/report.html").plain
    assert (f"Stemness was not computed: {reason}. Skipped: CSC-like calls, the CSC-like pathway contrast, the "
            "niche interactions.") in rooted
    assert "pseudotime, from the root set in the config (pseudotime.root: cluster:0)" in rooted

    index = parse(results / "index.html").plain
    for ds in ("panel", "rooted"):
        for sample in ("P1", "P2"):
            row = index[index.index(f"{ds} {sample} "):]
            assert " not computed not computed " in row[:200]
    # no stemness-dependent column says 0 %; a malignant fraction of 0 % is a real CNV outcome on a 400-gene panel
    # (no score above the reference range), and then the malignant stage says why in the report
    zero = [m.start() for m in re.finditer(r"(?<![\d.])0\.0%", index)]
    for at in zero:
        assert re.match(r"0\.0% not computed not computed ", index[at:]), index[at - 100:at + 100]
    if zero:
        assert "no cell is called malignant: no CNV score is above the reference cells' range" in panel


@pytest.mark.slow
def test_panel_without_stemness_is_refused_in_one_line_when_required(panel_runs):
    from test_pipeline_demo import TRACEBACK

    _, _, bad, res = panel_runs
    assert res.returncode != 0 and TRACEBACK not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "dataset 'refused'" in ln and "Fix:" in ln]
    assert len(lines) == 1, res.stderr[-3000:]
    assert "no stemness or differentiation gene set" in lines[0] and "stemness.required: false" in lines[0]
    assert "stemness.gene_sets" in lines[0]
    assert not (bad / "results/refused/stemness/info.json").exists()
    assert not (bad / "results/refused/final.h5ad").exists()
