"""The self-contained HTML report of one dataset, and the index page that links every report.

The report is read from the files the stages already wrote (``tables/*.tsv``, ``figures/*.png``,
``{stage}/info.json``): nothing is recomputed or re-plotted here, so the page shows exactly what the
pipeline produced. Files are attributed to a stage by the rule that declared them (the report rule's
inputs are grouped per stage), so a stage that adds, renames or drops a table needs no change here;
tables and figures appear in the order their rule declares them, captioned from
``workflow/report/<file stem>.rst`` (the same captions Snakemake's own report uses).

The page is one file: figures are base64 PNG data URIs, the CSS and a tiny table-sorting script are
inline, and nothing refers to another host or file, so it can be mailed or archived as it is.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
import math
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from metastem.io import write_text_atomic

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"  # package data of metastem
STAGES = ("qc", "cluster", "malignant", "stemness", "pseudotime", "pathways", "niche")
# Tables above this many rows scroll inside a box; above MAX_TABLE_ROWS they are cut (full file on disk).
SCROLL_ROWS = 15
MAX_TABLE_ROWS = 500
MARKERS_PER_CLUSTER = 8
PACKAGES = ("metastem", "scanpy", "anndata", "numpy", "scipy", "pandas", "scikit-learn", "umap-learn",
            "pynndescent", "igraph", "leidenalg", "gseapy", "liana", "matplotlib", "snakemake", "jinja2")


@dataclass
class Figure:
    name: str
    caption: Markup
    data_uri: str


@dataclass
class Table:
    name: str
    caption: Markup
    html: Markup
    n_rows: int
    n_shown: int
    columns: list[str]

    @property
    def long(self) -> bool:
        """Long tables scroll inside a box instead of stretching the page."""
        return self.n_shown > SCROLL_ROWS


@dataclass
class Stage:
    """What one stage contributes to the page: its files, its info.json and whether it ran."""

    key: str
    info: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    declared: bool = False
    ran: bool = False
    missing: list[str] = field(default_factory=list)
    table_paths: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the report rule's inputs

def stage_inputs(rules: Any, wildcards: Any) -> dict[str, list[str]]:
    """The tables, figures and info.json each stage rule declares for a dataset, grouped by stage.

    Taken from the rules themselves, so the report follows whatever files a stage writes and builds
    with the stages wired so far (a stage whose rule is absent gets a sentence in the report).
    Matrices are left out, except final.h5ad, whose obs gives stemness per known label.
    """
    out = {}
    for stage in STAGES:
        if rules.has(stage):  # Snakemake's `rules` keeps the plain names inside a module (metastem_qc -> qc)
            files = [Path(f.apply_wildcards(wildcards)) for f in getattr(rules, stage).rule.output]
            out[stage] = [str(f) for f in files if f.suffix in (".tsv", ".png", ".json") or f.name == "final.h5ad"]
    return out


def provenance_files(params: Mapping[str, Any], species: str) -> list[str]:
    """The *_provenance.tsv files beside the GMT files a dataset scores ('metastem:<file>' = shipped)."""
    from metastem.genesets import resolve_path

    gmts = params["stemness"]["gene_sets"] + params["pathways"]["gene_sets"] + params["pathways"]["extra_gene_sets"]
    folders = sorted({Path(resolve_path(g, species)).parent for g in gmts})
    return sorted(str(f) for d in folders for f in d.glob("*_provenance.tsv"))


# ----------------------------------------------------------------------------- files to page elements

def png_data_uri(path: str | Path) -> str:
    """A PNG as a data URI, so the page needs no file beside it."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def rst_to_html(text: str) -> Markup:
    """The inline reStructuredText of the caption files (``literal``, *emphasis*) as safe HTML."""
    escaped = html.escape(" ".join(text.split()), quote=False)
    escaped = re.sub(r"``(.+?)``", r"<code>\1</code>", escaped)
    escaped = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", escaped)
    return Markup(escaped)


def read_caption(captions: Mapping[str, str] | str | Path | None, stem: str) -> Markup:
    """The caption Snakemake's report uses for this file, or nothing when there is none.

    ``captions`` is ``{file stem: caption text}`` (what the workflow passes: it reads the captions through
    ``workflow.source_path``, so they are found when the workflow is a module pulled by tag) or a folder
    of ``<stem>.rst`` files.
    """
    if isinstance(captions, Mapping):
        return rst_to_html(captions[stem]) if stem in captions else Markup("")
    path = Path(captions) / f"{stem}.rst" if captions else None
    if path is None or not path.is_file():
        return Markup("")
    return rst_to_html(path.read_text())


def _format_cell(value: Any) -> str:
    """Numbers readable at a glance: 3 significant digits, small p-values in scientific notation."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if abs(value) >= 1000 or (value.is_integer() and abs(value) < 1e15):
            return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.0f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 1e4 else str(value)
    return re.sub(r"(?<=\w)([,;])(?=[A-Za-z])", r"\1 ", str(value))  # gene lists "A,B;C" wrap after a space


def frame_to_html(df: pd.DataFrame, *, sortable: bool = True, extra_class: str | None = None) -> Markup:
    """An HTML table from pandas (escaped), styled by the page's CSS and sortable by its inline script."""
    shown = df.map(_format_cell) if len(df) else df
    classes = ["data"] + (["sortable"] if sortable else []) + ([extra_class] if extra_class else [])
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    out = shown.to_html(index=False, border=0, classes=classes, escape=True, na_rep="–")
    for col in numeric:  # right-align numeric columns: mark their header so CSS and sorting know
        out = out.replace(f"<th>{html.escape(str(col))}</th>", f'<th class="num">{html.escape(str(col))}</th>', 1)
    return Markup(out)


def read_tsv(path: str | Path) -> pd.DataFrame:
    """A stage table; '#' lines at the top (provenance notes) are skipped."""
    return pd.read_csv(path, sep="\t", comment=None, skiprows=_comment_lines(path))


def _comment_lines(path: str | Path) -> int:
    with open(path) as fh:
        n = 0
        for line in fh:
            if not line.startswith("#"):
                break
            n += 1
    return n


def make_table(path: str | Path, captions_dir: str | Path | None, *, df: pd.DataFrame | None = None,
               caption: Markup | None = None) -> Table:
    """A stage table for the page; long ones are cut at MAX_TABLE_ROWS (the TSV keeps every row)."""
    stem = Path(path).name.removesuffix(".tsv")
    df = read_tsv(path) if df is None else df
    shown = df.head(MAX_TABLE_ROWS)
    return Table(name=stem, caption=read_caption(captions_dir, stem) if caption is None else caption,
                 html=frame_to_html(shown), n_rows=len(df), n_shown=len(shown), columns=[str(c) for c in df.columns])


def make_figure(path: str | Path, captions_dir: str | Path | None) -> Figure:
    stem = Path(path).stem
    return Figure(name=stem, caption=read_caption(captions_dir, stem), data_uri=png_data_uri(path))


def load_stage(key: str, files: Sequence[str], captions_dir: str | Path | None) -> Stage:
    """One stage's tables, figures and info.json, from the files its rule declared.

    A declared file that is missing or empty is listed in ``missing`` (the page says so) instead of
    appearing as an empty figure or table.
    """
    stage = Stage(key=key, declared=bool(files))
    for f in map(Path, files):
        present = f.is_file() and f.stat().st_size > 0
        if f.name == "info.json" and present:
            stage.info = json.loads(f.read_text())
            stage.ran = True
        elif f.suffix == ".png" and f.parent.name == "figures":
            if present:
                stage.figures.append(make_figure(f, captions_dir))
            else:
                stage.missing.append(f.name)
        elif f.suffix == ".tsv" and f.parent.name == "tables":
            if present:
                stage.tables.append(make_table(f, captions_dir))
                stage.table_paths[f.stem] = f
            else:
                stage.missing.append(f.name)
    return stage


# ----------------------------------------------------------------------------- stage-specific views

def marker_overview(markers: pd.DataFrame, sizes: pd.DataFrame | None, n: int = MARKERS_PER_CLUSTER) -> pd.DataFrame:
    """One row per cluster: its size and its top marker genes with their log2 fold change.

    The long marker table (25 genes x clusters) is hard to scan; this is the view a reader wants first.
    """
    rows = []
    for cluster, grp in markers.groupby("cluster", sort=False):
        top = grp.sort_values("scores", ascending=False).head(n) if "scores" in grp else grp.head(n)
        genes = ", ".join(f"{g} ({fc:+.1f})" for g, fc in zip(top["gene"], top.get("log2fc", [math.nan] * len(top))))
        rows.append({"cluster": str(cluster), "top markers (log2 fold change)": genes})
    out = pd.DataFrame(rows)
    if sizes is not None and {"cluster", "n_cells"} <= set(sizes.columns):
        sz = sizes.assign(cluster=sizes["cluster"].astype(str))
        cols = ["cluster", "n_cells"] + (["fraction"] if "fraction" in sz else [])
        out = sz[cols].merge(out, on="cluster", how="left")
    return out.sort_values("cluster", key=lambda s: pd.to_numeric(s, errors="coerce"), kind="stable")


def cluster_view(files: Sequence[str], captions_dir: str | Path | None) -> Table | None:
    """The per-cluster overview (sizes + top markers), built from markers.tsv and cluster_sizes.tsv."""
    by_name = {Path(f).name: Path(f) for f in files if Path(f).is_file() and Path(f).stat().st_size > 0}
    if "markers.tsv" not in by_name:
        return None
    sizes = read_tsv(by_name["cluster_sizes.tsv"]) if "cluster_sizes.tsv" in by_name else None
    df = marker_overview(read_tsv(by_name["markers.tsv"]), sizes)
    caption = Markup("Cluster sizes and each cluster's top marker genes (Wilcoxon test, one cluster against all "
                     "other cells), with the log<sub>2</sub> fold change in brackets. The full table follows.")
    return make_table("cluster_overview.tsv", captions_dir, df=df, caption=caption)


def label_table(obs: pd.DataFrame, labels_key: str) -> pd.DataFrame:
    """Stemness, CSC-like fraction and pseudotime per known label, to check the calls against annotation."""
    grouped = obs.groupby(obs[labels_key].astype(str), observed=True)
    out = pd.DataFrame({"cells": grouped.size()})
    if "stemness" in obs:
        out["median_stemness"] = grouped["stemness"].median()
    if "csc_like" in obs:
        out["pct_csc_like"] = 100 * grouped["csc_like"].mean()
    if "pseudotime" in obs:
        out["median_pseudotime"] = grouped["pseudotime"].median()
    sort = "median_stemness" if "median_stemness" in out else "cells"
    return out.sort_values(sort, ascending=False).rename_axis(labels_key).reset_index()


def read_obs(h5ad: str | Path) -> pd.DataFrame:
    """Only the cell annotations of an h5ad. (Backed mode would still load layers, obsm and obsp:
    final.h5ad's count layer alone is as large as X, 3.8 GB of report memory at 262k cells.)"""
    import h5py
    from anndata.io import read_elem

    with h5py.File(h5ad, "r") as f:
        return read_elem(f["obs"])


def stemness_by_label(final_h5ad: str | Path | None, labels_key: str | None) -> Table | None:
    """The per-label stemness table when the sheet names a labels column and final.h5ad exists."""
    if not labels_key or final_h5ad is None or not Path(final_h5ad).is_file():
        return None
    obs = read_obs(final_h5ad)
    if labels_key not in obs or "stemness" not in obs:
        return None
    caption = Markup(f"Stemness per known label (sheet column <code>{html.escape(labels_key)}</code>): cells, "
                     "median stemness, percentage called CSC-like and median pseudotime. Labels that the "
                     "annotation calls stem-like or progenitor should rank high.")
    return make_table("stemness_by_label.tsv", None, df=label_table(obs, labels_key), caption=caption)


def provenance_tables(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Each curated gene-set collection's provenance: its '#' header notes and the per-set table."""
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            continue
        notes = [line.lstrip("# ").rstrip() for line in p.read_text().splitlines() if line.startswith("#")]
        out.append({"name": p.name, "notes": notes,
                    "table": make_table(p, None, caption=Markup(f"<code>{html.escape(p.name)}</code>"))})
    return out


# ----------------------------------------------------------------------------- facts from info.json

def _pct(n: float | None, total: float | None) -> str | None:
    if n is None or not total:
        return None
    return f"{int(n):,} of {int(total):,} ({100 * n / total:.1f}%)"


def input_facts(qc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Where the data came from and how big it was, before and after QC."""
    src = qc.get("input", {})
    facts = [("Source", src.get("path")), ("Checksum", src.get("checksum")), ("Format", src.get("format")),
             ("Values", src.get("values")), ("Species", src.get("species")), ("Known labels", src.get("labels") or "none")]
    if "cells_in" in qc:
        facts += [("Cells × genes before QC", f"{qc['cells_in']:,} × {qc['genes_in']:,}"),
                  ("Cells × genes after QC", f"{qc['cells_out']:,} × {qc['genes_out']:,}")]
    facts.append(("Gene names", qc.get("genes", {}).get("summary")))   # metastem.genes.map_gene_names
    if qc.get("n_spike_ins_removed"):
        facts.append(("Spike-ins", f"{qc['n_spike_ins_removed']} ERCC controls removed before QC (share per cell "
                                   "kept as pct_counts_ercc); not counted as genes anywhere"))
    if src.get("log_base"):
        facts.append(("Log base", src["log_base"]))
    return [(k, str(v)) for k, v in facts if v is not None]


def qc_removed(qc: Mapping[str, Any]) -> pd.DataFrame:
    """Cells removed per reason (a cell can fail several), with the thresholds applied."""
    thresholds = qc.get("thresholds", {})
    metric_of = {"low_or_high_counts": "total_counts", "low_or_high_genes": "n_genes_by_counts",
                 "high_mito": "pct_counts_mt", "high_hb": "pct_counts_hb"}
    rows = []
    for reason, n in qc.get("removed", {}).items():
        t = thresholds.get(metric_of.get(reason, ""), {})
        if reason == "doublet" and qc.get("doublet_threshold") is not None:
            t = {"low": None, "high": qc["doublet_threshold"]}
        rows.append({"reason": reason.replace("_", " "), "cells removed": n,
                     "% of input": round(100 * n / qc["cells_in"], 1) if qc.get("cells_in") else math.nan,
                     "removed when": _bounds(t.get("low"), t.get("high"))})
    rows.append({"reason": "total (any reason)", "cells removed": qc.get("removed_total"),
                 "% of input": round(100 * qc.get("removed_total", 0) / qc["cells_in"], 1) if qc.get("cells_in")
                 else math.nan, "removed when": ""})
    return pd.DataFrame(rows)


def _bounds(low: float | None, high: float | None) -> str:
    """A threshold pair as the rule a reader checks: below low or above high is removed."""
    parts = ([f"< {_format_cell(float(low))}"] if low is not None else []) + \
            ([f"> {_format_cell(float(high))}"] if high is not None else [])
    return " or ".join(parts)


def cluster_facts(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    facts = [("Normalisation", info.get("normalisation")), ("Highly variable genes", info.get("n_hvg")),
             ("Principal components", info.get("n_pcs")), ("Leiden clusters", info.get("n_clusters")),
             ("kNN graph components", info.get("knn_components"))]
    return [(k, str(v)) for k, v in facts if v is not None]


def malignant_facts(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    """How malignant cells were told from normal ones, and how many of each."""
    n_mal, n_norm = info.get("n_malignant"), info.get("n_normal")
    ref = json.loads(info.get("reference_cells_json") or "{}")
    d = info.get("ashman_d")
    facts = [("Evidence", {"labels": "known labels (sheet)", "cnv": "copy-number profiles (infercnvpy)",
                           "none": "none: no normal reference, every cell kept as malignant"}.get(info.get("evidence"))),
             ("Malignant cells", _pct(n_mal, (n_mal or 0) + (n_norm or 0)) if n_mal is not None else None),
             ("Reference normal cells", ", ".join(f"{k}: {v}" for k, v in ref.items()) if ref else None),
             ("Rule", info.get("rule")),
             ("Separation of the calls (Ashman's D)", _fmt(d) if d is not None and d >= 0 else None)]
    return [(k, str(v)) for k, v in facts if v is not None]


def stemness_facts(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The score used, the CSC-like call and how far the score is more than the gene-count baseline."""
    corr = info.get("correlations", {}) or {}
    method = info.get("method_used")
    if method and info.get("method_requested") not in (None, method):
        method = f"{method} (requested {info['method_requested']})"
    rho = corr.get("stemness_vs_gene_counts")
    direction = info.get("direction")   # issue 17: does independent evidence agree on which end is the stem end?
    if direction and info.get("agreement_cytotrace_vs_programme") is not None:
        direction = (f"{direction} (Spearman of the CytoTRACE-style score with the curated programmes "
                     f"{info['agreement_cytotrace_vs_programme']:+.2f}; supported from {info.get('min_agreement', 0.3):g})")
    ingredients = info.get("stemness_vs_ingredient") or {}
    facts = [("Score", method),
             ("Direction", direction),
             ("Score follows", info.get("score_source")),
             ("Spearman of the score with each ingredient", "; ".join(
                 f"{k.removeprefix('stemness_').replace('_', ' ')} {_fmt(v) or '–'}" for k, v in ingredients.items())
              or None),
             ("CSC-like cells", "not computed (no stemness score)" if not stemness_computed(info) else
              _pct(info.get("n_csc_like"), info.get("n_cells"))),
             ("CSC-like threshold (stemness ≥)", _fmt(info.get("csc_threshold"))),
             ("Median genes detected per cell", _fmt(info.get("median_genes_detected"))),
             ("Spearman with genes detected (baseline)", _fmt(rho)),
             ("Spearman with S / G2M phase score", " / ".join(_fmt(corr.get(k)) or "–" for k in
                                                            ("stemness_vs_S_score", "stemness_vs_G2M_score"))
              if "stemness_vs_S_score" in corr else None),
             ("Low-complexity data", info.get("low_complexity_reason") if info.get("low_complexity") else
              ("no" if "low_complexity" in info else None))]
    return [(k, str(v)) for k, v in facts if v is not None]


def pseudotime_facts(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    if info.get("skipped"):  # its reason is among the stage's notes and in the box at the top
        return [("Pseudotime", "not computed")]
    root = info.get("root", {}) or {}
    facts = [("Method", info.get("method")), ("Root cell", root.get("barcode")), ("Root cluster", root.get("cluster")),
             ("Why this root", root.get("why")),
             ("Cells unreachable from the root", _pct(info.get("n_unreachable"), info.get("n_cells"))),
             ("kNN components left out", _components_left_out(info))]
    return [(k, str(v)) for k, v in facts if v is not None]


def _components_left_out(info: Mapping[str, Any]) -> str | None:
    """One line per kNN component with no edge to the root's: its size, its clusters, and why it has no time."""
    listed = info.get("components_left_out")
    if listed is None:
        return None
    if not listed:
        return "none: every cell is connected to the root"
    parts = [f"{c['n_cells']:,} cells (cluster{'s' if len(c['clusters']) > 1 else ''} "
             + ", ".join(f"{k}: {v}" for k, v in list(c["clusters"].items())[:6])
             + (", …" if len(c["clusters"]) > 6 else "") + ")" for c in listed[:5]]
    more = info.get("n_components_left_out", len(listed)) - len(parts)
    return (f"{info.get('n_components_left_out', len(listed))}: " + "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
            + ". " + listed[0]["why"][0].upper() + listed[0]["why"][1:] + ".")


def pathways_facts(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Counts of the pathway stage, the unit of replication and what was left out, and why. Without a
    CSC-like contrast (``skipped``) only what was computed: the scorer and the sets scored."""
    if info.get("skipped"):
        facts = [("Per-cell scorer", info.get("scorer")), ("Gene sets", info.get("n_sets")),
                 ("Gene sets scored per cell", info.get("n_scored")),
                 ("CSC-like vs other malignant cells", "not tested (no CSC-like cells)"),
                 ("Malignant cells", info.get("n_malignant"))]
        return [(k, str(v)) for k, v in facts if v is not None]
    n_samples = info.get("n_samples")
    replicated = (info.get("n_replicated") if n_samples is not None and n_samples >= 3 else
                  f"descriptive (n = {n_samples} sample{'s' if n_samples != 1 else ''})" if n_samples is not None
                  else None)
    facts = [("Per-cell scorer", info.get("scorer")), ("Gene sets", info.get("n_sets")),
             ("Gene sets tested (enough genes left, some signal)", info.get("n_tested")),
             ("Called against matched null sets (CSC-like vs other malignant)",
              info.get("n_called", info.get("n_significant"))),
             ("Replicated across samples", replicated),
             ("Unit of replication", info.get("unit_of_replication")),
             ("Stemness-score genes left out of pathway sets", info.get("n_stemness_genes_excluded")),
             ("Positive controls (define CSC-like; never a finding)",
              ", ".join(info["positive_controls"]) if info.get("positive_controls") else None),
             ("CSC-like cells compared", info.get("n_csc_like")),
             ("Malignant cells", info.get("n_malignant"))]
    return [(k, str(v)) for k, v in facts if v is not None]


def niche_facts(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    if info.get("skipped"):  # its reason is among the stage's notes and in the box at the top
        return [("Interactions", "not scored")]
    params = info.get("params", {}) or {}
    axes = info.get("review_axes_specific")
    facts = [("Cells grouped by", params.get("groupby_used")), ("Interactions scored", info.get("n_interactions")),
             (f"Specific (permutation p < {params.get('alpha', 0.05)})", info.get("n_specific")),
             ("The review's axes among them", ", ".join(axes) if axes else ("none" if axes is not None else None))]
    rep = info.get("replication") or {}
    if rep:  # the sample is the unit: an interaction counts as replicated only across samples
        rep_axes = rep.get("review_axes_replicated")
        facts += [("Samples scored on their own", rep.get("n_samples")),
                  ("Specific and replicated (>= 3 samples, >= 80 % with p < alpha)", rep.get("n_specific_replicated")),
                  ("The review's axes replicated", ", ".join(rep_axes) if rep_axes else
                   ("none" if rep_axes is not None else None))]
    return [(k, str(v)) for k, v in facts if v is not None]


def _fmt(value: Any) -> str | None:
    return None if value is None else _format_cell(float(value) if isinstance(value, (int, float)) else value)


# ----------------------------------------------------------------------------- what was skipped, and why

# What a stage's ``skipped`` stands for when its info.json does not name it (``skipped_what``).
SKIPPED_WHAT = {"pseudotime": "pseudotime", "pathways": "the CSC-like pathway contrast",
                "niche": "the niche interactions"}


def stemness_computed(info: Mapping[str, Any]) -> bool:
    """False only when the stemness stage says it computed no score (``status`` 'not_computed',
    ``stemness.required: false``); an older info.json without ``status`` computed one."""
    return info.get("status", "computed") != "not_computed"


def _sentence(text: str) -> str:
    text = " ".join(str(text).split())
    return (text[:1].upper() + text[1:]).rstrip(".") + "." if text else ""


def skipped_summary(stages: Mapping[str, Stage]) -> dict[str, Any] | None:
    """What this run did not compute and why, read from the stages' info.json, or None when nothing was skipped.

    - stemness/info.json ``status`` 'not_computed' (``stemness.required: false`` where no score was
      possible): its ``direction_reason`` is the reason, and the CSC-like calls are skipped;
    - any stage's ``skipped``: a sentence saying that the stage, or the part ``skipped_what`` names,
      was not computed and why (pseudotime without a root, the pathway stage's CSC-like contrast,
      the niche interactions); shown as written.

    Returns ``{'stemness_reason', 'items': [{'what', 'stage', 'why'}], 'skipped' (the 'what's joined),
    'computed'}``: ``computed`` lists what ran without stemness (pseudotime from a configured root, the
    per-cell pathway scores), so the page says plainly what is and is not there.
    """
    st = stages["stemness"].info
    not_computed = stages["stemness"].ran and not stemness_computed(st)
    items = []
    if not_computed:
        items.append({"what": "CSC-like calls", "stage": "stemness",
                      "why": "No CSC-like calls were made: with no stemness score no cell can be called CSC-like."})
    for key in STAGES:
        info = stages[key].info
        if info.get("skipped"):
            items.append({"what": str(info.get("skipped_what") or SKIPPED_WHAT.get(key, key)), "stage": key,
                          "why": _sentence(info["skipped"])})
    if not items:
        return None
    computed = []
    pt, pw = stages["pseudotime"], stages["pathways"]
    if not_computed and pt.ran and not pt.info.get("skipped"):
        spec = (pt.info.get("root") or {}).get("spec")
        computed.append("pseudotime, from the root set in the config" + (f" (pseudotime.root: {spec})" if spec else ""))
    if not_computed and pw.ran and pw.info.get("n_scored") is not None:
        computed.append(f"per-cell scores of {pw.info['n_scored']} pathway gene sets, their cluster means and ssGSEA "
                        "of cluster pseudobulks")
    reason = " ".join(str(st.get("direction_reason") or "no score was possible").split()).rstrip(".")
    return {"stemness_reason": reason if not_computed else None,
            "items": items, "skipped": ", ".join(i["what"] for i in items), "computed": computed}


FACTS = {"cluster": cluster_facts, "malignant": malignant_facts, "stemness": stemness_facts, "pseudotime": pseudotime_facts,
         "pathways": pathways_facts, "niche": niche_facts}


# ----------------------------------------------------------------------------- methods and provenance

def package_versions(names: Sequence[str] = PACKAGES) -> list[tuple[str, str]]:
    """Installed versions of the packages that shape the results."""
    out = []
    for name in names:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "not installed"))
    return out


def params_table(params: Mapping[str, Any], schema: Mapping[str, Any] | None, sections: Sequence[str]) -> pd.DataFrame:
    """Parameters actually used (defaults plus per-dataset overrides), with their default and meaning.

    A value differing from the schema default is marked, so a methods section can state what was changed.
    """
    props = (schema or {}).get("properties", {})
    rows = [{"parameter": "seed", "value": params.get("seed"), "default": props.get("seed", {}).get("default"),
             "meaning": props.get("seed", {}).get("description", "")}]
    for section in sections:
        spec = props.get(section, {}).get("properties", {})
        for key, value in (params.get(section) or {}).items():
            s = spec.get(key, {})
            rows.append({"parameter": f"{section}.{key}", "value": value, "default": s.get("default"),
                         "meaning": " ".join(str(s.get("description", "")).split())})
    df = pd.DataFrame(rows)
    changed = [("default" in spec) and v != d for v, d, spec in
               zip(df["value"], df["default"], [_spec(props, p) for p in df["parameter"]])]
    df.insert(2, "changed", changed)
    for col in ("value", "default"):
        df[col] = df[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) or v is None else v)
    return df


def _spec(props: Mapping[str, Any], dotted: str) -> Mapping[str, Any]:
    node: Mapping[str, Any] = {"properties": props}
    for part in dotted.split("."):
        node = node.get("properties", {}).get(part, {})
    return node


# ----------------------------------------------------------------------------- the page

def environment() -> Environment:
    """Jinja2 with autoescaping: every value from a file is escaped unless it is already Markup."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _format_cell
    return env


def build_report(dataset: str, stage_files: Mapping[str, Sequence[str]], *, row: Mapping[str, Any],
                 params: Mapping[str, Any], captions: Mapping[str, str] | str | Path | None = None,
                 provenance: Sequence[str] = (), schema: Mapping[str, Any] | None = None,
                 now: dt.datetime | None = None) -> str:
    """The HTML of one dataset's report from the files each stage declared (``stage_files[stage]``).

    ``captions``: ``{file stem: caption text}`` or a folder of ``<stem>.rst`` files (see read_caption).
    """
    captions_dir = captions
    stages = {k: load_stage(k, stage_files.get(k, []), captions_dir) for k in STAGES}
    extra = {"cluster": cluster_view(stage_files.get("cluster", []), captions_dir)}
    final = next((f for f in stage_files.get("pathways", []) if Path(f).name == "final.h5ad"), None)
    extra["stemness"] = stemness_by_label(final, row.get("labels") or None)
    extra["samples"] = per_sample_view(stages)
    sections = ["simulate"] if row.get("format") == "simulated" else []
    sections += ["qc", "cluster", "malignant", "stemness", "pseudotime", "pathways", "niche"]
    summary = summarise(stages)
    return environment().get_template("report.html.j2").render(
        dataset=dataset, row=row, stages=stages, extra=extra, summary=summary, skipped=skipped_summary(stages),
        facts={k: FACTS[k](stages[k].info) for k in FACTS},
        input_facts=input_facts(stages["qc"].info),
        qc_removed=frame_to_html(qc_removed(stages["qc"].info), sortable=False) if stages["qc"].ran else None,
        provenance=provenance_tables(provenance),
        p=params, params_html=frame_to_html(params_table(params, schema, sections), extra_class="params"),
        versions=package_versions(), seed=params.get("seed"),
        run_date=(now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d %H:%M UTC"),
    )


def write_report(out: str | Path, dataset: str, stage_files: Mapping[str, Sequence[str]], **kwargs: Any) -> int:
    """Write report.html; returns its size in bytes (logged, since the page must stay light)."""
    page = build_report(dataset, stage_files, **kwargs)
    write_text_atomic(page, out)
    return Path(out).stat().st_size


# ----------------------------------------------------------------------------- one-line summaries

def summarise(stages: Mapping[str, Stage]) -> dict[str, Any]:
    """Cells, clusters, CSC-like fraction and top pathway: the headline numbers of a dataset.

    ``stemness_computed`` is False when the stemness stage computed no score: the CSC-like fraction
    is then None (shown as "not computed", never 0 %), as is the top pathway (no contrast, ``contrast_skipped``).
    ``skipped`` names what the stages' info.json say was skipped (a stage, or the part ``skipped_what`` names)."""
    qc, cl, st, pw = (stages[k].info for k in ("qc", "cluster", "stemness", "pathways"))
    computed = stemness_computed(st)
    n_csc = st.get("n_csc_like", pw.get("n_csc_like")) if computed else None
    n_cells = st.get("n_cells", qc.get("cells_out"))
    table = stages["pathways"].table_paths.get("pathways_summary")
    return {"cells": qc.get("cells_out"), "genes": qc.get("genes_out"), "clusters": cl.get("n_clusters"),
            "csc_fraction": n_csc / n_cells if n_csc is not None and n_cells else None,
            "stemness_computed": computed, "contrast_skipped": bool(pw.get("skipped")),
            "skipped": [str(stages[k].info.get("skipped_what") or SKIPPED_WHAT.get(k, k)) for k in STAGES
                        if stages[k].info.get("skipped")],
            "top_pathway": top_pathway(read_tsv(table)) if table and not pw.get("skipped") else None}


def top_pathway(summary: pd.DataFrame) -> str | None:
    """The headline pathway: the largest effect among sets called up in CSC-like cells against the
    matched null; else the largest effect among tested sets, marked 'not called'. Positive controls
    (sets that define CSC-like cells) and flagged sets are never the headline: they restate the
    definition or are not readouts. Older summaries (delta_csc, significant) are read as before."""
    if "call" in summary and "effect" in summary and "set" in summary:
        calls = summary["call"].astype(str)
        tested = summary[calls.isin(["up in CSC-like", "down in CSC-like", "not called"])
                         & summary["effect"].notna()]
        if tested.empty:
            return None
        up = tested[tested["call"] == "up in CSC-like"]
        best = (up if len(up) else tested).sort_values("effect", ascending=False, kind="stable").iloc[0]
        q = best.get("q_null")
        rep = str(best.get("replicated", ""))
        tag = (f", q {q:.2g}" if isinstance(q, float) and math.isfinite(q) else "") + (
            "" if len(up) else ", not called") + (f"; {rep}" if rep.startswith("descriptive") else
                                                  ", replicated" if rep == "yes" else "")
        return f"{best['set']} (d {best['effect']:+.2f}{tag})"
    effect = next((c for c in ("delta_csc", "auroc_csc", "gsea_nes") if c in summary), None)
    if effect is None or "set" not in summary:
        return None
    df = summary.dropna(subset=[effect])
    if df.empty:
        return None
    sig = df[df["significant"].astype(bool)] if "significant" in df else df.iloc[0:0]
    best = (sig if len(sig) else df).sort_values(effect, ascending=False).iloc[0]
    tag = "" if len(sig) else ", not significant"
    return f"{best['set']} ({effect} {best[effect]:+.2f}{tag})"


def per_sample_frame(qc_info: Mapping[str, Any], csc_table: pd.DataFrame | None,
                     malignant_table: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per sample: cells before and after QC, malignant cells and fraction, CSC-like cells among
    them, and whether the sample's malignant cells hold a distinct stem-like population (issue 15).

    Without CSC-like calls (an empty csc_by_sample table: stemness not computed) the malignant cells
    and fraction come from ``malignant_table`` (tables/malignant_summary.tsv), when given."""
    per = qc_info.get("per_sample") or {}
    rows = [{"sample": str(s), "cells before QC": v.get("cells_in"), "cells after QC": v.get("cells_out")}
            for s, v in per.items()]
    df = pd.DataFrame(rows, columns=["sample", "cells before QC", "cells after QC"])
    if csc_table is not None and len(csc_table) and "sample" in csc_table:
        c = csc_table.assign(sample=csc_table["sample"].astype(str))
        c = pd.DataFrame({"sample": c["sample"], "malignant cells": c["n_malignant"],
                          "malignant fraction": c["n_malignant"] / c["n_cells"].where(c["n_cells"] > 0),
                          "CSC-like cells": c["n_csc_like"], "CSC-like fraction of malignant": c["frac_csc_like"],
                          "distinct stem-like population": c["distinct"].astype(bool)})
        df = df.merge(c, on="sample", how="outer") if len(df) else c
    elif malignant_table is not None and len(malignant_table) and {"sample", "n_malignant", "n_cells"} <= set(malignant_table):
        m = malignant_table[malignant_table["sample"].astype(str) != "all"]
        m = pd.DataFrame({"sample": m["sample"].astype(str), "malignant cells": m["n_malignant"],
                          "malignant fraction": m["n_malignant"] / m["n_cells"].where(m["n_cells"] > 0)})
        df = df.merge(m, on="sample", how="outer") if len(df) else m
    return df


def per_sample_view(stages: Mapping[str, Stage]) -> Table | None:
    """The report's per-sample table (only for datasets of several samples)."""
    csc_path = stages["stemness"].table_paths.get("csc_by_sample")
    mal_path = stages["malignant"].table_paths.get("malignant_summary")
    df = per_sample_frame(stages["qc"].info, read_tsv(csc_path) if csc_path else None,
                          read_tsv(mal_path) if mal_path else None)
    if len(df) < 2:
        return None
    caption = Markup("Each sample's cells before and after QC (thresholds and doublets computed per sample), its "
                     "malignant cells, and its CSC-like cells, called among that sample's malignant cells only. "
                     "Where a sample has no distinct stem-like population, its CSC-like share is only the quantile "
                     "rule's, not evidence of a population.")
    return make_table("samples.tsv", None, df=df, caption=caption)


def dataset_summary(dataset_dir: str | Path) -> dict[str, Any]:
    """The index page's lines for one dataset, read from the files its stages wrote: the dataset's
    headline numbers and, under ``samples``, one row per sample (``per_sample_frame``)."""
    d = Path(dataset_dir)
    stages = {}
    for key in STAGES:
        files = [d / key / "info.json"] + ([d / "tables" / "pathways_summary.tsv"] if key == "pathways" else []) \
            + ([d / "tables" / "csc_by_sample.tsv"] if key == "stemness" else []) \
            + ([d / "tables" / "malignant_summary.tsv"] if key == "malignant" else [])
        stages[key] = load_stage(key, [str(f) for f in files], None)
    csc_path = stages["stemness"].table_paths.get("csc_by_sample")
    mal_path = stages["malignant"].table_paths.get("malignant_summary")
    samples = per_sample_frame(stages["qc"].info, read_tsv(csc_path) if csc_path else None,
                               read_tsv(mal_path) if mal_path else None)
    samples = samples.astype(object).where(samples.notna(), None)
    return {"dataset": d.name, "ran": [k for k in STAGES if stages[k].ran], **summarise(stages),
            "samples": samples.to_dict("records")}


def build_index(summaries: Sequence[Mapping[str, Any]], reports: Sequence[str], *,
                now: dt.datetime | None = None) -> str:
    """The index page: one line per dataset, linking its report by a path relative to the index."""
    return environment().get_template("index.html.j2").render(
        rows=list(zip(summaries, reports)), stages=STAGES,
        run_date=(now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d %H:%M UTC"))


def write_index(out: str | Path, report_paths: Sequence[str | Path]) -> None:
    """Write index.html beside the dataset folders, linking each report.html relatively."""
    out = Path(out)
    summaries = [dataset_summary(Path(r).parent) for r in report_paths]
    links = [Path(r).resolve().relative_to(out.parent.resolve()).as_posix() for r in report_paths]
    write_text_atomic(build_index(summaries, links), out)
