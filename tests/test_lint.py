"""The workflow passes `snakemake --lint` and is formatted as `snakefmt` (2.1.0, pinned in the lock) wants.

`make lint` runs the same two commands; here they are part of `make test` so CI enforces them.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONSUMER = REPO / "tests" / "module_consumer"


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    require(path is not None, f"{name} is not installed (make env installs it from requirements.lock)")
    return str(path)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def _lint(snakefile: Path, cwd: Path) -> None:
    res = _run([_tool("snakemake"), "--lint", "--cores", "1", "-s", str(snakefile)], cwd=cwd)
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 0 and "Lints for" not in out, f"snakemake --lint on {snakefile}:\n{out[-6000:]}"


def test_snakemake_lint_clean():
    # linting loads the workflow: run it where its default config and sheet resolve
    _lint(REPO / "Snakefile", REPO)


def test_snakemake_lint_clean_module_consumer(tmp_path):
    # from a scratch directory holding only the consumer's sheet: nothing is written into the repo
    shutil.copy(CONSUMER / "datasets.tsv", tmp_path / "datasets.tsv")
    _lint(CONSUMER / "Snakefile", tmp_path)


def test_snakefmt_clean():
    targets = ["Snakefile", "workflow/rules", str(CONSUMER.relative_to(REPO) / "Snakefile")]
    res = _run([_tool("snakefmt"), "--check", *targets], cwd=REPO)
    if res.returncode != 0:
        diff = _run([_tool("snakefmt"), "--diff", *targets], cwd=REPO)
        pytest.fail(f"snakefmt --check failed ({res.stderr.strip()}); run `snakefmt Snakefile workflow/rules`.\n"
                    f"{diff.stdout[-8000:]}")
