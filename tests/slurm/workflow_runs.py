"""Helpers shared by tests/test_slurm.py and tests/test_module.py: run snakemake, compare two result trees.

Outputs are compared generically (every file below the outdir, whatever `rule all` targets), so new stages
are covered without touching the tests:
- `.h5ad`: obs names, var names, shape and the whole obs frame (pandas, float tolerance), obsm/layers keys
- tables (`.tsv`, `.csv`, gzipped or not): pandas frames equal (float tolerance)
- `.json`: same structure and values (float tolerance; timing keys ignored)
- anything else (figures, HTML, ...): present in both and non-empty
`logs/` and `benchmarks/` are not results and are skipped. Paths inside values are normalised
(outdir -> <OUT>, metastem repo -> relative) so runs from different directories compare equal.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
_VENV_SNAKEMAKE = Path(sys.executable).parent / "snakemake"
SNAKEMAKE = [str(_VENV_SNAKEMAKE)] if _VENV_SNAKEMAKE.exists() else [sys.executable, "-m", "snakemake"]
SKIP_TOP = {"logs", "benchmarks"}
TABLE_SUFFIXES = (".tsv", ".tsv.gz", ".csv", ".csv.gz")
VOLATILE_KEY = re.compile(r"(time|elapsed|duration|seconds|date|host|version|checksum_of_run)", re.I)
RTOL, ATOL = 1e-5, 1e-8

# the small demo every end-to-end test runs: seconds per stage on 2 cores
SMALL = {"n_cells": 600, "n_genes": 2000}
SHEET_HEADER = "dataset\tpath\tformat\torientation\tspecies\tvalues\tlabels\tparams\n"


def env() -> dict:
    """The environment for snakemake subprocesses (numba/matplotlib caches as `make` sets them)."""
    e = dict(os.environ)
    e.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
    e.setdefault("MPLCONFIGDIR", str(REPO / ".cache" / "matplotlib"))
    return e


def write_small_config(folder: Path, outdir: Path | str, dataset: str = "demo") -> Path:
    """A one-dataset sheet (simulated tumour) and a config using it; returns the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    sheet = folder / "datasets.tsv"
    sheet.write_text(SHEET_HEADER + f"{dataset}\t\tsimulated\t\thuman\tcounts\ttrue_state\t\n")
    cfg = folder / "config.yaml"
    cfg.write_text(
        f"datasets: {sheet}\noutdir: {outdir}\nseed: 0\n"
        f"simulate:\n  n_cells: {SMALL['n_cells']}\n  n_genes: {SMALL['n_genes']}\n"
    )
    return cfg


class Run:
    def __init__(self, rc: int, wall: float, log: Path):
        self.rc, self.wall, self.log = rc, wall, log
        self.text = log.read_text(errors="replace")

    def tail(self, n: int = 80) -> str:
        return "\n".join(self.text.splitlines()[-n:])

    def job_stats(self) -> dict[str, int]:
        """The 'Job stats' table snakemake prints before running: rule -> number of jobs."""
        m = re.search(r"Job stats:\n.*?\n-+ +-+\n(.*?)\ntotal", self.text, re.S)
        assert m, f"no 'Job stats' table in {self.log}:\n{self.tail()}"
        return {name: int(n) for name, n in (ln.split() for ln in m.group(1).splitlines() if ln.strip())}


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies (`timeout` runs in its own process group,
    so a CI runner killing pytest's group would otherwise leave snakemake polling SLURM forever)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_snakemake(args: list[str], *, cwd: Path, log: Path, timeout: int, check: bool = True) -> Run:
    """snakemake under `timeout -k 30` (the SLURM executor's failure mode is a silent hang)."""
    cmd = ["timeout", "-k", "30", str(timeout), *SNAKEMAKE, *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + f"\n# cwd: {cwd}\n")
        fh.flush()
        rc = subprocess.call(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env(),
                             preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    run = Run(rc, time.monotonic() - t0, log)
    if check:
        hint = " (killed by timeout: the run hung)" if rc in (124, 137) else ""
        assert rc == 0, f"snakemake exited {rc}{hint}; log {log}:\n{run.tail()}"
    return run


# ---- a local reference run, shared by the tests of one session ----------------------------------

_REFERENCE: dict[str, tuple[Path, Run]] = {}


def local_reference(root: Path) -> tuple[Path, Run]:
    """The small demo run locally (`--profile profiles/local`, 2 cores) once per session: (outdir, run)."""
    if "demo" not in _REFERENCE:
        outdir = root / "results"
        cfg = write_small_config(root, outdir)
        run = run_snakemake(
            ["--profile", str(REPO / "profiles" / "local"), "--cores", "2", "--configfile", str(cfg)],
            cwd=REPO, log=root / "snakemake.log", timeout=1200,
        )
        _REFERENCE["demo"] = (outdir, run)
    return _REFERENCE["demo"]


# ---- comparing two result trees ---------------------------------------------------------------

def result_files(outdir: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(outdir.rglob("*")):
        rel = p.relative_to(outdir)
        if p.is_file() and rel.parts[0] not in SKIP_TOP and not p.name.startswith("."):
            out[rel.as_posix()] = p
    return out


class _Norm:
    """Makes strings from two runs comparable: outdirs, dataset names and the repo path are neutralised."""

    def __init__(self, outdirs: list[str], rename: dict[str, str]):
        self.subs = [(o.rstrip("/"), "<OUT>") for o in sorted(set(outdirs), key=len, reverse=True) if o]
        self.subs.append((str(REPO) + "/", ""))
        self.rename = rename

    def __call__(self, s: str) -> str:
        for a, b in self.subs:
            s = s.replace(a, b)
        for a, b in self.rename.items():
            s = re.sub(rf"\b{re.escape(a)}\b", b, s)
        return s


def _same(a, b, norm: _Norm, where: str, problems: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            problems.append(f"{where}: keys differ: {sorted(set(a) ^ set(b))}")
        for k in set(a) & set(b):
            if not VOLATILE_KEY.search(str(k)):
                _same(a[k], b[k], norm, f"{where}.{k}", problems)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            problems.append(f"{where}: lengths {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, norm, f"{where}[{i}]", problems)
    elif isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        if a != b:
            problems.append(f"{where}: {a!r} != {b!r}")
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if not (math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL) or (math.isnan(a) and math.isnan(b))):
            problems.append(f"{where}: {a!r} != {b!r}")
    elif isinstance(a, str) and isinstance(b, str):
        if norm(a) != norm(b):
            problems.append(f"{where}: {a!r} != {b!r}")
    elif a != b:
        problems.append(f"{where}: {a!r} != {b!r}")


def _norm_frame(df: pd.DataFrame, norm: _Norm) -> pd.DataFrame:
    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].map(lambda v: norm(v) if isinstance(v, str) else v)
    if df.index.dtype == object:
        df.index = df.index.map(lambda v: norm(v) if isinstance(v, str) else v)
    df.columns = [norm(c) if isinstance(c, str) else c for c in df.columns]
    return df


def _frames(a: pd.DataFrame, b: pd.DataFrame, where: str, problems: list[str]) -> None:
    try:
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=RTOL, atol=ATOL, check_like=False)
    except AssertionError as err:
        problems.append(f"{where}: {str(err).strip()[:600]}")


def _read_table(p: Path) -> pd.DataFrame:
    sep = "," if ".csv" in p.name else "\t"
    return pd.read_csv(p, sep=sep, keep_default_na=True)


def _compare_h5ad(pa: Path, pb: Path, norm: _Norm, rel: str, problems: list[str]) -> None:
    import anndata as ad

    a, b = ad.read_h5ad(pa, backed="r"), ad.read_h5ad(pb, backed="r")
    try:
        if a.shape != b.shape:
            problems.append(f"{rel}: shape {a.shape} != {b.shape}")
            return
        if list(a.obs_names) != list(b.obs_names) or list(a.var_names) != list(b.var_names):
            problems.append(f"{rel}: obs_names/var_names differ")
        for slot in ("obsm", "layers", "obsp"):
            ka, kb = set(getattr(a, slot).keys()), set(getattr(b, slot).keys())
            if ka != kb:
                problems.append(f"{rel}: {slot} keys differ: {sorted(ka ^ kb)}")
        _frames(_norm_frame(a.obs, norm), _norm_frame(b.obs, norm), f"{rel} obs", problems)
    finally:
        a.file.close()
        b.file.close()


def compare_outputs(a_dir: Path, b_dir: Path, *, rename: dict[str, str] | None = None,
                    outdirs: list[str] | None = None) -> list[str]:
    """Every result file of run A against run B; returns the problems (empty = equivalent).

    `rename` maps dataset ids of A to those of B (e.g. a module consumer's own sheet).
    `outdirs` are the outdir spellings used by the two runs (for normalising paths inside values).
    """
    rename = rename or {}
    norm = _Norm([str(a_dir), str(b_dir), *(outdirs or [])], rename)
    fa, fb = result_files(a_dir), result_files(b_dir)
    mapped = {norm(k): v for k, v in fa.items()}
    problems = []
    if set(mapped) != set(fb):
        problems.append(f"file sets differ: only in A {sorted(set(mapped) - set(fb))}, "
                        f"only in B {sorted(set(fb) - set(mapped))}")
    if not fb:
        problems.append(f"no result files below {b_dir}")
    for rel in sorted(set(mapped) & set(fb)):
        pa, pb = mapped[rel], fb[rel]
        try:
            if pa.stat().st_size == 0 or pb.stat().st_size == 0:
                problems.append(f"{rel}: empty file")
            elif rel.endswith(".h5ad"):
                _compare_h5ad(pa, pb, norm, rel, problems)
            elif rel.endswith(TABLE_SUFFIXES):
                _frames(_norm_frame(_read_table(pa), norm), _norm_frame(_read_table(pb), norm), rel, problems)
            elif rel.endswith((".json", ".json.gz")):
                opener = gzip.open if rel.endswith(".gz") else open
                with opener(pa, "rt") as fh1, opener(pb, "rt") as fh2:
                    _same(json.load(fh1), json.load(fh2), norm, rel, problems)
        except Exception as exc:  # an unreadable output is a finding, not a crash of the comparison
            problems.append(f"{rel}: could not compare ({type(exc).__name__}: {exc})")
    return problems


def compared_kinds(outdir: Path) -> dict[str, int]:
    """How many files of each kind a comparison covered (for the test's report)."""
    kinds: dict[str, int] = {}
    for rel in result_files(outdir):
        k = ("h5ad" if rel.endswith(".h5ad") else "table" if rel.endswith(TABLE_SUFFIXES)
             else "json" if ".json" in rel else "other")
        kinds[k] = kinds.get(k, 0) + 1
    return kinds


def which(tool: str) -> bool:
    return shutil.which(tool) is not None
