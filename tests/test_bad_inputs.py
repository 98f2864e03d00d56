"""Bad input through the real pipeline CLI: non-zero exit, one clear line (dataset, file, 'Fix:'),
no traceback, no outputs for that dataset; with --keep-going the good datasets still complete.

Two kinds of runs, to stay fast:
- problems found before any job (config, sheet, paths, formats): one snakemake call per case, all
  started at once;
- problems found inside the qc/cluster jobs: one `--keep-going` run over a sheet that mixes every
  bad dataset with good ones, each case then checked on its own.
"""
from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from test_pipeline_demo import TRACEBACK, env, make_workdir, new_tmpdir, run_snakemake, snakemake_cmd

pytestmark = pytest.mark.slow

FINAL = ("qc/qc.h5ad", "cluster/clustered.h5ad", "final.h5ad", "report.html")
SMALL_SIM = {"format": "simulated", "species": "human", "values": "counts",
             "params": "simulate.n_cells=300;simulate.n_genes=600"}


def counts(n_cells=120, n_genes=200, seed=0, mito=True) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    genes = ([f"MT-CO{i}" for i in range(1, 4)] if mito else []) + [f"GENE{i}" for i in range(n_genes - 3 * mito)]
    return ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=[f"BC{i:05d}" for i in range(n_cells)]),
                      var=pd.DataFrame(index=genes))


def row(ds, path, fmt, **kw) -> dict:
    return {"dataset": ds, "path": path, "format": fmt, "species": "human", "values": "counts", **kw}


def check_failed(res: subprocess.CompletedProcess, wd: Path, ds: str, file: str | None, words: str,
                 stage: str = "qc") -> None:
    err = res.stderr
    assert res.returncode != 0
    assert TRACEBACK not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if f"dataset '{ds}'" in ln and "Fix:" in ln]
    assert len(lines) == 1, f"expected one error line for {ds}, got {lines}\n{err[-3000:]}"
    assert words in lines[0], lines[0]
    if file:
        assert file in lines[0], lines[0]
    for f in FINAL[1:] if stage == "cluster" else FINAL:  # a failed cluster job keeps the finished QC
        assert not (wd / "results" / ds / f).exists(), f"{ds}: {f} was written"


# ------------------------------------------------------------------------------- before any job
def _corrupt_h5ad(wd):
    counts().write_h5ad(wd / "x.h5ad")
    (wd / "x.h5ad").write_bytes((wd / "x.h5ad").read_bytes()[:1500])


def _corrupt_h5(wd):
    with h5py.File(wd / "x.h5", "w") as f:
        f.create_group("matrix")["data"] = np.arange(5000)
    (wd / "x.h5").write_bytes((wd / "x.h5").read_bytes()[:1200])


def _tenx_no_barcodes(wd):
    d = wd / "tenx"
    d.mkdir()
    (d / "matrix.mtx.gz").write_bytes(gzip.compress(b"%%MatrixMarket matrix coordinate integer general\n1 1 1\n1 1 3\n"))
    (d / "features.tsv.gz").write_bytes(gzip.compress(b"ENSG1\tGENE1\tGene Expression\n"))


def _zero_cells(wd):
    counts()[:0].copy().write_h5ad(wd / "x.h5ad")


PRE_JOB = {
    # id: (setup(workdir), sheet row, file named in the message, words)
    "missing": (None, row("missing", "data/none.h5ad", "h5ad"), "data/none.h5ad", "file not found"),
    "empty": (lambda wd: (wd / "x.csv").write_text(""), row("empty", "x.csv", "csv", orientation="genes_x_cells"),
              "x.csv", "file is empty"),
    "corrupth5ad": (_corrupt_h5ad, row("corrupth5ad", "x.h5ad", "h5ad"), "x.h5ad", "truncated or corrupt"),
    "corrupth5": (_corrupt_h5, row("corrupth5", "x.h5", "10x_h5"), "x.h5", "truncated or corrupt"),
    "tenx": (_tenx_no_barcodes, row("tenx", "tenx", "10x_mtx"), "tenx", "missing barcodes.tsv"),
    "headeronly": (lambda wd: (wd / "x.csv").write_text("gene,c1,c2\n"),
                   row("headeronly", "x.csv", "csv", orientation="genes_x_cells"), "x.csv", "header but no data"),
    "zerocells": (_zero_cells, row("zerocells", "x.h5ad", "h5ad"), "x.h5ad", "0 cells"),
    "mismatch": (lambda wd: (wd / "x.h5ad").write_text("gene,c1\nA,1\n"), row("mismatch", "x.h5ad", "h5ad"),
                 "x.h5ad", "looks like 'text'"),
    "badparams": (None, {**SMALL_SIM, "dataset": "badparams", "params": "cluster.resolutoin=2"},
                  "params column", "'resolutoin' was unexpected"),
}


@pytest.fixture(scope="module")
def pre_job_runs():
    """Every pre-job case in its own work dir (beside a good dataset), all started at once."""
    base = new_tmpdir("metastem-bad-")
    procs = {}
    for case, (setup, bad_row, _, _) in PRE_JOB.items():
        wd = make_workdir(base / case, [{**SMALL_SIM, "dataset": "good"}, bad_row])
        if setup:
            setup(wd)
        procs[case] = (wd, subprocess.Popen(snakemake_cmd(wd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True, env=env(), cwd=wd))
    out = {}
    for case, (wd, p) in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[case] = (wd, subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.parametrize("case", list(PRE_JOB))
def test_pre_job_problem(pre_job_runs, case):
    wd, res = pre_job_runs[case]
    _, bad_row, file, words = PRE_JOB[case]
    check_failed(res, wd, bad_row["dataset"], file, words)
    assert not (wd / "results").exists(), "a job ran although the input was known to be bad"


def test_all_datasets_reported_at_once(tmp_path):
    """Sheet-row, params and input problems of several datasets: one line each, in one run."""
    wd = make_workdir(tmp_path, [row("gone1", "a.h5ad", "h5ad"), row("gone2", "b.h5ad", "h5ad"),
                                 {**SMALL_SIM, "dataset": "bad.id"},
                                 {**SMALL_SIM, "dataset": "par", "params": "qc.min_cells=1"},
                                 {**SMALL_SIM, "dataset": "ok"}])
    res = run_snakemake(wd)
    assert res.returncode != 0 and TRACEBACK not in res.stderr
    for ds, words in (("gone1", "file not found"), ("gone2", "file not found"), ("bad.id", "does not match"),
                      ("par", "qc.min_cells")):
        lines = [ln for ln in res.stderr.splitlines() if f"dataset '{ds}'" in ln and "Fix:" in ln]
        assert len(lines) == 1 and words in lines[0], (ds, res.stderr[-3000:])
    assert not (wd / "results").exists()


@pytest.mark.parametrize("config, words", [
    ({"outdir": "../escape"}, "contains '..'"),
    ({"outdir": "results", "seed": -1}, "seed: -1 is less than the minimum of 0"),
    ({"outdir": "results", "clustr": {"resolution": 1}}, "'clustr' was unexpected"),
])
def test_bad_config_is_one_line(tmp_path, config, words):
    wd = make_workdir(tmp_path / "w", [{**SMALL_SIM, "dataset": "ok"}], config=config)
    res = run_snakemake(wd)
    assert res.returncode != 0 and TRACEBACK not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "Fix:" in ln]
    assert len(lines) == 1 and words in lines[0], res.stderr[-3000:]
    assert len(res.stderr.splitlines()) < 10, "the error is buried in output (e.g. a dump of the schema)"
    assert not (tmp_path / "escape").exists() and not (wd / "results").exists()


# ------------------------------------------------------------------------------- inside the jobs
def _write(wd: Path, name: str, adata: ad.AnnData) -> str:
    adata.write_h5ad(wd / name)
    return name


def _dense_edit(adata, fn):
    X = adata.X.toarray()
    fn(X)
    adata.X = X
    return adata


def _two_worlds(n=150, n_genes=200, seed=0):
    rng = np.random.default_rng(seed)
    X = np.zeros((2 * n, n_genes), dtype=np.float32)
    X[:n, 3: n_genes // 2] = rng.poisson(3.0, size=(n, n_genes // 2 - 3))
    X[n:, n_genes // 2:] = rng.poisson(3.0, size=(n, n_genes - n_genes // 2))
    X[:, :3] = rng.poisson(1.0, size=(2 * n, 3))
    a = counts(2 * n, n_genes)
    a.X = sp.csr_matrix(X)
    return a


def _species(wd):
    a = counts()
    a.var_names = [f"Gm{i}" if i % 2 else f"Actb{i}" for i in range(a.n_vars)]
    return _write(wd, "mouse.h5ad", a)


def _dupbc(wd):
    df = counts().to_df().astype(int).T
    cols = list(df.columns)
    cols[1] = cols[0]
    df.columns = cols
    df.to_csv(wd / "dupbc.csv")
    return "dupbc.csv"


def _ens(wd, symbols):
    a = counts()
    sym = list(a.var_names)
    a.var_names = [f"ENSG{i:011d}" for i in range(a.n_vars)]
    if symbols:
        a.var["gene_symbols"] = sym
    return _write(wd, f"ens{int(symbols)}.h5ad", a)


def _dupgenes(wd):
    a = counts()
    names = list(a.var_names)
    names[10] = names[11]
    a.var_names = names
    return _write(wd, "dupgenes.h5ad", a)


def _real_genes(n: int) -> pd.DataFrame:
    from metastem.genes import gene_positions

    pos = gene_positions("human")
    mt = pos[pos["symbol"].isin(["MT-CO1", "MT-CO2", "MT-CO3"])]
    pc = pos[(pos["biotype"] == "protein_coding") & (pos["chromosome"] != "chrM") & ~pos["symbol"].str.startswith("ENS")]
    return pd.concat([mt, pc.iloc[:: len(pc) // n].head(n - 3)])


def _sideways(wd):
    """A cells x genes CSV (10x barcodes as rows, real symbols as columns), declared genes_x_cells."""
    a = counts()
    rng = np.random.default_rng(0)
    a.obs_names = ["".join(rng.choice(list("ACGT"), 16)) + "-1" for _ in range(a.n_obs)]
    a.var_names = list(_real_genes(a.n_vars)["symbol"])
    a.to_df().astype(int).to_csv(wd / "cells_by_genes.csv")
    return "cells_by_genes.csv"


def _ids_only(wd):
    a = counts()
    a.var_names = list(_real_genes(a.n_vars)["gene_id"])
    return _write(wd, "idsonly.h5ad", a)


def _ercc(wd):
    a = counts()
    names = list(a.var_names)
    names[20:26] = [f"ERCC-{i:05d}" for i in (2, 3, 4, 9, 12, 13)]
    a.var_names = names
    return _write(wd, "ercc.h5ad", a)


def _log2(wd):
    """log2(1 + CPM-like values) of two distinct populations: the base is found, the run clusters."""
    a = _two_worlds()
    C = a.X.toarray()
    a.X = sp.csr_matrix(np.log2(1 + C / C.sum(axis=1, keepdims=True) * 1e4).astype(np.float32))
    return _write(wd, "log2.h5ad", a)


def _smooth_log(wd):
    """Continuous values with unequal totals, small enough in every base: the base cannot be told."""
    a = counts()
    rng = np.random.default_rng(1)
    V = rng.gamma(0.5, 1.0, size=a.shape) * (rng.random(a.shape) < 0.6) * rng.uniform(5, 50, (a.n_obs, 1))
    a.X = sp.csr_matrix(np.log1p(V).astype(np.float32))
    return _write(wd, "smooth.h5ad", a)


IN_JOB_FAIL = {
    # id: (make file -> path, sheet row extras, stage target, file in message, words)
    "negative": (lambda wd: _write(wd, "neg.h5ad", _dense_edit(counts(), lambda X: X.__setitem__((0, 5), -2))),
                 {}, "qc", "neg.h5ad", "negative values"),
    "nan": (lambda wd: _write(wd, "nan.h5ad", _dense_edit(counts(), lambda X: X.__setitem__((3, 5), np.nan))),
            {}, "qc", "nan.h5ad", "NaN or infinite"),
    "inf": (lambda wd: _write(wd, "inf.h5ad", _dense_edit(counts(), lambda X: X.__setitem__((3, 5), np.inf))),
            {"values": "log"}, "qc", "inf.h5ad", "NaN or infinite"),
    "nonint": (lambda wd: _write(wd, "half.h5ad", _dense_edit(counts(), lambda X: X.__imul__(0.5))),
               {}, "qc", "half.h5ad", "non-integer values"),
    "dupbc": (_dupbc, {"format": "csv", "orientation": "genes_x_cells"}, "qc", "dupbc.csv", "duplicate cell barcodes"),
    "ensnosym": (lambda wd: _ens(wd, False), {}, "qc", "ens0.h5ad", "Ensembl IDs and no gene-symbol column"),
    "species": (_species, {}, "qc", "mouse.h5ad", "declared human"),
    "qcall": (lambda wd: _write(wd, "qcall.h5ad", counts()), {"params": "qc.max_pct_mito=0"}, "qc", "qcall.h5ad",
              "fewer than qc.min_cells=50"),
    "fewcells": (lambda wd: _write(wd, "few.h5ad", counts(n_cells=30)), {}, "qc", "few.h5ad",
                 "fewer than qc.min_cells"),
    "onecluster": (lambda wd: _write(wd, "homog.h5ad", counts()), {"params": "cluster.resolution=0.01"}, "cluster",
                   "onecluster/qc/qc.h5ad", "cluster.resolution"),
    "sideways": (_sideways, {"format": "csv", "orientation": "genes_x_cells"}, "qc", "cells_by_genes.csv",
                 'the "genes" look like barcodes'),
    "logambig": (_smooth_log, {"values": "log"}, "qc", "smooth.h5ad", "do not tell the log base"),
}
IN_JOB_OK = {
    "good": (None, SMALL_SIM, "cluster"),
    "dupgenes": (_dupgenes, {}, "qc"),
    "enssym": (lambda wd: _ens(wd, True), {}, "qc"),
    "disconnected": (lambda wd: _write(wd, "two.h5ad", _two_worlds()), {}, "cluster"),
    "idsonly": (_ids_only, {}, "qc"),
    "ercc": (_ercc, {}, "qc"),
    "log2": (_log2, {"values": "log"}, "cluster"),
    "logdeclared": (_smooth_log, {"values": "log", "log_base": "e"}, "qc"),
}
TARGET = {"qc": "qc/qc.h5ad", "cluster": "cluster/clustered.h5ad"}


@pytest.fixture(scope="module")
def in_job_run():
    wd = new_tmpdir("metastem-bad-jobs-")
    rows, targets = [], []
    for ds, (make, extra, stage, *_) in {**IN_JOB_FAIL, **IN_JOB_OK}.items():
        rows.append({**row(ds, "", "h5ad"), **extra, "dataset": ds})
        targets.append(f"results/{ds}/{TARGET[stage]}")
    for r, (make, *_rest) in zip(rows, {**IN_JOB_FAIL, **IN_JOB_OK}.values()):
        if make:
            r["path"] = make(wd)
    make_workdir(wd, rows)
    sheet = pd.read_csv(wd / "config" / "datasets.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet["log_base"] = [r.get("log_base", "") for r in rows]   # the column make_workdir does not write
    sheet.to_csv(wd / "config" / "datasets.tsv", sep="\t", index=False)
    res = run_snakemake(wd, "--keep-going", *targets, timeout=900)
    return wd, res


@pytest.mark.parametrize("case", list(IN_JOB_FAIL))
def test_in_job_problem(in_job_run, case):
    wd, res = in_job_run
    _, _, stage, file, words = IN_JOB_FAIL[case]
    check_failed(res, wd, case, file, words, stage)
    log = (wd / "results" / "logs" / case / f"{stage}.log").read_text()
    assert words in log  # the same line is in the rule's log


def test_good_datasets_complete_beside_bad_ones(in_job_run):
    wd, res = in_job_run
    assert res.returncode != 0  # bad datasets fail the run as a whole
    for ds, (_, _, stage) in IN_JOB_OK.items():
        assert (wd / "results" / ds / TARGET[stage]).is_file(), f"{ds} did not complete:\n{res.stderr[-3000:]}"
        assert not [ln for ln in res.stderr.splitlines() if f"dataset '{ds}'" in ln]


def test_duplicate_gene_symbols_are_a_warning(in_job_run):
    wd, _ = in_job_run
    log = (wd / "results/logs/dupgenes/qc.log").read_text()
    assert "WARNING" in log and "duplicate gene symbols made unique" in log
    a = ad.read_h5ad(wd / "results/dupgenes/qc/qc.h5ad", backed="r")
    assert a.var_names.is_unique


def test_ensembl_ids_with_a_symbol_column_use_the_symbols(in_job_run):
    wd, _ = in_job_run
    a = ad.read_h5ad(wd / "results/enssym/qc/qc.h5ad", backed="r")
    assert "GENE5" in a.var_names and not a.var_names[0].startswith("ENSG")


def test_ensembl_ids_only_are_named_by_the_gene_table(in_job_run):
    import json

    wd, _ = in_job_run
    a = ad.read_h5ad(wd / "results/idsonly/qc/qc.h5ad", backed="r")
    expected = _real_genes(200).set_index("gene_id")["symbol"]
    assert set(a.var_names) <= set(expected) and a.var["gene_ids"].map(expected).eq(a.var_names).all()
    info = json.loads((wd / "results/idsonly/qc/info.json").read_text())
    assert info["genes"]["n_symbols_from_table"] == 200 and "through the GENCODE v48" in info["genes"]["summary"]


def test_ercc_spike_ins_leave_the_matrix(in_job_run):
    import json

    wd, _ = in_job_run
    a = ad.read_h5ad(wd / "results/ercc/qc/qc.h5ad", backed="r")
    assert not a.var_names.str.startswith("ERCC").any() and "pct_counts_ercc" in a.obs
    cells = pd.read_csv(wd / "results/ercc/qc/cells.tsv.gz", sep="\t", index_col=0)
    assert cells["pct_counts_ercc"].between(0, 100).all() and cells["pct_counts_ercc"].median() > 1
    info = json.loads((wd / "results/ercc/qc/info.json").read_text())
    assert info["n_spike_ins_removed"] == 6 and any("ERCC spike-ins removed" in n for n in info["notes"])


def test_log2_input_is_found_and_clustered(in_job_run):
    import json

    wd, _ = in_job_run
    info = json.loads((wd / "results/log2/qc/info.json").read_text())
    assert "log base 2 (detected" in info["input"]["log_base"]
    cl = json.loads((wd / "results/log2/cluster/info.json").read_text())
    assert "log2 values converted to natural log1p units" in cl["normalisation"]
    a = ad.read_h5ad(wd / "results/log2/cluster/clustered.h5ad", backed="r")
    assert a.obs["leiden"].nunique() >= 2


def test_declared_log_base_runs_where_detection_cannot(in_job_run):
    import json

    wd, _ = in_job_run
    info = json.loads((wd / "results/logdeclared/qc/info.json").read_text())
    assert "log base e (declared" in info["input"]["log_base"]


def test_disconnected_graph_completes_with_a_warning(in_job_run):
    wd, _ = in_job_run
    log = (wd / "results/logs/disconnected/cluster.log").read_text()
    assert "WARNING" in log and "disconnected components" in log and "unreachable" in log
    a = ad.read_h5ad(wd / "results/disconnected/cluster/clustered.h5ad", backed="r")
    assert a.obs["knn_component"].nunique() == 2


# ------------------------------------------------------------------------------- gene sets (pathways stage)
@pytest.mark.parametrize("text, words", [
    ("SET_A desc GENE1 GENE2\n", "not 'name<TAB>description<TAB>gene...'"),
    ("\x00\x01binary", None),
])
def test_user_gmt_that_does_not_parse(tmp_path, text, words):
    from metastem.errors import MetastemError
    from metastem.genesets import read_gmt

    p = tmp_path / "mine.gmt"
    p.write_text(text)
    with pytest.raises(MetastemError) as err:
        read_gmt(p)
    msg = str(err.value)
    assert str(p) in msg and "Fix:" in msg and "\n" not in msg
    if words:
        assert words in msg


def test_gene_set_with_no_gene_present():
    """A set none of whose genes is in the data is reported with coverage 0, not an error or a crash."""
    from metastem.genesets import gene_set_coverage

    cov = gene_set_coverage({"ABSENT": ["NOPE1", "NOPE2"], "PRESENT": ["GENE1", "GENE2"]},
                            pd.Index([f"GENE{i}" for i in range(10)]))
    cov = cov.set_index("set")
    assert cov.loc["ABSENT", "n_found"] == 0 and cov.loc["ABSENT", "coverage"] == 0
    assert cov.loc["PRESENT", "n_found"] == 2
