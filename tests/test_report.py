"""The per-dataset HTML report, the index page and Snakemake's own report, on a real small pipeline run.

The slow tests run the workflow as wired (Snakefile) on a 600-cell simulated tumour in a temporary
working directory and parse what it wrote. The fast tests build QC-stage files with the pipeline's
own functions and check what a reader sees when later stages are absent.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["input", "samples", "qc", "clusters", "malignant", "stemness", "pseudotime", "pathways", "niche", "methods"]
SMALL_CONFIG = {"datasets": "config/datasets.tsv", "outdir": "results", "seed": 0,
                "simulate": {"n_cells": 600, "n_genes": 2000}}


class Page(HTMLParser):
    """What the tests check in a page: section ids, images, links, scripts, tables and visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.refs: list[str] = []
        self.script_srcs: list[str] = []
        self.tables: list[dict] = []
        self.text: list[str] = []
        self._in_th = False
        self._th: list[str] = []
        self._block = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id") or "")
        if tag == "div" and "table-block" in (a.get("class") or ""):
            self._block = a.get("id") or ""
        if tag == "img":
            self.images.append(a.get("src") or "")
        for key in ("href", "src"):
            if a.get(key) is not None and tag != "img":
                self.refs.append(a[key])
        if tag == "script" and a.get("src"):
            self.script_srcs.append(a["src"])
        if tag == "table":
            self.tables.append({"id": self._block, "columns": []})
        if tag == "th":
            self._in_th, self._th = True, []

    def handle_endtag(self, tag: str) -> None:
        if tag == "th":
            self._in_th = False
            self.tables[-1]["columns"].append("".join(self._th).strip())

    def handle_data(self, data: str) -> None:
        if self._in_th:
            self._th.append(data)
        self.text.append(data)

    @property
    def plain(self) -> str:
        return " ".join(" ".join(self.text).split())


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def columns_of(page: Page, table_id: str) -> list[str]:
    return next(t["columns"] for t in page.tables if t["id"] == table_id)


def snakemake(workdir: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """The workflow as wired, run in `workdir`; report.smk is added when the Snakefile does not include it yet."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(workdir / "Snakefile"), "-d", str(workdir), "--cores", "2",
           *args]
    env = {**os.environ, "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(REPO / ".cache/numba")),
           "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR", str(REPO / ".cache/matplotlib"))}
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"snakemake {' '.join(args)} failed:\n{res.stderr[-4000:]}"
    return res


def run_demo_pipeline(base: Path) -> Path:
    """Run the small demo once per session (shared by test_browser.py); returns its working directory."""
    work = base / "demo_run"
    if (work / "results/index.html").is_file():
        return work
    import yaml

    (work / "config").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config/datasets.tsv", work / "config/datasets.tsv")
    (work / "config/config.yaml").write_text(yaml.safe_dump(SMALL_CONFIG))
    (work / "Snakefile").write_text(textwrap.dedent(f"""\
        include: "{REPO / 'Snakefile'}"
        if not workflow.is_rule("report"):
            include: "{REPO / 'workflow/rules/report.smk'}"
        """))
    snakemake(work, "results/index.html")
    return work


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    return run_demo_pipeline(tmp_path_factory.getbasetemp())


# ----------------------------------------------------------------------------- slow: the real pipeline

@pytest.mark.slow
def test_report_has_every_section_and_stays_small(demo_run):
    path = demo_run / "results/demo/report.html"
    page = parse(path)
    assert page.sections == SECTIONS
    assert path.stat().st_size < 5e6, "the demo report should open fast (a few MB at most)"
    log = (demo_run / "results/logs/demo/report.log").read_text()
    assert re.search(r"report\.html: \d+\.\d\d MB", log), "the report's size is logged"


@pytest.mark.slow
def test_every_image_is_an_embedded_png_that_decodes(demo_run):
    from PIL import Image

    page = parse(demo_run / "results/demo/report.html")
    assert page.images, "the demo report shows figures"
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:60]
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        img.load()
        assert img.width > 50 and img.height > 50


@pytest.mark.slow
def test_nothing_points_to_another_host_or_file(demo_run):
    html = (demo_run / "results/demo/report.html").read_text()
    page = parse(demo_run / "results/demo/report.html")
    assert not page.script_srcs, "scripts must be inline"
    for ref in page.refs:
        assert ref.startswith("#"), f"link or source outside the page: {ref}"
    assert "<link" not in html and "@import" not in html
    assert not re.search(r"url\((?!['\"]?data:)", html), "CSS must not load files"


@pytest.mark.slow
def test_tables_have_the_columns_of_their_files(demo_run):
    results = demo_run / "results/demo"
    page = parse(results / "report.html")
    for tsv in sorted((results / "tables").glob("*.tsv")):
        cols = list(pd.read_csv(tsv, sep="\t", nrows=1).columns)
        assert columns_of(page, f"table-{tsv.stem}") == cols, tsv.name
    assert columns_of(page, "table-qc_removed") == ["reason", "cells removed", "% of input", "removed when"]
    assert columns_of(page, "table-cluster_overview") == ["cluster", "n_cells", "fraction",
                                                          "top markers (log2 fold change)"]


@pytest.mark.slow
def test_input_and_methods_state_provenance(demo_run):
    page = parse(demo_run / "results/demo/report.html")
    text = page.plain
    qc = json.loads((demo_run / "results/demo/qc/info.json").read_text())
    assert qc["input"]["checksum"] in text
    assert f"{qc['cells_in']:,} × {qc['genes_in']:,}" in text and f"{qc['cells_out']:,} × {qc['genes_out']:,}" in text
    assert "simulate.n_cells" in text and "scanpy" in text
    assert columns_of(page, "table-parameters") == ["parameter", "value", "changed", "default", "meaning"]


@pytest.mark.slow
def test_stages_not_run_are_said_so(demo_run):
    """Stages the workflow does not run yet get a sentence, never an empty figure."""
    text = parse(demo_run / "results/demo/report.html").plain
    for stage, title in (("stemness", "stemness"), ("pseudotime", "pseudotime"), ("pathways", "pathways")):
        if not (demo_run / f"results/demo/{stage}/info.json").is_file():
            assert f"The {title} stage is not part of this run" in text


@pytest.mark.slow
def test_index_links_every_report(demo_run):
    index = demo_run / "results/index.html"
    page = parse(index)
    links = [r for r in page.refs if not r.startswith("#")]
    assert set(links) == {"demo/report.html"}  # one row per sample, each linking its dataset's report
    assert all((index.parent / link).is_file() for link in links)
    qc = json.loads((demo_run / "results/demo/qc/info.json").read_text())
    assert len(links) == len(qc["per_sample"])
    for sample, part in qc["per_sample"].items():
        assert f"demo {sample} {part['cells_out']}" in page.plain.replace(",", "")


@pytest.mark.slow
def test_snakemake_report_builds(demo_run, tmp_path):
    import zipfile

    snakemake(demo_run, "results/index.html", "--report", str(tmp_path / "report.zip"))
    names = zipfile.ZipFile(tmp_path / "report.zip").namelist()
    for name in ("report.html", "index.html", "qc_metrics.png", "umap_clusters.png", "markers.tsv"):
        assert any(n.endswith(f"/{name}") for n in names), f"{name} not in Snakemake's report"


# ----------------------------------------------------------------------------- fast: QC files only

@pytest.fixture(scope="module")
def qc_only(tmp_path_factory, defaults) -> dict[str, list[str]]:
    """Real QC-stage files (pipeline functions on a small simulated tumour); the cluster stage declared
    but not run, later stages not in the workflow."""
    from metastem import plots, qc
    from metastem.simulate import simulate_tumour
    from metastem.smk import write_json_atomic

    d = tmp_path_factory.mktemp("qc_only") / "demo"
    adata = simulate_tumour(300, 800, seed=0)
    _, cells, info = qc.run_qc(adata, defaults["qc"], values="counts", species="human", seed=0)
    info["input"] = {"path": "(built-in simulator)", "format": "simulated", "values": "counts", "species": "human",
                     "labels": "", "checksum": "simulated, seed 0"}
    plots.plot_qc_metrics(cells, info["thresholds"], d / "figures/qc_metrics.png")
    (d / "tables").mkdir(parents=True)
    qc.qc_summary_table(info).to_csv(d / "tables/qc_summary.tsv", sep="\t", index=False)
    write_json_atomic(info, d / "qc/info.json")
    return {"qc": [str(d / "qc/info.json"), str(d / "tables/qc_summary.tsv"), str(d / "figures/qc_metrics.png")],
            "cluster": [str(d / "cluster/info.json"), str(d / "tables/markers.tsv"),
                        str(d / "figures/umap_clusters.png")]}


def test_missing_stages_get_a_sentence_not_an_empty_figure(qc_only, defaults, tmp_path):
    from metastem.smk import report

    out = tmp_path / "report.html"
    report.write_report(out, "demo", qc_only, row={"format": "simulated", "species": "human", "labels": ""},
                        params=defaults, captions=REPO / "workflow/report",
                        provenance=sorted(map(str, (REPO / "src/metastem/data/gene_sets").glob("*_provenance.tsv"))))
    page = parse(out)
    assert page.sections == SECTIONS
    assert len(page.images) == 1 and all(len(src) > 100 for src in page.images)
    text = page.plain
    assert "The clustering stage has not finished for this dataset" in text
    for title in ("stemness", "pseudotime", "pathways"):
        assert f"The {title} stage is not part of this run" in text
    assert "placeholder" not in text


def test_captions_come_from_the_snakemake_report_captions(qc_only, defaults, tmp_path):
    from metastem.smk import report

    out = tmp_path / "report.html"
    report.write_report(out, "demo", qc_only, row={"format": "simulated"}, params=defaults,
                        captions=REPO / "workflow/report")
    text = parse(out).plain
    first_words = " ".join((REPO / "workflow/report/qc_metrics.rst").read_text().split()[:6])
    assert first_words in text


def test_index_summarises_datasets_from_their_files(qc_only, tmp_path):
    from metastem.smk import report

    results = Path(qc_only["qc"][0]).parents[2]
    (results / "demo/report.html").write_text("<html></html>")
    report.write_index(results / "index.html", [results / "demo/report.html"])
    page = parse(results / "index.html")
    # one row per sample of the dataset, each linking the dataset's report
    assert set(r for r in page.refs if not r.startswith("#")) == {"demo/report.html"}
    assert "1 of 7 (missing: cluster, malignant, stemness, pseudotime, pathways, niche)" in page.plain
    for sample in ("P1", "P2", "P3"):  # the demo tumour's three patients, one row each
        assert f"demo {sample} " in page.plain


def test_top_pathway_prefers_significant_sets():
    from metastem.smk.report import top_pathway

    summary = pd.DataFrame({"set": ["A", "B", "C"], "delta_csc": [0.9, 0.5, -0.2],
                            "significant": [False, True, True]})
    assert top_pathway(summary).startswith("B (delta_csc +0.50")
    assert "not significant" in top_pathway(summary.assign(significant=False))


def test_rst_captions_become_safe_html():
    from metastem.smk.report import rst_to_html

    assert str(rst_to_html("``a<b`` and *c*")) == "<code>a&lt;b</code> and <em>c</em>"
