"""The library as a notebook user meets it: ``import metastem as ms``, ~10 lines on the demo tumour.

Also: one place for each default (the workflow's config schema equals the functions' signatures), and the
import graph (the analysis library never imports the Snakemake glue).
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import yaml

import metastem as ms

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "metastem"


def test_notebook_runs_the_whole_analysis_in_ten_lines(tmp_path, monkeypatch):
    import matplotlib

    monkeypatch.chdir(tmp_path)  # nothing may be written unless asked
    # --- the notebook ----------------------------------------------------------------------------
    adata = ms.datasets.demo(1500, 3000, seed=0)
    ms.pp.qc(adata)
    ms.pp.normalize(adata)
    ms.tl.cluster(adata)
    ms.tl.infer_malignant(adata)
    ms.tl.score_stemness(adata)
    ms.tl.call_csc_like(adata)
    ms.tl.pseudotime(adata)
    res = ms.tl.score_pathways(adata)
    ms.tl.niche_interactions(adata)
    fig = ms.pl.pathway_effects(res.details, res.per_sample, return_fig=True)
    # ----------------------------------------------------------------------------------------------
    assert list(tmp_path.iterdir()) == [], "a library call wrote files without being asked"
    assert isinstance(fig, matplotlib.figure.Figure)
    obs = adata.obs
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(obs["true_malignant"].astype(bool), obs["cnv_score"]) >= 0.95
    assert not (obs["csc_like"].astype(bool) & ~obs["malignant"].astype(bool)).any(), "a normal cell is CSC-like"
    assert obs["csc_like"].astype(bool).sum() > 0
    assert set(obs.loc[obs["csc_like"].astype(bool), "sample"]) == set(obs.loc[obs["malignant"].astype(bool), "sample"])
    reach = np.isfinite(obs["pseudotime"].to_numpy(float))
    assert reach.mean() > 0.5
    assert {"set", "effect"} <= set(res.details.columns) and len(res.details) >= 10
    table = ms.tl.interactions_table(adata)
    pairs = set(zip(table["ligand"], table["receptor"]))
    assert ("CXCL12", "CXCR4") in pairs
    for key in ("pseudotime", "pathways", "niche"):
        assert key in adata.uns, f"uns['{key}'] not recorded"


# --------------------------------------------------------------------------------------- defaults

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())["properties"]

# config section -> the functions whose keyword defaults it configures
FUNCTIONS = {
    "qc": [ms.pp.qc],
    "cluster": [ms.pp.normalize, ms.tl.cluster, ms.tl.markers, ms.tl.sample_mixing],
    "malignant": [ms.tl.infer_malignant],
    "stemness": [ms.tl.score_stemness, ms.tl.call_csc_like],
    "pseudotime": [ms.tl.pseudotime, ms.tl.choose_root, ms.tl.paga],
    "pathways": [ms.tl.score_pathways],
    "niche": [ms.tl.niche_interactions],
    "simulate": [ms.datasets.simulate_tumour],
}
# schema key -> the parameter name in the function, where the two differ
RENAMED = {("cluster", "mixing_max_cells"): "max_cells", ("stemness", "csc_quantile"): "quantile",
           ("stemness", "csc_groupby"): "groupby", ("stemness", "csc_rule"): "rule",
           ("stemness", "diffusion_alpha"): "diffusion_alpha"}
# keys the workflow stage uses itself (no library function takes them), with the reason
STAGE_ONLY = {
    ("pathways", "ranking_max_cells"): "GSEA prerank ranking (stage)",
    ("pathways", "gsea_min_genes"): "GSEA (stage)",
    ("pathways", "gsea_permutations"): "GSEA (stage)",
    ("pathways", "aliases"): "resolved by the workflow to a file input",
    ("niche", "use_labels"): "chooses groupby from the sheet's labels column (stage)",
    ("niche", "n_top"): "figure (stage)",
    ("malignant", "malignant_values"): "sheet labels (stage passes labels_key)",
}


def _norm(v):
    if isinstance(v, (tuple, list)):
        return [_norm(x) for x in v]
    return v


def _defaults(fns) -> dict:
    out = {}
    for fn in fns:
        for name, p in inspect.signature(fn).parameters.items():
            if p.default is not inspect.Parameter.empty:
                out.setdefault(name, p.default)
    return out


@pytest.mark.parametrize("section", sorted(FUNCTIONS))
def test_schema_defaults_equal_the_signatures(section):
    defaults = _defaults(FUNCTIONS[section])
    problems = []
    for key, spec in SCHEMA[section]["properties"].items():
        name = RENAMED.get((section, key), key)
        if name not in defaults:
            if (section, key) not in STAGE_ONLY:
                problems.append(f"{section}.{key}: no function of {[f.__name__ for f in FUNCTIONS[section]]} "
                                f"takes '{name}'")
            continue
        if "default" in spec and _norm(defaults[name]) != _norm(spec["default"]):
            problems.append(f"{section}.{key}: schema {spec['default']!r} != signature {defaults[name]!r}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------- import graph

GLUE = {"smk"}  # metastem.smk: job wrapper, config/sheet validation, resources, report assembly


def _metastem_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("metastem"):
            parts = node.module.split(".")
            if len(parts) > 1:
                names.add(parts[1])
            else:
                names.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("metastem."):
                    names.add(a.name.split(".")[1])
    return names


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_the_library_never_imports_the_workflow_glue():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        if module in GLUE:
            continue
        bad = _metastem_imports(path) & GLUE
        if bad:
            problems.append(f"{path.relative_to(REPO)} imports {sorted(bad)}")
    assert not problems, "the analysis library must not depend on the Snakemake glue:\n" + "\n".join(problems)


def test_workflow_scripts_import_metastem_without_path_edits():
    for path in sorted((REPO / "workflow").rglob("*.py")) + sorted((REPO / "workflow").rglob("*.smk")):
        assert "sys.path" not in path.read_text(), f"{path.relative_to(REPO)} edits sys.path"
