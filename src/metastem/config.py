"""Config and dataset-sheet handling: schema validation, per-dataset overrides, input checks.

Everything a rule needs to know about a dataset is resolved here once, before any heavy job starts,
so that bad sheets fail in seconds with one line per problem rather than minutes later inside scanpy.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from jsonschema import Draft202012Validator, validators

from metastem.errors import MetastemError

SHEET_COLUMNS = ["dataset", "path", "format", "orientation", "species", "values", "labels", "params"]
OVERRIDABLE = ("simulate", "qc", "cluster", "stemness", "pseudotime", "pathways")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _extend_with_default(validator_class):
    """A validator that fills in schema defaults, as snakemake.utils.validate does."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


_DefaultValidator = _extend_with_default(Draft202012Validator)


def load_schema(path: str | os.PathLike) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def validate_with_defaults(instance: dict, schema: dict, *, where: str) -> dict:
    """Validate ``instance`` in place (defaults filled); raise one MetastemError listing every problem."""
    errors = sorted(_DefaultValidator(schema).iter_errors(instance), key=lambda e: list(e.path))
    if errors:
        lines = []
        for e in errors:
            key = ".".join(str(p) for p in e.path) or "(top level)"
            lines.append(f"{key}: {e.message}")
        raise MetastemError("; ".join(lines), file=where, fix="correct these keys (see workflow/schemas)")
    return instance


def infer_format(path: str) -> str:
    """Input format from a path: the suffix for files, 10x_mtx for directories."""
    p = path.lower()
    if p.endswith(".h5ad"):
        return "h5ad"
    if p.endswith(".h5"):
        return "10x_h5"
    if p.endswith(".loom"):
        return "loom"
    if p.endswith((".csv", ".csv.gz")):
        return "csv"
    if p.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz", ".matrix.gz", ".matrix")):
        return "tsv"
    if os.path.isdir(path):
        return "10x_mtx"
    return ""


def parse_overrides(text: str) -> dict:
    """``'cluster.resolution=0.5;qc.max_pct_mito=25'`` -> nested dict with YAML-typed values."""
    out: dict = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        if "=" not in item:
            raise MetastemError(f"params entry '{item}' is not key=value",
                                fix="write overrides as section.key=value separated by ';'")
        key, value = (s.strip() for s in item.split("=", 1))
        parts = key.split(".")
        if parts[0] not in OVERRIDABLE or len(parts) != 2:
            raise MetastemError(f"params key '{key}' cannot be overridden per dataset",
                                fix=f"use section.key with a section among {', '.join(OVERRIDABLE)}")
        out.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(value)
    return out


def dataset_params(config: dict, row: dict, schema: dict) -> dict:
    """The parameters actually used for one dataset: config defaults plus the row's overrides."""
    merged = {k: copy.deepcopy(config[k]) for k in OVERRIDABLE}
    merged["seed"] = config["seed"]
    try:
        for section, values in parse_overrides(row.get("params", "")).items():
            merged[section].update(values)
        sub = {"type": "object", "properties": {k: schema["properties"][k] for k in OVERRIDABLE}}
        validate_with_defaults(merged, sub, where="params column")
    except MetastemError as err:
        raise err.with_context(dataset=row["dataset"])
    return merged


def read_sheet(path: str | os.PathLike, schema: dict) -> pd.DataFrame:
    """Read and validate the dataset sheet; one MetastemError listing every bad row."""
    path = str(path)
    if not os.path.isfile(path):
        raise MetastemError("dataset sheet not found", file=path,
                            fix="set config key 'datasets' to an existing TSV file")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    except Exception as exc:  # pandas raises many types for malformed text
        raise MetastemError(f"dataset sheet does not parse as TSV ({exc})", file=path,
                            fix="use tab-separated columns with a header line") from None
    df.columns = [c.strip() for c in df.columns]
    problems = []
    unknown = [c for c in df.columns if c not in SHEET_COLUMNS]
    if unknown:
        problems.append(f"unknown column(s) {unknown}; allowed: {SHEET_COLUMNS}")
    if "dataset" not in df.columns:
        problems.append("missing the 'dataset' column")
    if df.empty:
        problems.append("no datasets listed")
    if problems:
        raise MetastemError("; ".join(problems), file=path, fix="correct the sheet header")
    rows = []
    for i, rec in enumerate(df.to_dict("records"), start=2):
        rec = {k: v.strip() for k, v in rec.items()}
        try:
            validate_with_defaults(rec, schema, where=f"{path} line {i}")
        except MetastemError as err:
            problems.append(f"line {i} ({rec.get('dataset', '?')}): {err.problem}")
            continue
        if not rec["format"] and rec["path"]:
            rec["format"] = infer_format(rec["path"])
        if not rec["format"]:
            problems.append(f"line {i} ({rec['dataset']}): cannot infer the format of '{rec['path']}'; "
                            "fill the 'format' column")
        if rec["format"] in ("csv", "tsv") and not rec["orientation"]:
            problems.append(f"line {i} ({rec['dataset']}): {rec['format']} input needs the 'orientation' "
                            "column (genes_x_cells or cells_x_genes)")
        if rec["format"] != "simulated" and not rec["path"]:
            problems.append(f"line {i} ({rec['dataset']}): empty 'path'")
        rows.append(rec)
    ids = [r["dataset"] for r in rows]
    dups = sorted({d for d in ids if ids.count(d) > 1})
    if dups:
        problems.append(f"duplicate dataset id(s): {', '.join(dups)}")
    if problems:
        raise MetastemError("; ".join(problems), file=path, fix="correct the listed rows")
    return pd.DataFrame(rows, columns=SHEET_COLUMNS).set_index("dataset", drop=False)


def sniff_format(path: str) -> str | None:
    """What the file really is (h5ad, 10x_h5, loom, text, 10x_mtx), from its bytes, or None if unknown."""
    if os.path.isdir(path):
        return "10x_mtx"
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head == _HDF5_MAGIC:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                keys = set(f.keys())
                if "row_attrs" in keys and "matrix" in keys:
                    return "loom"
                if "X" in keys or {"obs", "var"} <= keys or f.attrs.get("encoding-type") == "anndata":
                    return "h5ad"
                if "matrix" in keys or any(isinstance(f[k], h5py.Group) and "barcodes" in f[k] for k in keys):
                    return "10x_h5"
        except OSError:
            return "corrupt_hdf5"
        return "hdf5"
    if head[:2] == b"\x1f\x8b" or all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return None


def check_inputs(sheet: pd.DataFrame) -> list[str]:
    """Problems with the inputs of every dataset at once: missing, unreadable, empty, wrong format."""
    problems = []
    for rec in sheet.to_dict("records"):
        ds, path, fmt = rec["dataset"], rec["path"], rec["format"]
        if fmt == "simulated":
            continue
        where = f"dataset '{ds}': {path}"
        if not os.path.exists(path):
            problems.append(f"{where}: file not found. Fix: correct the 'path' column (relative to {os.getcwd()}).")
            continue
        if not os.access(path, os.R_OK):
            problems.append(f"{where}: not readable. Fix: check the file permissions.")
            continue
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            problems.append(f"{where}: file is empty. Fix: re-export or re-download it.")
            continue
        sniffed = sniff_format(path)
        expected = {"h5ad": {"h5ad"}, "10x_h5": {"10x_h5"}, "loom": {"loom"}, "csv": {"text"},
                    "tsv": {"text"}, "10x_mtx": {"10x_mtx"}}[fmt]
        if sniffed == "corrupt_hdf5":
            problems.append(f"{where}: HDF5 file is truncated or corrupt. Fix: re-export or re-download it.")
        elif sniffed not in expected:
            problems.append(f"{where}: declared format '{fmt}' but the file looks like '{sniffed or 'unknown binary'}'. "
                            "Fix: correct the 'format' column or the path.")
    return problems


def safe_outdir(outdir: str) -> str:
    """Refuse output folders that climb out of the working tree with '..'."""
    if ".." in Path(outdir).parts:
        raise MetastemError(f"outdir '{outdir}' contains '..'", fix="use a folder inside the working directory or an absolute path")
    return outdir


def expand_species(paths: list[str], species: str) -> list[str]:
    return [re.sub(r"\{species\}", species, p) for p in paths]
