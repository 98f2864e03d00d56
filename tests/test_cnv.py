"""Malignant vs normal calls: CNV inference on the simulated tumour and on real oligodendroglioma data
(normal cells hidden from the pipeline), known labels, declared references, and honest 'none' cases."""
from __future__ import annotations

import json
from importlib import resources

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from metastem import cluster, cnv
from metastem.errors import MetastemError


def _clustered(adata: ad.AnnData, values: str, defaults: dict) -> ad.AnnData:
    """The clustering stage as the malignant rule receives it (Harmony over obs 'sample' when present)."""
    cluster.normalize(adata, values=values, target_sum=defaults["cluster"]["target_sum"])
    cluster.embed_and_cluster(adata, defaults["cluster"], seed=0)
    return adata


@pytest.fixture(scope="module")
def tumour(defaults):
    from metastem.simulate import simulate_tumour

    adata = simulate_tumour(1500, 3000, seed=0, frac_doublets=0.0, frac_low_quality=0.0)
    return _clustered(adata, "counts", defaults)


@pytest.fixture(scope="module")
def oligo(oligodendroglioma, defaults):
    adata = oligodendroglioma.copy()  # obs 'sample': the patient is the barcode's prefix
    return _clustered(adata, "normalized", defaults)


def test_simulated_tumour_calls_without_truth(tumour):
    adata = tumour.copy()
    cnv.infer_malignant(adata)  # automatic reference: no truth column is read
    obs = adata.obs
    truth = obs["true_malignant"].to_numpy()
    auroc = roc_auc_score(truth, obs["cnv_score"])
    assert auroc >= 0.95, auroc  # measured 1.000 (per patient 1.000 each)
    info = adata.uns["malignant"]
    assert info["evidence"] == "cnv" and (obs["malignant_evidence"] == "cnv").all()
    # the marker rules found the normal compartments (T and myeloid cells may share one PTPRC-high 'immune'
    # cluster), nearly every normal cell is in the reference and no malignant cell is
    ref = json.loads(info["reference_cells_json"])
    assert {"fibroblast", "endothelial"} <= set(ref) and set(ref) & {"immune", "T_cell", "myeloid"}, ref
    in_ref = (obs["cnv_reference"].astype(str) != "").to_numpy()
    assert not in_ref[truth].any() and in_ref[~truth].mean() >= 0.95, in_ref[~truth].mean()  # measured 1.0
    calls = obs["malignant"].to_numpy()
    assert (calls == truth).mean() >= 0.97, pd.crosstab(calls, truth)  # measured 0.988 (18 malignant missed)
    assert not calls[~truth].any()  # no normal cell called malignant (measured 0)
    assert info["ashman_d"] > 2  # measured 4.98
    for s, grp in obs.groupby("sample", observed=True):  # every patient's tumour is found
        assert roc_auc_score(grp["true_malignant"], grp["cnv_score"]) >= 0.95, s
    table = cnv.malignant_summary(adata)
    assert list(table["sample"]) == ["P1", "P2", "P3", "all"]
    assert table.set_index("sample").loc["all", "n_malignant"] == calls.sum()


def test_oligodendroglioma_normals_hidden(oligo):
    adata = oligo.copy()
    cnv.infer_malignant(adata)  # the annotation is not given: reference from the marker rules
    truth = adata.obs["label"].str.startswith("malignant").to_numpy()
    auroc = roc_auc_score(truth, adata.obs["cnv_score"])
    assert auroc >= 0.98, auroc  # measured 1.000 (the floor: 0.9)
    ref = json.loads(adata.uns["malignant"]["reference_cells_json"])
    assert set(ref) <= {"immune", "myeloid"}  # microglia/macrophages are the only immune cells
    assert (adata.obs.loc[adata.obs["cnv_reference"].astype(str) != "", "label"] == "Microglia/Macrophage").all()
    # normal oligodendrocytes are outside the reference and still called normal (Otsu cut; scores 0.028 vs
    # 0.05-0.08 in the tumours): measured 0 errors out of 184
    calls = adata.obs["malignant"].to_numpy()
    assert (calls == truth).mean() >= 0.95, pd.crosstab(calls, adata.obs["label"])
    per_tumour = adata.obs[truth].groupby("label")["malignant"].mean()
    assert len(per_tumour) == 4 and (per_tumour >= 0.9).all(), per_tumour


def test_declared_reference_and_known_labels(oligo):
    normal = ["Microglia/Macrophage", "Oligodendrocytes (non-malignant)"]
    adata = oligo.copy()
    cnv.infer_malignant(adata, reference_key="label", reference_values=normal)
    truth = adata.obs["label"].str.startswith("malignant").to_numpy()
    assert roc_auc_score(truth, adata.obs["cnv_score"]) >= 0.98  # measured 1.000
    assert not adata.obs.loc[~truth, "malignant"].any()  # declared normal cells are never malignant
    labelled = oligo.copy()
    cnv.infer_malignant(labelled, labels_key="label", normal_values=normal)
    assert (labelled.obs["malignant"].to_numpy() == truth).all()
    assert (labelled.obs["malignant_evidence"] == "labels").all()
    assert np.isfinite(labelled.obs["cnv_score"]).all()  # scored against the labelled normal cells
    with pytest.raises(MetastemError, match="not in obs"):
        cnv.infer_malignant(oligo.copy(), labels_key="label", malignant_values=["tumour"])
    with pytest.raises(MetastemError, match="reference column"):
        cnv.infer_malignant(oligo.copy(), reference_key="celltype", reference_values=["x"])


def test_only_malignant_cells_says_so(oligo):
    adata = oligo[oligo.obs["label"].str.startswith("malignant").to_numpy()].copy()
    cnv.infer_malignant(adata)
    info = adata.uns["malignant"]
    assert info["evidence"] == "none" and adata.obs["malignant"].all()
    assert (adata.obs["malignant_evidence"] == "none").all()
    assert any("no normal reference" in n for n in info["notes"]), info["notes"]
    assert np.isfinite(adata.obs["cnv_score"]).all()  # relative to the average cell, for the heatmap


def test_no_gene_positions_says_so(oligo):
    adata = oligo.copy()
    adata.var_names = [f"GENE{i}" for i in range(adata.n_vars)]
    cnv.infer_malignant(adata)
    notes = adata.uns["malignant"]["notes"]
    assert adata.uns["malignant"]["evidence"] == "none" and adata.obs["malignant"].all()
    assert adata.obs["cnv_score"].isna().all() and any("no copy-number inference" in n for n in notes), notes
    assert "X_cnv" not in adata.obsm


def test_few_positioned_genes_warn_or_skip(tumour):
    """Below the measured floor (cnv.RELIABLE_GENES_WITH_POSITION; benchmarks/cnv_gene_floor.py) calls still run
    with a note that they are uncertain; below min_genes_with_position nothing is called, and the note gives
    that reason (not a missing reference)."""
    a = tumour.copy()
    cnv.infer_malignant(a)  # 3,000 simulated genes, ~2,900 with an autosomal position
    notes = a.uns["malignant"]["notes"]
    assert a.uns["malignant"]["evidence"] == "cnv"
    assert any("copy-number calls are unreliable below" in n for n in notes), notes
    b = tumour[:, :400].copy()
    cnv.infer_malignant(b, min_genes_with_position=500)
    notes = b.uns["malignant"]["notes"]
    assert b.uns["malignant"]["evidence"] == "none" and b.obs["malignant"].all()
    assert any("no copy-number inference" in n for n in notes) and not any("no normal reference" in n for n in notes)


def test_position_table_agrees_with_infercnvpy_example():
    """infercnvpy ships the same tumour cells with its own gene positions (an older assembly, GRCh37):
    the same chromosome and the same order along it for nearly every shared gene."""
    path = resources.files("infercnvpy") / "datasets" / "data" / "oligodendroglioma.h5ad"
    ex = ad.read_h5ad(str(path))
    tab = cnv.gene_position_table("human").set_index("symbol")
    common = ex.var_names.intersection(tab.index)
    assert len(common) > 0.9 * ex.n_vars  # measured 8786 of 9450
    same = ex.var.loc[common, "chromosome"].astype(str).to_numpy() == tab.loc[common, "chromosome"].to_numpy()
    assert same.mean() >= 0.99, same.mean()  # measured 0.9992
    for chrom in ("chr1", "chr7", "chr19"):
        genes = common[(ex.var.loc[common, "chromosome"].astype(str) == chrom).to_numpy() & same]
        rho = spearmanr(ex.var.loc[genes, "start"], tab.loc[genes, "start"])[0]
        assert rho >= 0.99, (chrom, rho)


def test_otsu_and_call_rule():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.01, 0.003, 300), rng.normal(0.03, 0.004, 100), rng.normal(0.07, 0.01, 600)])
    reference = np.zeros(scores.size, dtype=bool)
    reference[:300] = True
    calls, tau, diag = cnv.call_from_scores(scores, reference)
    assert tau == max(diag["threshold_reference"], diag["threshold_otsu"])
    # the reference bound alone (median + 5 MAD of the first group) would call the middle group malignant
    assert diag["threshold_reference"] < 0.03 < diag["threshold_otsu"] < 0.07
    assert calls[400:].mean() > 0.99 and not calls[:400].any() and diag["ashman_d"] > 2


def test_figures(tumour, tmp_path):
    import matplotlib.pyplot as plt

    adata = tumour.copy()
    cnv.infer_malignant(adata)
    assert cnv.plot_cnv_heatmap(adata) is None and not list(tmp_path.iterdir())  # nothing saved unless asked
    fig = cnv.plot_cnv_heatmap(adata, return_fig=True)
    assert isinstance(fig, plt.Figure)
    plt.close(fig)
    for name, fn in (("heat.png", cnv.plot_cnv_heatmap), ("umap.png", cnv.plot_cnv_score_umap)):
        fn(adata, save=tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, ax = plt.subplots()
    assert cnv.plot_cnv_score_umap(adata, ax=ax, return_fig=True) is fig
    plt.close(fig)
    # the per-cell results and uns are h5ad-writable
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert back.obs["malignant"].dtype == bool and "params_json" in back.uns["malignant"]


@pytest.mark.parametrize("cats", [["Microglia/Macrophage", "Oligodendrocytes (non-malignant)"], ["Microglia/Macrophage"], []])
def test_matrix_implementation_equals_infercnvpy(oligo, cats):
    import infercnvpy

    a = oligo.copy()
    cnv.annotate_positions(a)
    b = a.copy()
    kw = dict(reference_key="label", reference_cat=cats) if cats else {}
    infercnvpy.tl.infercnv(a, n_jobs=1, chunksize=100, **kw)
    cnv.infercnv_matrix(b, chunksize=100, **kw)
    assert a.uns["cnv"]["chr_pos"] == b.uns["cnv"]["chr_pos"]
    A, B = a.obsm["X_cnv"].toarray(), b.obsm["X_cnv"].toarray()
    assert A.shape == B.shape
    # float32 rounding can move a value across the noise threshold (then it differs by about the threshold)
    close = np.isclose(A, B, atol=1e-5)
    assert close.mean() >= 0.9999, close.mean()
    assert np.corrcoef(A.ravel(), B.ravel())[0, 1] > 0.9999


@pytest.mark.parametrize("section, func", [("malignant", "metastem.cnv:infer_malignant"),
                                           ("simulate", "metastem.simulate:simulate_tumour")])
def test_schema_defaults_are_the_signature_defaults(defaults, section, func):
    import importlib
    import inspect

    mod, name = func.split(":")
    sig = inspect.signature(getattr(importlib.import_module(mod), name))
    for key, value in defaults[section].items():
        assert key in sig.parameters, (section, key)
        default = sig.parameters[key].default
        assert (list(default) if isinstance(default, tuple) else default) == value, (section, key, default, value)
