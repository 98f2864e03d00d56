"""The pipeline on a real SLURM cluster through the executor plugin and profiles/slurm.

Needs a running SLURM with accounting (sacct): `sudo tests/slurm/start_slurm.sh` (CI: .ci/run does it).
Skipped on a developer machine without one; with CI=true (or METASTEM_SLURM=1) a missing cluster fails.

Checks: every rule ran as its own SLURM job (sacct: COMPLETED, exit 0, one job per rule run, the rule's
own log written while that job was running), and the results equal a local run of the same config.
Wall time and job count are printed and written to tests/artifacts/slurm_run.json.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
import workflow_runs as wr  # noqa: E402
from conftest import IN_CI, require  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM_TIMEOUT = 1500  # s; the whole CI budget is 25 min, a hang must not eat all of it
ARTIFACTS = wr.REPO / "tests" / "artifacts"


def _slurm_problem() -> str | None:
    """None when a SLURM controller answers and sacct works; otherwise why not."""
    for tool in ("sbatch", "scontrol", "sacct"):
        if not wr.which(tool):
            return f"SLURM is not installed ('{tool}' not found); start one with `sudo tests/slurm/start_slurm.sh`"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        if "UP" not in ping.stdout:
            return f"no SLURM controller answers (scontrol ping: {ping.stdout.strip() or ping.stderr.strip()}); " \
                   "start one with `sudo tests/slurm/start_slurm.sh`"
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True, timeout=20)
        if acct.returncode != 0:
            return f"SLURM accounting is off (sacct: {acct.stderr.strip()}); the test reads job states from sacct"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"SLURM does not respond ({exc})"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    problem = _slurm_problem()
    if problem and os.environ.get("METASTEM_SLURM") == "1":
        pytest.fail(f"METASTEM_SLURM=1 but {problem}")
    require(problem is None, problem or "")


def _sacct(job_ids: list[str]) -> list[dict]:
    fields = ["JobID", "State", "ExitCode", "Comment", "Start", "End", "AllocCPUS", "ReqMem", "WorkDir"]
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", ",".join(fields)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    return [dict(zip(fields, ln.split("|"))) for ln in out.splitlines() if ln.strip()]


def _ts(s: str) -> float:
    return datetime.fromisoformat(s).timestamp()


def test_pipeline_on_slurm_matches_local(slurm_cluster, tmp_path, tmp_path_factory):
    ref_out, ref_run = wr.local_reference(tmp_path_factory.mktemp("local_reference"))

    outdir = tmp_path / "results"
    cfg = wr.write_small_config(tmp_path, outdir)
    args = [
        "--profile", str(wr.REPO / "profiles" / "slurm"),
        "--configfile", str(cfg),
        # CI cluster on localhost: poll soon (checks at 2, 14, 36 s after a submission: the plugin adds 10 s
        # per idle check), files appear at once; keep the job logs to check them
        "--slurm-init-seconds-before-status-checks", "2",
        "--latency-wait", "10",
        "--slurm-keep-successful-logs",
        "--slurm-logdir", str(tmp_path / "slurm_logs"),
    ]
    run = wr.run_snakemake(args, cwd=wr.REPO, log=tmp_path / "snakemake_slurm.log", timeout=SLURM_TIMEOUT)

    # ---- one SLURM job per rule run -------------------------------------------------------
    stats = run.job_stats()
    local_rules = set(re.findall(r"^localrule (\S+):", run.text, re.M))
    remote_rules = re.findall(r"^rule (\S+):", run.text, re.M)
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", run.text)
    expected = sum(n for rule, n in stats.items() if rule not in local_rules)
    assert expected > 0, f"nothing to run?\n{run.tail()}"
    assert len(submitted) == len(remote_rules) == expected, (
        f"{len(submitted)} SLURM submissions, {len(remote_rules)} non-local jobs, job stats say {expected}: {stats}"
    )
    assert ref_run.job_stats() == stats, "the local and the SLURM run did not schedule the same jobs"

    acct = _sacct(submitted)
    assert sorted(a["JobID"] for a in acct) == sorted(submitted), f"sacct does not know every job: {acct}"
    bad = [a for a in acct if a["State"] != "COMPLETED" or a["ExitCode"] != "0:0"]
    assert not bad, f"SLURM jobs not COMPLETED/0:0: {bad}"
    ran = {}
    for a in acct:
        m = re.match(r"rule_(\S+?)(?:_wildcards_(\S+))?$", a["Comment"])
        assert m, f"job {a['JobID']} has no rule_<name> comment: {a}"
        ran.setdefault(m.group(1), []).append(a)
    assert {r: len(v) for r, v in ran.items()} == {r: stats[r] for r in ran}, f"jobs per rule: {ran} vs {stats}"
    assert set(ran) == {r for r in stats if r not in local_rules}

    # ---- the outputs were written inside those jobs -----------------------------------------
    # (output mtimes are reset by the main snakemake process; the rules' own log files are not)
    summary = subprocess.run(
        [*wr.SNAKEMAKE, "--configfile", str(cfg), "--summary"],
        cwd=wr.REPO, capture_output=True, text=True, timeout=300, env=wr.env(), check=True,
    ).stdout
    logs_of: dict[str, set[str]] = {}
    for ln in summary.splitlines()[1:]:
        cols = ln.split("\t")
        if len(cols) >= 4 and cols[3] and cols[3] != "-":
            logs_of.setdefault(cols[2], set()).update(cols[3].split(","))
    for rule, jobs in ran.items():
        logs = [Path(p.strip()) for p in logs_of.get(rule, ()) if p.strip()]
        assert logs, f"rule {rule} has no log file in --summary; cannot tell where it ran"
        windows = [(_ts(j["Start"]) - 2, _ts(j["End"]) + 2) for j in jobs]
        for lg in logs:
            assert lg.is_file(), f"{lg} missing"
            t = lg.stat().st_mtime
            assert any(lo <= t <= hi for lo, hi in windows), (
                f"{lg} (rule {rule}) was last written at {datetime.fromtimestamp(t)}, "
                f"outside its SLURM job(s) {[(j['JobID'], j['Start'], j['End']) for j in jobs]}"
            )
    job_logs = list((tmp_path / "slurm_logs").rglob("*.log"))
    assert len(job_logs) == len(submitted), f"expected one SLURM log per job, found {job_logs}"

    # ---- same results as locally ------------------------------------------------------------
    problems = wr.compare_outputs(outdir, ref_out)
    assert not problems, "SLURM and local results differ:\n" + "\n".join(problems)

    report = {
        "command": " ".join(["timeout -k 30", str(SLURM_TIMEOUT), "snakemake", *args]),
        "wall_seconds": round(run.wall, 1),
        "local_wall_seconds": round(ref_run.wall, 1),
        "slurm_jobs": len(submitted),
        "jobs_per_rule": {r: len(v) for r, v in ran.items()},
        "sacct": [{k: a[k] for k in ("JobID", "State", "Comment", "Start", "End", "AllocCPUS", "ReqMem")}
                  for a in acct],
        "files_compared": wr.compared_kinds(ref_out),
        "ci": IN_CI,
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "slurm_run.json").write_text(json.dumps(report, indent=2))
    print(f"\nSLURM run: {report['slurm_jobs']} jobs {report['jobs_per_rule']} in {report['wall_seconds']} s "
          f"(local: {report['local_wall_seconds']} s); compared {report['files_compared']}")
