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

import numpy as np
import pandas as pd
import yaml
from jsonschema import Draft202012Validator, validators

from metastem.errors import MetastemError
from metastem.io import infer_format

SHEET_COLUMNS = ["dataset", "path", "format", "orientation", "species", "values", "log_base", "labels", "params"]
# Sample columns (issue 15): rows sharing a dataset id are its samples, one input each, or `sample_key`
# names an obs column of one input. SAMPLE_FIELDS may differ between the rows of one dataset; every
# other column is the dataset's and must agree. SAMPLE_METADATA travel into obs.
SAMPLE_COLUMNS = ["sample", "sample_key", "patient", "condition", "site"]
SHEET_COLUMNS += SAMPLE_COLUMNS
SAMPLE_METADATA = ("patient", "condition", "site")
SAMPLE_FIELDS = ("sample", "path", "format", "orientation", *SAMPLE_METADATA)
OVERRIDABLE = ("simulate", "qc", "cluster", "malignant", "stemness", "pseudotime", "pathways", "niche")
# Folders of OUTDIR that are not datasets: a dataset with one of these ids would share them.
RESERVED_IDS = ("logs", "benchmarks")
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


class InputProblems(MetastemError):
    """Several independent problems (e.g. one per dataset), rendered one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = [p.strip() for p in problems]
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)

    def with_context(self, **_) -> "InputProblems":
        return self


def _non_finite(instance: Any, path: tuple = ()) -> list[str]:
    """Keys holding NaN/inf: JSON Schema's minimum/maximum comparisons let them through."""
    if isinstance(instance, dict):
        return [p for k, v in instance.items() for p in _non_finite(v, path + (k,))]
    if isinstance(instance, list):
        return [p for i, v in enumerate(instance) for p in _non_finite(v, path + (i,))]
    if isinstance(instance, float) and not np.isfinite(instance):
        return [f"{'.'.join(map(str, path))}: {instance} is not a finite number"]
    return []


def schema_problems(instance: dict, schema: dict) -> list[str]:
    """Validate ``instance`` in place (defaults filled); every problem as 'key: message'."""
    errors = sorted(_DefaultValidator(schema).iter_errors(instance), key=lambda e: [str(p) for p in e.path])
    lines = []
    for e in errors:
        key = ".".join(str(p) for p in e.path) or "(top level)"
        msg = e.message if len(e.message) < 300 else e.message[:300] + "..."
        if e.validator == "enum":
            msg = f"{e.instance!r} is not one of {', '.join(map(repr, e.validator_value))}"
        lines.append(f"{key}: {msg}")
    return lines + _non_finite(instance)


def validate_with_defaults(instance: dict, schema: dict, *, where: str) -> dict:
    """Validate ``instance`` in place (defaults filled); raise one MetastemError listing every problem."""
    lines = schema_problems(instance, schema)
    if lines:
        raise MetastemError("; ".join(lines), file=where, fix="correct these keys (see workflow/schemas)")
    return instance


def validate_config(config: dict, schema: dict, *, where: str = "config") -> dict:
    """The workflow config against its schema, defaults filled in place; one line per bad key.

    Use this instead of ``snakemake.utils.validate``, which prints the whole schema for one bad key.
    """
    lines = schema_problems(config, schema)
    if lines:
        raise InputProblems([f"{where}: {line}. Fix: correct this key (allowed keys, types and ranges: "
                             "workflow/schemas/config.schema.yaml)" for line in lines])
    return config


def parse_overrides(text: str) -> dict:
    """``'cluster.resolution=0.5;qc.max_pct_mito=25'`` -> nested dict with YAML-typed values."""
    out: dict = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        if "=" not in item:
            raise MetastemError(f"params entry '{item}' is not key=value",
                                fix="write overrides as section.key=value separated by ';'")
        key, value = (s.strip() for s in item.split("=", 1))
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in OVERRIDABLE or not parts[1]:
            raise MetastemError(f"params key '{key}' cannot be overridden per dataset",
                                fix=f"use section.key with a section among {', '.join(OVERRIDABLE)}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise MetastemError(f"params value of '{key}' does not parse ('{value}')",
                                fix="write plain numbers, true/false, null or text") from None
        if isinstance(parsed, str):  # YAML 1.1 reads '1e-3' as text; users mean a number
            for cast in (int, float):
                try:
                    parsed = cast(parsed)
                    break
                except ValueError:
                    pass
        if parts[1] in out.get(parts[0], {}):
            raise MetastemError(f"params key '{key}' is given twice", fix="keep one value per key")
        out.setdefault(parts[0], {})[parts[1]] = parsed
    return out


def dataset_params(config: dict, row: dict, schema: dict, *, where: str = "params column of the sheet") -> dict:
    """The parameters actually used for one dataset: config defaults plus the row's overrides."""
    merged = {k: copy.deepcopy(config[k]) for k in OVERRIDABLE}
    merged["seed"] = config["seed"]
    try:
        for section, values in parse_overrides(row.get("params", "")).items():
            merged[section].update(values)
        sub = {"type": "object", "properties": {k: schema["properties"][k] for k in OVERRIDABLE}}
        validate_with_defaults(merged, sub, where=where)
    except MetastemError as err:
        raise err.with_context(dataset=row["dataset"])
    return merged


def _row_problem(ds: str, where: str, problem: str, fix: str) -> str:
    return str(MetastemError(problem, dataset=ds or None, file=where, fix=fix))


def _read_sheet(path: str, schema: dict) -> tuple[pd.DataFrame, list[str]]:
    """The valid rows of the sheet, and one line per problem (naming the dataset, sheet line and fix)."""
    if not os.path.isfile(path):
        raise InputProblems([str(MetastemError("dataset sheet not found", file=path,
                                               fix="set config key 'datasets' to an existing TSV file"))])
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    except Exception as exc:  # pandas raises many types for malformed text
        raise InputProblems([str(MetastemError(f"dataset sheet does not parse as TSV ({type(exc).__name__}: "
                                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})",
                                               file=path, fix="use tab-separated columns with a header line"))]) from None
    df.columns = [str(c).strip() for c in df.columns]
    problems = []
    unknown = [c for c in df.columns if c not in SHEET_COLUMNS]
    if unknown:
        problems.append(f"unknown column(s) {unknown}; allowed: {SHEET_COLUMNS}")
    if len(set(df.columns)) != len(df.columns):
        problems.append("a column name appears twice")
    if "dataset" not in df.columns:
        problems.append("missing the 'dataset' column")
    if df.empty:
        problems.append("no datasets listed")
    if problems:
        raise InputProblems([str(MetastemError("; ".join(problems), file=path,
                                               fix="correct the sheet header (tab-separated; see workflow/schemas/datasets.schema.yaml)"))])
    rows, problems = [], []
    for i, rec in enumerate(df.to_dict("records"), start=2):
        rec = {k: v.strip() for k, v in rec.items()}
        ds = rec.get("dataset", "")
        where = f"{path} line {i}"
        lines = schema_problems(rec, schema)
        if lines:
            problems.append(_row_problem(ds, where, "; ".join(lines),
                                         "correct this row (ids: letters, digits, '_' and '-'; allowed values: "
                                         "workflow/schemas/datasets.schema.yaml)"))
            continue
        if ds.lower() in RESERVED_IDS:
            problems.append(_row_problem(ds, where, f"dataset id '{ds}' is reserved (it names a results folder)",
                                         "rename the dataset"))
            continue
        if not rec["format"] and rec["path"]:
            rec["format"] = infer_format(rec["path"])
        if not rec["format"]:
            problems.append(_row_problem(ds, where, f"cannot infer the format of '{rec['path']}'",
                                         "fill the 'format' column"))
            continue
        if rec["format"] in ("csv", "tsv") and not rec["orientation"]:
            problems.append(_row_problem(ds, where, f"{rec['format']} input needs the 'orientation' column",
                                         "set orientation to genes_x_cells or cells_x_genes"))
            continue
        if rec["format"] != "simulated" and not rec["path"]:
            problems.append(_row_problem(ds, where, "empty 'path'", "give the input file or 10x folder"))
            continue
        if rec["format"] == "simulated":
            rec["path"] = ""
        rec["_line"] = i
        rows.append(rec)
    keep, more = _group_samples(rows, path)
    problems += more
    sheet = pd.DataFrame(keep, columns=SHEET_COLUMNS + ["samples"]).set_index("dataset", drop=False)
    sheet.index.name = None
    return sheet, problems


def _sample_entry(rec: dict) -> dict:
    return {k: rec.get(k, "") for k in SAMPLE_FIELDS}


def _group_samples(rows: list[dict], path: str) -> tuple[list[dict], list[str]]:
    """One record per dataset, with ``samples``: a list of {sample, path, format, orientation, patient,
    condition, site} (one per sheet row). Rows sharing an id are samples of one dataset when every one
    names a distinct ``sample``; they must then agree on every dataset-level column. One line per problem.
    """
    groups: dict[str, list[dict]] = {}
    for rec in rows:  # case-insensitive: file systems that ignore case would merge 'A' and 'a'
        groups.setdefault(rec["dataset"].lower(), []).append(rec)
    keep, problems = [], []
    for recs in groups.values():
        first, ds = recs[0], recs[0]["dataset"]
        where = f"{path} line {first['_line']}"
        if len(recs) == 1:
            if first.get("sample_key") and first.get("sample"):
                problems.append(_row_problem(ds, where, "both 'sample' and 'sample_key' are filled",
                                             "leave 'sample' empty when 'sample_key' names the obs column of samples"))
                continue
            keep.append({**first, "samples": [_sample_entry(first)]})
            continue
        lines = ", ".join(str(r["_line"]) for r in recs)
        bad = []
        unnamed = [r["_line"] for r in recs if not r.get("sample")]
        if unnamed:
            bad.append((f"duplicate dataset id (lines {lines}; ids differing only in case count as equal) and "
                        f"line(s) {', '.join(map(str, unnamed))} name no 'sample'",
                        "give every dataset a unique id, or fill the 'sample' column of each row to combine "
                        "the rows as samples of one dataset"))
            problems += [_row_problem(ds, where, problem, fix) for problem, fix in bad]
            continue
        names = [r.get("sample", "").lower() for r in recs if r.get("sample")]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            bad.append((f"sample(s) {', '.join(map(repr, dup))} appear twice among the rows of this dataset "
                        f"(lines {lines}; case is ignored)", "give every row of a dataset a distinct sample"))
        if any(r.get("sample_key") for r in recs):
            bad.append(("'sample_key' is filled on a dataset of several rows", "use either one row per sample "
                        "(the 'sample' column) or one input with a 'sample_key' obs column, not both"))
        if any(r["format"] == "simulated" for r in recs):
            bad.append(("a simulated dataset has several rows", "keep one row per simulated dataset"))
        shared = [c for c in first if c not in SAMPLE_FIELDS and not c.startswith("_")]
        for col in shared:
            values = {r.get(col, "") for r in recs}
            if len(values) > 1:
                seen = ", ".join(f"line {r['_line']}: {r.get(col) or 'empty'}" for r in recs)
                bad.append((f"its rows disagree on '{col}' ({seen})",
                            f"write the same '{col}' on every row of the dataset (it applies to all its samples)"))
        if bad:
            problems += [_row_problem(ds, where, problem, fix) for problem, fix in bad]
            continue
        keep.append({**first, "samples": [_sample_entry(r) for r in recs]})
    return keep, problems


def read_sheet(path: str | os.PathLike, schema: dict) -> pd.DataFrame:
    """Read and validate the dataset sheet; raises ``InputProblems`` with one line per bad row."""
    sheet, problems = _read_sheet(str(path), schema)
    if problems:
        raise InputProblems(problems)
    return sheet


def check_workflow(config: dict, config_schema: dict, sheet_schema: dict
                   ) -> tuple[str, pd.DataFrame, dict[str, dict], list[str]]:
    """Everything checkable before any job runs, for all datasets at once.

    Config against its schema (defaults filled in place) and outdir first: problems there raise
    ``InputProblems``/``MetastemError`` at once (nothing else can be resolved). Then every sheet row,
    every row's params overrides and every input (exists, readable, not empty, format as declared,
    cheap content checks). Returns ``(outdir, sheet of the valid rows, {dataset: params}, problems)``
    with one self-contained line per problem (dataset, file, problem, 'Fix:').
    """
    validate_config(config, config_schema)
    outdir = safe_outdir(config["outdir"]).rstrip("/") or "."
    sheet, problems = _read_sheet(str(config["datasets"]), sheet_schema)
    params: dict[str, dict] = {}
    for ds, rec in sheet.iterrows():
        try:
            params[ds] = dataset_params(config, rec.to_dict(), config_schema,
                                        where=f"{config['datasets']}, params column")
        except MetastemError as err:
            problems.append(str(err))
    problems += check_inputs(sheet)
    return outdir, sheet, params, problems


def validate_workflow(config: dict, config_schema: dict, sheet_schema: dict
                      ) -> tuple[str, pd.DataFrame, dict[str, dict]]:
    """``check_workflow`` that raises ``InputProblems`` (one line per problem) if there is any."""
    outdir, sheet, params, problems = check_workflow(config, config_schema, sheet_schema)
    if problems:
        raise InputProblems(problems)
    return outdir, sheet, params


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


_TENX_FILES = {"matrix.mtx": ("matrix.mtx",), "barcodes.tsv": ("barcodes.tsv",),
               "features.tsv": ("features.tsv", "genes.tsv")}


def _first_lines(path: str, n: int = 2) -> list[str]:
    import gzip

    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    lines = []
    with opener(path, "rt", errors="replace") as fh:
        for line in fh:
            if line.strip():
                lines.append(line)
            if len(lines) >= n:
                break
    return lines


def _content_problem(path: str, fmt: str) -> tuple[str, str] | None:
    """Cheap checks of content without loading the matrix: (problem, fix) or None."""
    if fmt == "10x_mtx":
        missing, empty = [], []
        for name, stems in _TENX_FILES.items():
            found = [os.path.join(path, f"{st}{gz}") for st in stems for gz in ("", ".gz")
                     if os.path.isfile(os.path.join(path, f"{st}{gz}"))]
            if not found:
                missing.append(name)
            elif os.path.getsize(found[0]) == 0:
                empty.append(os.path.basename(found[0]))
        if missing:
            return (f"10x directory is missing {' and '.join(missing)} (.gz or not)",
                    "point 'path' at the Cell Ranger filtered_feature_bc_matrix folder with all three files")
        if empty:
            return f"10x directory has empty file(s) {', '.join(empty)}", "re-export the Cell Ranger matrix folder"
    elif fmt in ("csv", "tsv"):
        lines = _first_lines(path)
        if len(lines) < 2:
            return ("text matrix has a header but no data rows" if lines else "text matrix is empty",
                    "export the full matrix, not just its header")
    elif fmt in ("h5ad", "10x_h5"):
        import h5py

        with h5py.File(path, "r") as f:
            shape = None
            if fmt == "h5ad" and "X" in f:
                X = f["X"]
                shape = tuple(X.attrs["shape"]) if "shape" in X.attrs else getattr(X, "shape", None)
            elif fmt == "10x_h5":
                grp = f["matrix"] if "matrix" in f else next((f[k] for k in f if isinstance(f[k], h5py.Group)), None)
                if grp is not None and "shape" in grp:
                    shape = tuple(grp["shape"][()])[::-1]
            if shape is not None and len(shape) == 2 and 0 in shape:
                return (f"matrix has {shape[0]} cells and {shape[1]} genes",
                        "check the export; the file holds no data")
    return None


def _sample_records(sheet: pd.DataFrame) -> list[dict]:
    """One record per input file: each sample of each dataset (a sheet without 'samples' as it is)."""
    out = []
    for rec in sheet.to_dict("records"):
        samples = rec.get("samples")
        out += [{**rec, **s} for s in samples] if isinstance(samples, list) and samples else [rec]
    return out


def check_inputs(sheet: pd.DataFrame) -> list[str]:
    """Problems with the inputs of every dataset at once: missing, unreadable, empty, wrong format,
    incomplete 10x folder, header-only text, zero-sized matrix. One line per dataset."""
    problems = []
    for rec in _sample_records(sheet):
        ds, path, fmt = rec["dataset"], rec["path"], rec["format"]
        if fmt == "simulated":
            continue
        where = f"dataset '{ds}': {path}"
        if not os.path.exists(path):
            problems.append(f"{where}: file not found. Fix: correct the 'path' column (relative to {os.getcwd()}).")
            continue
        if not os.access(path, os.R_OK) or (os.path.isdir(path) and not os.access(path, os.X_OK)):
            problems.append(f"{where}: not readable. Fix: check the file permissions.")
            continue
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            problems.append(f"{where}: file is empty. Fix: re-export or re-download it.")
            continue
        try:
            sniffed = sniff_format(path)
        except OSError as exc:
            problems.append(f"{where}: cannot be read ({exc.strerror or exc}). Fix: check the file and its permissions.")
            continue
        expected = {"h5ad": {"h5ad"}, "10x_h5": {"10x_h5"}, "loom": {"loom"}, "csv": {"text"},
                    "tsv": {"text"}, "10x_mtx": {"10x_mtx"}}[fmt]
        if sniffed == "corrupt_hdf5":
            problems.append(f"{where}: HDF5 file is truncated or corrupt. Fix: re-export or re-download it.")
            continue
        if sniffed not in expected:
            problems.append(f"{where}: declared format '{fmt}' but the file looks like '{sniffed or 'unknown binary'}'. "
                            "Fix: correct the 'format' column or the path.")
            continue
        try:
            found = _content_problem(path, fmt)
        except Exception as exc:  # unreadable in a way the sniffing did not see
            found = (f"cannot be read ({type(exc).__name__})", "re-export or re-download it")
        if found:
            problems.append(str(MetastemError(found[0], dataset=ds, file=path, fix=found[1])))
    return problems


def safe_outdir(outdir: str) -> str:
    """Refuse output folders that climb out of the working tree with '..', are empty, or hold
    characters Snakemake would read as wildcards."""
    if not str(outdir).strip():
        raise MetastemError("outdir is empty", file="config", fix="set outdir to a folder name, e.g. results")
    if ".." in Path(outdir).parts:
        raise MetastemError(f"outdir '{outdir}' contains '..'", file="config",
                            fix="use a folder inside the working directory or an absolute path")
    if re.search(r"[{}\n\r\t]", outdir):
        raise MetastemError(f"outdir '{outdir}' contains braces or control characters", file="config",
                            fix="use a plain folder name")
    return outdir

