"""Config and sheet validation: every bad value named in one line with a fix, all datasets at once."""
from __future__ import annotations

import copy
import os

import h5py
import numpy as np
import pytest
import yaml

from metastem.smk.config import (InputProblems, check_inputs, dataset_params, load_schema, parse_overrides, read_sheet,
                             safe_outdir, validate_config, validate_with_defaults, validate_workflow)
from metastem.errors import MetastemError

HEADER = "dataset\tpath\tformat\torientation\tspecies\tvalues\tlabels\tparams\n"


@pytest.fixture(scope="module")
def schemas(repo):
    return (load_schema(repo / "workflow/schemas/config.schema.yaml"),
            load_schema(repo / "workflow/schemas/datasets.schema.yaml"))


def sheet_file(tmp_path, *rows: str, header: str = HEADER):
    p = tmp_path / "sheet.tsv"
    p.write_text(header + "".join(r + "\n" for r in rows))
    return p


def test_defaults_fill_everything(schemas):
    cfg = validate_config({}, schemas[0])
    assert cfg["outdir"] == "results" and cfg["seed"] == 0 and cfg["cluster"]["resolution"] == 1.0
    assert cfg["qc"]["min_cells"] == 50 and cfg["simulate"]["n_cells"] == 3000


@pytest.mark.parametrize("cfg, words", [
    ({"sed": 1}, "'sed' was unexpected"),                                  # unknown key
    ({"qc": {"max_pct_mt": 10}}, "'max_pct_mt' was unexpected"),            # unknown nested key
    ({"seed": "zero"}, "seed: 'zero' is not of type 'integer'"),           # wrong type
    ({"seed": 1.5}, "seed: 1.5 is not of type 'integer'"),
    ({"cluster": {"resolution": -1}}, "cluster.resolution: -1 is less than or equal to the minimum of 0"),
    ({"qc": {"max_pct_mito": 150}}, "qc.max_pct_mito: 150 is greater than the maximum of 100"),
    ({"cluster": {"resolution": float("nan")}}, "cluster.resolution: nan is not a finite number"),
    ({"stemness": {"method": "magic"}}, "stemness.method: 'magic' is not one of 'consensus', 'cytotrace'"),
    ({"qc": {"doublets": "yes"}}, "qc.doublets: 'yes' is not of type 'boolean'"),
])
def test_bad_config_values(schemas, cfg, words):
    with pytest.raises(InputProblems) as err:
        validate_config(copy.deepcopy(cfg), schemas[0])
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and words in lines[0] and "Fix:" in lines[0] and lines[0].startswith("config: ")


def test_every_bad_config_key_reported_once(schemas):
    with pytest.raises(InputProblems) as err:
        validate_config({"seed": -1, "foo": 1, "qc": {"min_cells": 2}}, schemas[0])
    assert len(err.value.problems) == 3


def test_sheet_good_rows_and_inferred_format(tmp_path, schemas):
    p = sheet_file(tmp_path, "a\tx.h5ad\t\t\thuman\tcounts\t\t", "b\tdir\t10x_mtx\t\tmouse\tcounts\t\t",
                   "c\t\tsimulated\t\thuman\tcounts\ttrue_state\t")
    sheet = read_sheet(p, schemas[1])
    assert list(sheet.index) == ["a", "b", "c"]
    assert sheet.loc["a", "format"] == "h5ad" and sheet.loc["b", "species"] == "mouse"


def test_sheet_may_omit_optional_columns(tmp_path, schemas):
    sheet = read_sheet(sheet_file(tmp_path, "a\tsimulated", header="dataset\tformat\n"), schemas[1])
    assert sheet.loc["a", "species"] == "human" and sheet.loc["a", "values"] == "counts"


@pytest.mark.parametrize("line, words", [
    ("bad id\t\tsimulated\t\thuman\tcounts\t\t", "does not match"),             # bad id characters
    ("../up\t\tsimulated\t\thuman\tcounts\t\t", "does not match"),              # path traversal in id
    ("a\t\tsimulated\t\tzebrafish\tcounts\t\t", "'zebrafish' is not one of"),   # bad species
    ("a\t\tsimulated\t\thuman\traw\t\t", "'raw' is not one of"),               # bad values
    ("a\tx.csv\t\t\thuman\tcounts\t\t", "needs the 'orientation' column"),
    ("a\tx.weird\t\t\thuman\tcounts\t\t", "cannot infer the format"),
    ("a\t\th5ad\t\thuman\tcounts\t\t", "empty 'path'"),
    ("logs\t\tsimulated\t\thuman\tcounts\t\t", "reserved"),
    (f"{'x' * 65}\t\tsimulated\t\thuman\tcounts\t\t", "is too long"),
])
def test_bad_sheet_rows(tmp_path, schemas, line, words):
    with pytest.raises(InputProblems) as err:
        read_sheet(sheet_file(tmp_path, line), schemas[1])
    (msg,) = err.value.problems
    assert words in msg and "line 2" in msg and "Fix:" in msg and f"dataset '{line.split(chr(9))[0]}'" in msg


def test_duplicate_ids_including_case(tmp_path, schemas):
    p = sheet_file(tmp_path, "a\t\tsimulated\t\thuman\tcounts\t\t", "A\t\tsimulated\t\thuman\tcounts\t\t",
                   "b\t\tsimulated\t\thuman\tcounts\t\t", "b\t\tsimulated\t\thuman\tcounts\t\t")
    with pytest.raises(InputProblems) as err:
        read_sheet(p, schemas[1])
    assert len(err.value.problems) == 2
    assert all("duplicate dataset id" in m for m in err.value.problems)


@pytest.mark.parametrize("header, words", [
    ("dataset\tpath\tformt\n", "unknown column(s) ['formt']"),
    ("id\tpath\n", "missing the 'dataset' column"),
])
def test_bad_sheet_header(tmp_path, schemas, header, words):
    with pytest.raises(InputProblems, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        read_sheet(sheet_file(tmp_path, "a\tb", header=header), schemas[1])


def test_missing_or_empty_sheet(tmp_path, schemas):
    with pytest.raises(MetastemError, match="dataset sheet not found"):
        read_sheet(tmp_path / "none.tsv", schemas[1])
    with pytest.raises(MetastemError, match="no datasets listed"):
        read_sheet(sheet_file(tmp_path), schemas[1])


@pytest.mark.parametrize("text, words", [
    ("cluster.resolution=abc", "cluster.resolution: 'abc' is not of type 'number'"),
    ("cluster.resolution=-2", "less than or equal to the minimum"),
    ("cluster.resolutoin=1", "'resolutoin' was unexpected"),
    ("seed=3", "cannot be overridden per dataset"),
    ("cluster.resolution", "is not key=value"),
    ("cluster.resolution=1;cluster.resolution=2", "given twice"),
    ("qc.max_pct_mito=[1", "does not parse"),
    ("cluster.resolution=.nan", "not a finite number"),
])
def test_bad_params_overrides(schemas, defaults, text, words):
    row = {"dataset": "d1", "params": text}
    with pytest.raises(MetastemError, match=None) as err:
        dataset_params(copy.deepcopy(defaults), row, schemas[0])
    assert words in str(err.value) and "dataset 'd1'" in str(err.value) and "Fix:" in str(err.value)


def test_params_overrides_are_typed(schemas, defaults):
    p = dataset_params(copy.deepcopy(defaults), {"dataset": "d", "params": " cluster.resolution = 1e-1 ; "
                                                 "qc.max_pct_hb=null;qc.doublets=false;qc.min_cells=12"}, schemas[0])
    assert p["cluster"]["resolution"] == 0.1 and p["qc"]["max_pct_hb"] is None
    assert p["qc"]["doublets"] is False and p["qc"]["min_cells"] == 12
    assert p["cluster"]["n_pcs"] == defaults["cluster"]["n_pcs"] and p["seed"] == defaults["seed"]


def test_yaml_is_read_with_a_safe_loader(tmp_path):
    """No YAML tag can run code: not in schemas/config files nor in the params column."""
    evil = "!!python/object/apply:os.system ['touch pwned']"
    p = tmp_path / "evil.yaml"
    p.write_text(f"a: {evil}\n")
    with pytest.raises(yaml.YAMLError):
        load_schema(p)
    with pytest.raises(MetastemError, match="does not parse"):
        parse_overrides(f"qc.min_cells={evil}")
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


@pytest.mark.parametrize("outdir", ["../out", "results/../../x", "a/..", "", "res{dataset}"])
def test_outdir_cannot_escape(outdir):
    with pytest.raises(MetastemError, match="Fix:"):
        safe_outdir(outdir)


@pytest.mark.parametrize("outdir", ["results", "/abs/path/results", "a/b", "./results"])
def test_outdir_ok(outdir):
    assert safe_outdir(outdir) == outdir


# ----------------------------------------------------------------------------------------- inputs
def _sheet_for(tmp_path, schemas, entries):
    rows = [f"{ds}\t{path}\t{fmt}\t{'genes_x_cells' if fmt in ('csv', 'tsv') else ''}\thuman\tcounts\t\t"
            for ds, path, fmt in entries]
    return read_sheet(sheet_file(tmp_path, *rows), schemas[1])


def test_check_inputs_reports_every_dataset_once(tmp_path, schemas, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.h5ad").write_bytes(b"")
    (tmp_path / "text.h5ad").write_text("gene,c1\nA,1\n")
    (tmp_path / "head.csv").write_text("gene,c1,c2\n")
    (tmp_path / "trunc.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    d = tmp_path / "tenx"
    d.mkdir()
    (d / "matrix.mtx.gz").write_bytes(b"x")
    (d / "features.tsv.gz").write_bytes(b"x")
    with h5py.File(tmp_path / "zero.h5ad", "w") as f:
        f.create_dataset("X", data=np.zeros((0, 5), dtype=np.float32))
        f.create_group("obs"), f.create_group("var")
    (tmp_path / "ok.csv").write_text("gene,c1\nA,1\n")
    sheet = _sheet_for(tmp_path, schemas, [
        ("missing", "nope.h5ad", "h5ad"), ("empty", "empty.h5ad", "h5ad"), ("mismatch", "text.h5ad", "h5ad"),
        ("header", "head.csv", "csv"), ("trunc", "trunc.h5ad", "h5ad"), ("tenx", "tenx", "10x_mtx"),
        ("zero", "zero.h5ad", "h5ad"), ("dirascsv", "tenx", "csv"), ("ok", "ok.csv", "csv"),
        ("sim", "", "simulated")])
    problems = check_inputs(sheet)
    expected = {"missing": "file not found", "empty": "file is empty", "mismatch": "looks like 'text'",
                "header": "header but no data", "trunc": "truncated or corrupt", "tenx": "missing barcodes.tsv",
                "zero": "0 cells and 5 genes", "dirascsv": "looks like '10x_mtx'"}
    assert len(problems) == len(expected)
    for ds, words in expected.items():
        (line,) = [p for p in problems if p.startswith(f"dataset '{ds}'")]
        assert words in line and "Fix:" in line and "\n" not in line


def test_unreadable_input(tmp_path, schemas, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.csv").write_text("gene,c1\nA,1\n")
    os.chmod(tmp_path / "x.csv", 0)
    import metastem.smk.config

    real = os.access  # root reads files whatever their mode: pretend to be an ordinary user
    monkeypatch.setattr(metastem.smk.config.os, "access", lambda p, mode: False if str(p).endswith("x.csv") else real(p, mode))
    (line,) = check_inputs(_sheet_for(tmp_path, schemas, [("a", "x.csv", "csv")]))
    assert "not readable" in line


def test_validate_workflow_collects_all_datasets(tmp_path, schemas, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sheet_file(tmp_path, "ok\t\tsimulated\t\thuman\tcounts\t\t", "gone\tnope.h5ad\th5ad\t\thuman\tcounts\t\t",
               "bad id\t\tsimulated\t\thuman\tcounts\t\t", "par\t\tsimulated\t\thuman\tcounts\t\tqc.min_cells=1")
    with pytest.raises(InputProblems) as err:
        validate_workflow({"datasets": "sheet.tsv"}, copy.deepcopy(schemas[0]), schemas[1])
    lines = err.value.problems
    assert len(lines) == 3
    for ds in ("gone", "bad id", "par"):
        assert sum(f"dataset '{ds}'" in line for line in lines) == 1
    assert all("Fix:" in line for line in lines)


def test_validate_workflow_ok(tmp_path, schemas, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sheet_file(tmp_path, "ok\t\tsimulated\t\thuman\tcounts\t\tcluster.resolution=0.5")
    outdir, sheet, params = validate_workflow({"datasets": "sheet.tsv", "outdir": "res/"}, {**schemas[0]}, schemas[1])
    assert outdir == "res" and list(sheet.index) == ["ok"] and params["ok"]["cluster"]["resolution"] == 0.5
    with pytest.raises(MetastemError, match="contains '..'"):
        validate_workflow({"datasets": "sheet.tsv", "outdir": "../x"}, schemas[0], schemas[1])


def test_validate_with_defaults_is_still_one_error(schemas):
    with pytest.raises(MetastemError, match="seed"):
        validate_with_defaults({"seed": -1}, schemas[0], where="x")


SAMPLE_HEADER = "dataset\tpath\tformat\tspecies\tvalues\tsample\tsample_key\tpatient\tsite\n"


def test_rows_sharing_an_id_are_samples(tmp_path, schemas):
    for name in ("p1", "p2"):
        (tmp_path / f"{name}.h5ad").write_bytes(b"")
    p = sheet_file(tmp_path, f"tum\t{tmp_path}/p1.h5ad\t\thuman\tcounts\tP1\t\tpat1\tprimary",
                   f"tum\t{tmp_path}/p2.h5ad\t\thuman\tcounts\tP2\t\tpat1\tmetastasis",
                   "solo\t\tsimulated\thuman\tcounts\t\t\t\t", header=SAMPLE_HEADER)
    sheet = read_sheet(p, schemas[1])
    assert list(sheet.index) == ["tum", "solo"]
    samples = sheet.loc["tum", "samples"]
    assert [s["sample"] for s in samples] == ["P1", "P2"] and [s["site"] for s in samples] == ["primary", "metastasis"]
    assert all(s["format"] == "h5ad" for s in samples) and samples[1]["path"].endswith("p2.h5ad")
    assert len(sheet.loc["solo", "samples"]) == 1
    # every sample's input is checked: both files are empty, one line each
    problems = check_inputs(sheet)
    assert len(problems) == 2 and all("file is empty" in m for m in problems)
    assert any("p1.h5ad" in m for m in problems) and any("p2.h5ad" in m for m in problems)


def test_every_sample_problem_reported_at_once(tmp_path, schemas):
    p = sheet_file(tmp_path,
                   "a\tx.h5ad\t\thuman\tcounts\tS1\t\t\t", "a\ty.h5ad\t\thuman\tcounts\t\t\t\t",         # unnamed row
                   "b\tx.h5ad\t\thuman\tcounts\tS1\t\t\t", "b\ty.h5ad\t\thuman\tcounts\ts1\t\t\t",        # same sample
                   "c\tx.h5ad\t\thuman\tcounts\tS1\t\t\t", "c\ty.h5ad\t\tmouse\tcounts\tS2\t\t\t",        # disagree
                   "d\tx.h5ad\t\thuman\tcounts\tS1\tdonor\t\t", "d\ty.h5ad\t\thuman\tcounts\tS2\tdonor\t\t",  # key + rows
                   "e\tx.h5ad\t\thuman\tcounts\tS1\tdonor\t\t",                                          # both
                   "f\tx.h5ad\t\thuman\tcounts\tbad name\t\t\t",                                         # bad id
                   "g\tx.h5ad\t\thuman\tcounts\t\t\t\tbrain",                                            # bad site
                   header=SAMPLE_HEADER)
    with pytest.raises(InputProblems) as err:
        read_sheet(p, schemas[1])
    lines = err.value.problems
    expect = {"a": "name no 'sample'", "b": "appear twice", "c": "disagree on 'species'",
              "d": "'sample_key' is filled on a dataset of several rows", "e": "both 'sample' and 'sample_key'",
              "f": "does not match", "g": "'brain' is not one of"}
    assert len(lines) == len(expect)
    for ds, words in expect.items():
        (line,) = [m for m in lines if f"dataset '{ds}'" in m]
        assert words in line and "Fix:" in line, line
