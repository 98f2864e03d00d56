"""Smoke test of the scaling harness (benchmarks/run.py): tiny sizes, no timing assertions.

Runs the real harness end to end on two small simulated datasets: simulation to cached h5ad, the
pipeline's QC rule through Snakemake (``--until qc``), the plain scanpy script up to its filtering
step, then checks the printed per-rule table and the TSVs it writes. About a minute on 2 cores.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--sizes", "400,800", "--genes", "2000",
           "--out", str(out), "--until", "qc", "--plain-stop-after", "filter_genes", "--timeout", "600"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"harness failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout


def test_prints_the_per_rule_table(bench_run):
    _, stdout = bench_run
    headers = [line.split() for line in stdout.splitlines() if line.split()[:1] == ["rule"]]
    assert len(headers) == 2, stdout  # one table per size
    assert headers[0][:4] == ["rule", "wall_s", "cpu_s", "max_rss_mb"]
    assert "job_peak_rss_mb" in headers[0]
    table_rows = [line.split() for line in stdout.splitlines()
                  if line.split()[:1] == ["qc"] and len(line.split()) == len(headers[0])]
    assert len(table_rows) == 2, stdout  # one qc row per size
    assert "end-to-end wall" in stdout and "largest peak RSS" in stdout
    assert "ratio pipeline/script" in stdout
    assert "log-log slope vs cells" in stdout


def test_writes_tsvs_with_expected_columns(bench_run):
    from run import PLAIN_COLUMNS, RULE_COLUMNS, RUN_COLUMNS, SIM_COLUMNS, SLOPE_COLUMNS

    out, _ = bench_run
    expected = {"rules.tsv": RULE_COLUMNS, "runs.tsv": RUN_COLUMNS, "plain_steps.tsv": PLAIN_COLUMNS,
                "simulate.tsv": SIM_COLUMNS, "slopes.tsv": SLOPE_COLUMNS}
    for name, cols in expected.items():
        with open(out / name) as fh:
            assert fh.readline().rstrip("\n").split("\t") == cols, name
    for col in ("cells", "rule", "wall_s", "cpu_s", "max_rss_mb"):
        assert col in RULE_COLUMNS

    rules = read_tsv(out / "rules.tsv")
    assert [r["rule"] for r in rules] == ["qc", "qc"]
    assert sorted(int(r["cells"]) for r in rules) == [420, 840]  # 5% doublets added by the simulator
    for r in rules:
        assert float(r["wall_s"]) > 0 and float(r["max_rss_mb"]) > 0
        assert float(r["job_peak_rss_mb"]) > 0  # the exact per-process probe worked

    runs = read_tsv(out / "runs.tsv")
    assert [r["status"] for r in runs] == ["ok", "ok"]
    assert all(r["plain_status"] == "ok" for r in runs)
    steps = read_tsv(out / "plain_steps.tsv")
    assert {s["step"] for s in steps} >= {"read", "qc_metrics", "mad_filter", "scrublet", "filter_genes"}

    slopes = read_tsv(out / "slopes.tsv")
    assert {(s["series"], s["metric"]) for s in slopes} >= {("qc", "wall_s"), ("qc", "peak_rss_mb")}
    assert (out / "scaling.png").stat().st_size > 0
    # the simulated inputs are cached by size for the next invocation
    assert len(list((out / "data").glob("*.h5ad"))) == 2
