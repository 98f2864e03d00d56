"""The scaling harness (benchmarks/run.py), its tree generator and the per-step timing lines.

Fast unit tests: ``metastem._timing`` (the line every rule logs per step and the harness parses), the
independent tree generator (stored values per cell, real symbols, a branching tree whose states are
recoverable from the counts), the log parser. The smoke test of the whole harness (marked ``slow``)
runs it end to end on two tiny sizes with both generators: generation to cached h5ad, the pipeline's
QC rule through Snakemake (``--until qc``), the core scanpy script up to its filtering step, then
checks the printed tables and the TSVs it writes. No timing assertions anywhere.
"""
from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


# ------------------------------------------------------------------------------------ _timing

@pytest.fixture
def timing_on():
    from metastem import _timing

    _timing.enable()
    yield _timing
    _timing.enable(False)


def test_step_logs_one_parsable_line_per_step_when_enabled(timing_on, caplog):
    caplog.set_level(logging.INFO, logger="metastem.timing")
    with timing_on.step("pca"):
        junk = np.ones((2000, 2000))  # 32 MB: the peak RSS is at least this much
    del junk
    lines = [r.getMessage() for r in caplog.records if r.name == "metastem.timing"]
    assert len(lines) == 1
    m = timing_on.LINE.fullmatch(lines[0])
    assert m, lines[0]
    assert m["step"] == "pca"
    assert 0 <= float(m["wall_s"]) < 60
    assert float(m["peak_rss_gb"]) >= 0.03


def test_step_decorator_names_files_and_flags_failures(timing_on, caplog):
    caplog.set_level(logging.INFO, logger="metastem.timing")

    @timing_on.step("write {path}")
    def write(obj, path, fail=False):
        if fail:
            raise OSError("disk full")
        return obj

    assert write(3, "/some/dir/clustered.h5ad") == 3
    with pytest.raises(OSError):
        write(3, Path("/x/y/cells.tsv.gz"), fail=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "metastem.timing"]
    assert [timing_on.LINE.match(x)["step"] for x in lines] == ["write clustered.h5ad", "write cells.tsv.gz"]
    assert lines[1].endswith("(failed)") and not lines[0].endswith("(failed)")


def test_timed_wraps_one_call_as_a_step(timing_on, caplog):
    caplog.set_level(logging.INFO, logger="metastem.timing")
    assert timing_on.timed("sum", sum, [1, 2, 3], start=4) == 10
    assert timing_on.timed("kw", lambda **kw: kw, name="n", func="f") == {"name": "n", "func": "f"}  # no clash
    lines = [r.getMessage() for r in caplog.records if r.name == "metastem.timing"]
    assert [timing_on.LINE.match(x)["step"] for x in lines] == ["sum", "kw"]


def test_step_is_silent_unless_enabled(caplog):
    from metastem import _timing

    _timing.enable(False)
    caplog.set_level(logging.DEBUG, logger="metastem.timing")
    with _timing.step("read"):
        pass
    assert not [r for r in caplog.records if r.name == "metastem.timing"]
    age = _timing.process_age_s()
    assert age is None or age > 0


def test_every_rule_logs_its_start_up_steps_writes_and_peak(tmp_path, monkeypatch):
    """smk.run (every rule's wrapper) turns the lines on: start-up, each step, each write, the total."""
    from types import SimpleNamespace

    from metastem import _timing, io, smk
    from run import parse_step_lines

    monkeypatch.setattr(smk, "_set_threads", lambda n: None)  # keep this test process's thread pools
    job = SimpleNamespace(log=[str(tmp_path / "logs" / "x.log")], threads=1, rule="x",
                          wildcards=SimpleNamespace(dataset="d"))

    def main(_):
        with _timing.step("compute"):
            sum(range(1000))
        io.write_text_atomic("hello", tmp_path / "out" / "info.json")

    try:
        smk.run(job, main)
    finally:
        _timing.enable(False)
        logging.getLogger().handlers[0].close()
        logging.basicConfig(force=True)
    steps = [r["step"] for r in parse_step_lines(tmp_path / "logs" / "x.log")]
    assert steps[0].startswith("start-up") and steps[1:] == ["compute", "write info.json"]
    assert "done in" in (tmp_path / "logs" / "x.log").read_text().splitlines()[-1]
    assert "peak RSS" in (tmp_path / "logs" / "x.log").read_text().splitlines()[-1]


def test_harness_parses_the_step_lines_of_a_rule_log(tmp_path, timing_on):
    from run import parse_step_lines

    log = tmp_path / "qc.log"
    logging.basicConfig(filename=log, level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        logging.getLogger("metastem").info("rule qc, dataset x, threads 2")
        with timing_on.step("read input"):
            pass
        with timing_on.step("doublets (scrublet): 2 passes"):  # a name with ':' inside
            pass
    finally:
        logging.getLogger().handlers[0].close()
        logging.basicConfig(force=True)
    rows = parse_step_lines(log)
    assert [r["step"] for r in rows] == ["read input", "doublets (scrublet): 2 passes"]
    assert all(r["wall_s"] >= 0 and r["peak_rss_gb"] > 0 for r in rows)


# ----------------------------------------------------------------------------- tree generator

@pytest.fixture(scope="module")
def tree():
    from generators import tree_counts

    return tree_counts(1000, 2000, nnz_per_cell=600, seed=1)


def test_tree_generator_stores_the_asked_values_per_cell_with_real_symbols(tree):
    from metastem.simulate import human_gene_symbols

    X = tree.X
    assert X.format == "csr" and X.dtype == np.float32
    assert np.array_equal(X.data, np.round(X.data)) and X.data.min() >= 1  # counts
    per_cell = np.diff(X.indptr)
    assert abs(np.median(per_cell) - 600) < 0.1 * 600
    assert tree.var_names.is_unique
    assert set(tree.var_names) <= set(human_gene_symbols())  # 2,000 < 18,089: only shipped HGNC symbols


def test_tree_generator_builds_a_connected_branching_tree(tree):
    params = json.loads(tree.uns["generator"]["params_json"])
    edges = params["edges"]
    assert len(edges) == params["n_states"] - 1 == 7
    nodes = {n for e in edges for n in e}
    assert nodes == {f"S{i}" for i in range(8)}  # n-1 edges touching all n nodes: a tree
    degree = {n: sum(n in e for e in edges) for n in nodes}
    assert max(degree.values()) >= 3  # it branches
    assert set(tree.obs["edge"].astype(str)) == {f"{u}-{v}" for u, v in edges}  # cells on every edge
    t = tree.obs["edge_position"].to_numpy()
    assert 0 <= t.min() and t.max() <= 1


def test_tree_states_are_recoverable_from_the_counts(tree):
    """Nearest-centroid assignment on held-out cells: far above chance (1/8) if the states are real
    expression programmes, at chance if the generator's structure were noise."""
    X = tree.X.toarray()
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    state = tree.obs["true_state"].astype(str).to_numpy()
    idx = np.random.default_rng(0).permutation(tree.n_obs)
    train, test = idx[:500], idx[500:]
    names = sorted(set(state))
    cent = np.array([X[train][state[train] == s].mean(0) for s in names])
    z = lambda a: (a - a.mean(1, keepdims=True)) / a.std(1, keepdims=True)  # noqa: E731
    pred = np.array(names)[np.argmax(z(X[test]) @ z(cent).T, axis=1)]
    assert (pred == state[test]).mean() > 0.6
    # and cells halfway along an edge mix the two states: neither wins clearly
    mid = np.abs(tree.obs["edge_position"].to_numpy()[test] - 0.5) < 0.1
    far = np.abs(tree.obs["edge_position"].to_numpy()[test] - 0.5) > 0.4
    assert (pred == state[test])[far].mean() > (pred == state[test])[mid].mean()


def test_tree_generator_is_deterministic():
    from generators import tree_counts

    a, b = tree_counts(200, 500, nnz_per_cell=150, seed=3), tree_counts(200, 500, nnz_per_cell=150, seed=3)
    assert (a.X != b.X).nnz == 0 and list(a.var_names) == list(b.var_names)
    c = tree_counts(200, 500, nnz_per_cell=150, seed=4)
    assert list(c.var_names) != list(a.var_names) or (c.X != a.X).nnz > 0


# ---------------------------------------------------------------- measured performance changes

def test_qc_metrics_equal_scanpys_without_its_index_copy(tree):
    """metastem.qc.compute_qc_metrics (blocked, no int64 copy of X's indices) gives scanpy's columns."""
    import scanpy as sc

    from metastem import qc

    ours, theirs = tree.copy(), tree.copy()
    ours.X.data[:50] = 0  # stored zeros are not detected genes (scanpy eliminates them)
    theirs.X.data[:50] = 0
    theirs.var_names = list(theirs.var_names[:-3]) + ["MT-CO1", "RPL3", "HBB"]  # one flagged gene of each kind
    ours.var_names = theirs.var_names
    qc.compute_qc_metrics(ours, "human")
    for key, mask in qc.gene_flags(theirs.var_names, "human").items():
        theirs.var[key] = mask
    sc.pp.calculate_qc_metrics(theirs, qc_vars=["mt", "ribo", "hb"], percent_top=None, log1p=False, inplace=True)
    assert ours.var[["mt", "ribo", "hb"]].to_numpy().sum(0).min() >= 1
    for frame, ref in ((ours.obs, theirs.obs), (ours.var, theirs.var)):
        new = [c for c in ref.columns if c not in tree.obs.columns and c not in tree.var.columns]
        assert set(new) <= set(frame.columns)
        for c in new:
            np.testing.assert_allclose(frame[c].to_numpy(float), ref[c].to_numpy(float), rtol=1e-6, err_msg=c)


# ------------------------------------------------------------------------ the whole harness

@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--sizes", "400,800", "--genes", "2000",
           "--generator", "metastem,tree", "--nnz-per-cell", "600", "--plain", "core",
           "--out", str(out), "--until", "qc", "--plain-stop-after", "filter_genes", "--timeout", "600"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"harness failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout


@pytest.mark.slow
def test_prints_the_per_rule_table_and_steps(bench_run):
    _, stdout = bench_run
    lines = stdout.splitlines()
    headers = [line.split() for line in lines if line.split()[:1] == ["rule"]]
    assert len(headers) == 4, stdout  # one table per generator and size
    assert headers[0][:4] == ["rule", "wall_s", "cpu_s", "max_rss_mb"]
    assert "job_peak_rss_mb" in headers[0]
    table_rows = [line.split() for line in lines if line.split()[:1] == ["qc"] and len(line.split()) == len(headers[0])]
    assert len(table_rows) == 4, stdout
    assert sum(line.startswith("== [tree]") for line in lines) == 2
    step_lines = [line for line in lines if line.strip().startswith("qc ") and "write qc.h5ad" in line]
    assert len(step_lines) == 4, stdout  # every rule's step lines, printed per rule
    assert "end-to-end wall" in stdout and "largest peak RSS" in stdout
    assert "ratio pipeline/scanpy core" in stdout
    assert "log-log slope vs cells" in stdout


@pytest.mark.slow
def test_writes_tsvs_with_expected_columns(bench_run):
    from run import PLAIN_COLUMNS, RULE_COLUMNS, RUN_COLUMNS, SIM_COLUMNS, SLOPE_COLUMNS, STEP_COLUMNS

    out, _ = bench_run
    expected = {"rules.tsv": RULE_COLUMNS, "runs.tsv": RUN_COLUMNS, "plain_steps.tsv": PLAIN_COLUMNS,
                "simulate.tsv": SIM_COLUMNS, "slopes.tsv": SLOPE_COLUMNS, "rule_steps.tsv": STEP_COLUMNS}
    for name, cols in expected.items():
        with open(out / name) as fh:
            assert fh.readline().rstrip("\n").split("\t") == cols, name

    rules = read_tsv(out / "rules.tsv")
    assert [r["rule"] for r in rules] == ["qc"] * 4
    cells = {(r["generator"], int(r["cells"])) for r in rules}
    assert cells == {("metastem", 420), ("metastem", 840), ("tree", 400), ("tree", 800)}  # 5% doublets: metastem
    for r in rules:
        assert float(r["wall_s"]) > 0 and float(r["max_rss_mb"]) > 0
        assert float(r["job_peak_rss_mb"]) > 0  # the exact per-process probe worked

    steps = read_tsv(out / "rule_steps.tsv")
    for key in cells:
        names = [s["step"] for s in steps if (s["generator"], int(s["cells"])) == key and s["rule"] == "qc"]
        assert names[0].startswith("start-up")
        assert "read input (incl. checks and gene names)" in names and "write qc.h5ad" in names

    runs = read_tsv(out / "runs.tsv")
    assert [r["status"] for r in runs] == ["ok"] * 4
    assert all(r["core_status"] == "ok" and r["full_status"] == "skipped" for r in runs)
    assert all(float(r["ratio_wall_core"]) > 0 for r in runs)
    plain = read_tsv(out / "plain_steps.tsv")
    assert {s["variant"] for s in plain} == {"core"}
    assert {s["step"] for s in plain} >= {"read", "qc_metrics", "mad_filter", "filter_genes"}

    slopes = read_tsv(out / "slopes.tsv")
    assert {(s["generator"], s["series"], s["metric"]) for s in slopes} >= {
        ("tree", "qc", "wall_s"), ("metastem", "qc", "peak_rss_mb"), ("tree", "scanpy_core", "wall_s")}
    assert (out / "scaling.png").stat().st_size > 0
    # the generated inputs are cached by generator and size for the next invocation
    assert len(list((out / "data").glob("sim_*.h5ad"))) == 2
    assert len(list((out / "data").glob("tree_*.h5ad"))) == 2
