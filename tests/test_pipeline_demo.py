"""End-to-end: the real Snakemake CLI on a small simulated demo in a temp dir, checked against the
output contract of docs/CONTRACTS.md for every stage that `rule all` reaches.

Also the helpers the other CLI tests (bad inputs, resume, determinism) share: a work dir with a
sheet and config, one snakemake call, and the demo run itself (computed once per session).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
# The workflow under test (override to try a patched copy of the workflow without touching the repo).
SNAKEFILE = os.environ.get("METASTEM_SNAKEFILE", str(REPO / "Snakefile"))
HEADER = ["dataset", "path", "format", "orientation", "species", "values", "labels", "params"]
DEMO_CONFIG = {"outdir": "results", "seed": 0, "simulate": {"n_cells": 800, "n_genes": 2000}}
DEMO_ROW = {"dataset": "demo", "format": "simulated", "species": "human", "values": "counts", "labels": "true_state"}
TRACEBACK = "Traceback (most recent call last)"


def make_workdir(path: Path, rows: list[dict], config: dict | None = None) -> Path:
    """A work dir with config/datasets.tsv and config/config.yaml (the Snakefile's default configfile
    must exist in the work dir; see the report to the lead)."""
    (path / "config").mkdir(parents=True, exist_ok=True)
    sheet = pd.DataFrame([{k: r.get(k, "") for k in HEADER} for r in rows], columns=HEADER)
    sheet.to_csv(path / "config" / "datasets.tsv", sep="\t", index=False)
    cfg = {"datasets": "config/datasets.tsv", **(config if config is not None else DEMO_CONFIG)}
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
    e.setdefault("MPLCONFIGDIR", str(REPO / ".cache" / "matplotlib"))
    return e


def snakemake_cmd(workdir: Path, *args: str, cores: int = 2) -> list[str]:
    return [SNAKEMAKE, "-s", SNAKEFILE, "-d", str(workdir), "--configfile",
            str(workdir / "config" / "config.yaml"), "--cores", str(cores), *args]


def run_snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_cmd(workdir, *args), capture_output=True, text=True, timeout=timeout,
                          env=env(), cwd=workdir)


def dag_rules(workdir: Path) -> set[str]:
    """Rules that the default target (rule all) needs, from the rule graph."""
    out = run_snakemake(workdir, "--rulegraph", "--forceall", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(re.findall(r'label = "([A-Za-z0-9_]+)"', out.stdout))


_DEMO: dict = {}


def new_tmpdir(prefix: str) -> Path:
    """A temp dir removed when the test session ends (shared work dirs outlive one test's tmp_path)."""
    import atexit

    d = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def demo_run() -> Path:
    """The uninterrupted demo run, shared by this module, test_resume and test_determinism."""
    if "dir" not in _DEMO:
        wd = make_workdir(new_tmpdir("metastem-demo-"), [DEMO_ROW])
        out = run_snakemake(wd)
        _DEMO.update(dir=wd, result=out)
    out = _DEMO["result"]
    assert out.returncode == 0, f"demo run failed:\n{out.stderr[-5000:]}"
    return _DEMO["dir"]


def comparable_files(workdir: Path) -> dict[str, Path]:
    """Every table, per-cell table and info/json of the results (logs and benchmarks hold times)."""
    res = workdir / "results"
    files = {}
    for p in sorted(res.rglob("*")):
        rel = p.relative_to(res).as_posix()
        if p.is_file() and not rel.startswith(("logs/", "benchmarks/")) and not p.name.startswith(".") and \
                p.name.endswith((".tsv", ".tsv.gz", ".json")):
            files[rel] = p
    return files


def obs_table(path: Path) -> pd.DataFrame:
    import anndata as ad

    return ad.read_h5ad(path, backed="r").obs.copy()


# ------------------------------------------------------------------------------------ the contract
def check_qc(ds: Path) -> None:
    import anndata as ad

    for f in ("qc/qc.h5ad", "qc/cells.tsv.gz", "qc/info.json", "tables/qc_summary.tsv", "figures/qc_metrics.png"):
        assert (ds / f).is_file(), f"missing {f}"
    assert (ds / "figures/qc_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(ds / "qc/cells.tsv.gz", "rb") as fh:
        assert fh.read(2) == b"\x1f\x8b", "cells.tsv.gz is not gzipped"
    cells = pd.read_csv(ds / "qc/cells.tsv.gz", sep="\t", index_col=0)
    a = ad.read_h5ad(ds / "qc/qc.h5ad")
    assert {"n_genes_by_counts", "total_counts", "pct_counts_mt", "kept"} <= set(cells.columns)
    assert set(a.obs_names) == set(cells.index[cells["kept"]])
    assert np.all(a.X.data == np.round(a.X.data)), "qc.h5ad must hold the values as given (counts)"
    info = json.loads((ds / "qc/info.json").read_text())
    assert info["cells_out"] == a.n_obs and info["cells_in"] == len(cells)
    summary = pd.read_csv(ds / "tables/qc_summary.tsv", sep="\t")
    assert {"metric", "value"} <= set(summary.columns)


def check_cluster(ds: Path, dataset: str, labels: str | None) -> None:
    import anndata as ad
    import scipy.sparse as sp

    for f in ("cluster/clustered.h5ad", "cluster/info.json", "tables/markers.tsv", "tables/cluster_sizes.tsv",
              "figures/umap_clusters.png"):
        assert (ds / f).is_file(), f"missing {f}"
    a = ad.read_h5ad(ds / "cluster/clustered.h5ad")
    assert sp.issparse(a.X) and a.X.format == "csr" and a.X.dtype == np.float32
    assert "counts" not in a.layers  # raw counts stay in qc.h5ad; final.h5ad gets them back (line ~186)
    for col in ("leiden", "n_genes_by_counts", "total_counts", "pct_counts_mt", "knn_component"):
        assert col in a.obs, f"obs lacks {col}"
    assert isinstance(a.obs["leiden"].dtype, pd.CategoricalDtype) and a.obs["leiden"].nunique() >= 2
    if labels:
        assert labels in a.obs
    assert any(c.startswith("true_") for c in a.obs), "simulator truth columns are dropped"
    assert {"X_pca", "X_umap"} <= set(a.obsm) and {"connectivities", "distances"} <= set(a.obsp)
    assert "neighbors" in a.uns
    meta = a.uns["metastem"]
    # params travel as JSON text (h5ad cannot store the None values of the params): CONTRACTS.md must say
    # 'params_json', see the report to the lead
    for key in ("dataset", "species", "values", "labels", "params_json"):
        assert key in meta, f"uns['metastem'] lacks '{key}'"
    assert meta["dataset"] == dataset
    params = json.loads(meta["params_json"])
    assert {"qc", "cluster", "seed"} <= set(params)
    sizes = pd.read_csv(ds / "tables/cluster_sizes.tsv", sep="\t")
    assert sizes["n_cells"].sum() == a.n_obs
    markers = pd.read_csv(ds / "tables/markers.tsv", sep="\t")
    assert {"cluster", "gene"} <= set(markers.columns) and len(markers) > 0


def check_cells_table(ds: Path, stage: str, columns: set[str]) -> pd.DataFrame:
    t = pd.read_csv(ds / f"{stage}/cells.tsv.gz", sep="\t", index_col=0)
    assert columns <= set(t.columns), f"{stage}/cells.tsv.gz lacks {columns - set(t.columns)}"
    assert (ds / f"{stage}/info.json").is_file()
    return t


def check_final(ds: Path) -> None:
    import anndata as ad

    a = ad.read_h5ad(ds / "final.h5ad")
    obs = a.obs
    for col in ("leiden", "stemness", "csc_like", "pseudotime"):
        assert col in obs, f"final.h5ad obs lacks {col}"
    st = obs["stemness"].to_numpy(float)
    assert np.isfinite(st).all() and st.min() >= 0 and st.max() <= 1
    assert obs["csc_like"].dtype == bool and 0 < obs["csc_like"].sum() < a.n_obs
    pt = obs["pseudotime"].to_numpy(float)
    fin = pt[np.isfinite(pt)]
    assert fin.size and fin.min() >= 0 and fin.max() <= 1
    assert any(c.startswith("pathway_") for c in obs), "no pathway_<SET> column"
    assert "counts" in a.layers


def check_contract(workdir: Path, rules: set[str], dataset: str = "demo", labels: str | None = "true_state") -> None:
    ds = workdir / "results" / dataset
    assert {"qc", "cluster"} <= rules, rules
    check_qc(ds)
    check_cluster(ds, dataset, labels)
    if "stemness" in rules:
        check_cells_table(ds, "stemness", {"stemness", "csc_like"})
    if "pseudotime" in rules:
        check_cells_table(ds, "pseudotime", {"pseudotime"})
        assert (ds / "pseudotime/paga.json").is_file()
    if "pathways" in rules:
        check_final(ds)
    if "report" in rules:
        assert (ds / "report.html").is_file() and (workdir / "results" / "index.html").is_file()
    # nothing half-written left behind
    assert not [p for p in (workdir / "results").rglob(".*tmp")], "temporary files left in results"


@pytest.mark.slow
def test_demo_run_meets_the_contract():
    wd = demo_run()
    out = _DEMO["result"]
    assert TRACEBACK not in out.stderr
    rules = dag_rules(wd)
    check_contract(wd, rules)


@pytest.mark.slow
def test_rerun_is_a_no_op():
    wd = demo_run()
    out = run_snakemake(wd, "-n")
    assert out.returncode == 0 and "Nothing to be done" in (out.stdout + out.stderr), out.stdout[-2000:]


def planned_jobs(output: str) -> set[str]:
    """Rule names in the 'Job stats' table of a dry run."""
    jobs = set()
    for line in output.split("Job stats:", 1)[1].splitlines()[3:]:   # after 'job count' and the dashes
        name, *count = line.split() or ["total"]
        if name == "total":
            break
        jobs.add(name)
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("section, change, reruns", [
    ("pathways", {"fdr": 0.01}, {"pathways", "niche", "report", "index", "all"}),
    ("stemness", {"csc_quantile": 0.8}, {"stemness", "pseudotime", "pathways", "niche", "report", "index", "all"}),
])
def test_a_parameter_change_reruns_only_the_rules_that_use_it(tmp_path, section, change, reruns):
    wd = demo_run()
    cfg = {"datasets": "config/datasets.tsv", **DEMO_CONFIG, section: change}
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [SNAKEMAKE, "-s", SNAKEFILE, "-d", str(wd), "--configfile", str(tmp_path / "changed.yaml"), "-n",
           "--cores", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=wd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert planned_jobs(out.stdout + out.stderr) == reruns


@pytest.mark.slow
def test_default_config_from_a_fresh_clone_parses(tmp_path):
    """`snakemake -n` in a copy of the repo's config: the shipped sheet and config validate."""
    shutil.copytree(REPO / "config", tmp_path / "config", symlinks=True)
    out = run_snakemake(tmp_path, "-n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert TRACEBACK not in out.stderr


def gunzip_text(p: Path) -> str:
    return gzip.decompress(p.read_bytes()).decode()
