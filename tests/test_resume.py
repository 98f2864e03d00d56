"""Nothing half-written: kill the whole snakemake process group while `cluster` runs, rerun with
--rerun-incomplete, and get what an uninterrupted run gives."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from test_pipeline_demo import (DEMO_ROW, TRACEBACK, comparable_files, demo_run, env, make_workdir, new_tmpdir,
                                obs_table, run_snakemake, snakemake_cmd)

pytestmark = pytest.mark.slow


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.is_file() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended (rc {proc.returncode}) before {path} showed '{text}'")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {path}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_interrupted_cluster_job_resumes_to_the_same_result(sig):
    reference = demo_run()
    wd = make_workdir(new_tmpdir(f"metastem-resume-{sig.name}-"), [DEMO_ROW])
    proc = subprocess.Popen(snakemake_cmd(wd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            cwd=wd, start_new_session=True)
    try:
        _wait_for(wd / "results/logs/demo/cluster.log", "rule cluster", proc)
        time.sleep(1.0)  # inside the job (imports, normalisation, ...)
        os.killpg(proc.pid, sig)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    clustered = wd / "results/demo/cluster/clustered.h5ad"
    assert not clustered.exists(), "cluster output exists although the job was killed"
    assert (wd / "results/demo/qc/qc.h5ad").is_file()  # the finished job's output stays

    if sig == signal.SIGKILL:  # snakemake had no chance to release its lock
        unlock = run_snakemake(wd, "--unlock")
        assert unlock.returncode == 0, unlock.stderr[-2000:]
    res = run_snakemake(wd, "--rerun-incomplete")
    assert res.returncode == 0, res.stderr[-4000:]
    assert TRACEBACK not in res.stderr
    assert "rule qc:" not in res.stdout + res.stderr, "the finished qc job was run again"
    assert not [p for p in (wd / "results").rglob(".*tmp")], "temporary files left in results"

    ref_files, new_files = comparable_files(reference), comparable_files(wd)
    assert ref_files.keys() == new_files.keys()
    for rel in ref_files:
        assert ref_files[rel].read_bytes() == new_files[rel].read_bytes(), f"{rel} differs from the uninterrupted run"
    pd.testing.assert_frame_equal(obs_table(clustered), obs_table(reference / "results/demo/cluster/clustered.h5ad"))
