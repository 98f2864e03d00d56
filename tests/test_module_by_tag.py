"""metastem reused the way a Snakemake user reuses a published workflow: pulled by tag, offline.

What a consumer has: a tag of the repository (no checkout on disk), the metastem *wheel* of the same
version installed in their environment (no editable install, no ``src/`` on ``sys.path``), and their own
Snakefile with ``module metastem: snakefile: github("metastem/metastem", path="Snakefile", tag=...)``.
Snakemake resolves ``github()`` through a bare clone in its source cache and only goes to the network when
the tag is not there; the tests fill that cache from a local tagged repository, so nothing is downloaded.

1. ``module ... github(...)`` end to end on a small simulated tumour: the report holds every figure with
   its caption, and the code that ran is the wheel's.
2. ``snakedeploy deploy-workflow`` of the same tag, then a run of what it wrote.
3. A tag whose version differs from the installed package is refused in one line naming both versions.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import metastem

REPO = Path(__file__).resolve().parents[1]
OWNER_REPO = "metastem/metastem"
TAG = f"v{metastem.__version__}"
SMALL = {"n_cells": 600, "n_genes": 2000}

pytestmark = pytest.mark.slow


def _run(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None, timeout: int = 900,
         check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def _git(*args: str, cwd: Path) -> None:
    _run(["git", "-c", "user.name=metastem-test", "-c", "user.email=test@example.org",
          "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", *args], cwd=cwd)


def _tagged_repo(dest: Path, tags: dict[str, str | None]) -> Path:
    """A git repository holding the working tree as it is (tracked and untracked-but-not-ignored files),
    tagged ``tags`` ({tag: version written into metastem/__init__.py, None = as is})."""
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    _git("init", "-q", cwd=dest)
    init = dest / "src/metastem/__init__.py"
    original = init.read_text()
    for tag, version in tags.items():
        text = original if version is None else re.sub(r'__version__ = "[^"]+"', f'__version__ = "{version}"', original)
        init.write_text(text)
        _git("add", "-A", cwd=dest)
        _git("commit", "-q", "--allow-empty", "-m", f"metastem {tag}", cwd=dest)
        _git("tag", tag, cwd=dest)
    return dest


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The tagged repository, Snakemake's git cache filled from it, and a fresh venv with the wheel."""
    base = tmp_path_factory.mktemp("published")
    repo = _tagged_repo(base / "github.com" / OWNER_REPO, {TAG: None, "v9.9.9": "9.9.9"})
    _git("checkout", "-q", TAG, cwd=repo)

    # Snakemake's source cache: <user cache>/snakemake/snakemake/source-cache/snakemake-git-cache/<host>/<repo>
    cache = base / "xdg-cache"
    clone = cache / "snakemake" / "snakemake" / "source-cache" / "snakemake-git-cache" / "github.com" / OWNER_REPO
    clone.parent.mkdir(parents=True)
    _run(["git", "clone", "-q", "--bare", str(repo), str(clone)])

    # the wheel of this version, built from the tagged tree, in a venv of its own
    wheels = base / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(repo)])
    (wheel,) = wheels.glob(f"metastem-{metastem.__version__}-*.whl")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # third-party packages from the test environment; its editable metastem is NOT visible there (its .pth
    # lives in that site dir, which is added as a plain path, so the .pth is never processed)
    (site / "_metastem_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)]
         if _pip_has_python_flag() else
         [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(XDG_CACHE_HOME=str(cache), PATH=f"{venv / 'bin'}:{env.get('PATH', '')}",
               NUMBA_CACHE_DIR=str(REPO / ".cache" / "numba"), MPLCONFIGDIR=str(REPO / ".cache" / "matplotlib"))
    where = _run([str(py), "-c", "import metastem; print(metastem.__file__, metastem.__version__)"], env=env, cwd=base)
    path, version = where.stdout.split()
    assert Path(path).is_relative_to(site) and version == metastem.__version__, \
        f"the fresh venv imports metastem from {path} ({version}), not from its installed wheel"
    return {"base": base, "repo": repo, "py": py, "env": env, "site": site}


def _pip_has_python_flag() -> bool:
    res = subprocess.run([sys.executable, "-m", "pip", "--python", sys.executable, "--version"], capture_output=True)
    return res.returncode == 0


def _consumer(work: Path, tag: str) -> Path:
    work.mkdir(parents=True)
    (work / "datasets.tsv").write_text(
        "dataset\tpath\tformat\torientation\tspecies\tvalues\tlabels\tparams\n"
        "tumour1\t\tsimulated\t\thuman\tcounts\ttrue_state\t\n")
    (work / "config.yaml").write_text(
        "metastem:\n  datasets: datasets.tsv\n  outdir: results/metastem\n  seed: 0\n"
        f"  simulate:\n    n_cells: {SMALL['n_cells']}\n    n_genes: {SMALL['n_genes']}\n")
    (work / "Snakefile").write_text(f'''\
configfile: "config.yaml"


module metastem:
    snakefile:
        github("{OWNER_REPO}", path="Snakefile", tag="{tag}")
    config:
        config["metastem"]


use rule * from metastem as metastem_*


rule all:
    default_target: True
    input:
        rules.metastem_all.input,
''')
    return work


def _check_report(html_path: Path, figures_dir: Path) -> tuple[int, int]:
    html = html_path.read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html.split("<body", 1)[0], \
        "the report requests something from a host"
    figures = re.findall(r'<figure id="fig-([^"]+)">(.*?)</figure>', html, re.S)
    drawn = sorted(p.stem for p in figures_dir.glob("*.png") if p.stat().st_size > 0)
    assert sorted(name for name, _ in figures) == drawn, "the report does not show every figure the run drew"
    uncaptioned = [name for name, body in figures if "<figcaption>" not in body]
    assert not uncaptioned, f"figures without their caption (captions not found through the module): {uncaptioned}"
    return len(figures), len(drawn)


def test_module_pulled_by_tag_runs_end_to_end_offline(published):
    work = _consumer(published["base"] / "consumer", TAG)
    res = _run([str(published["py"]), "-m", "snakemake", "--cores", "2", "--show-failed-logs"], cwd=work,
               env=published["env"], timeout=1500)
    assert "Cloning" not in res.stderr and "Fetching" not in res.stderr, "Snakemake went to the network"
    out = work / "results" / "metastem" / "tumour1"
    n_fig, _ = _check_report(out / "report.html", out / "figures")
    assert n_fig >= 10
    # the jobs imported the wheel's metastem: the QC log names no path of the checkout
    logs = "\n".join(p.read_text() for p in (work / "results" / "metastem" / "logs").rglob("*.log"))
    assert str(REPO / "src") not in logs
    assert sorted(p.name for p in work.iterdir()) == [".snakemake", "Snakefile", "config.yaml", "datasets.tsv",
                                                       "results"]


def test_snakedeploy_deploy_workflow_then_run(published):
    dest = published["base"] / "deployed"
    snakedeploy = shutil.which("snakedeploy", path=str(Path(sys.executable).parent))
    assert snakedeploy, "snakedeploy is not installed in the test environment"
    _run([snakedeploy, "deploy-workflow", f"file://{published['repo']}", str(dest), "--tag", TAG],
         env=published["env"], timeout=300)
    snakefile = (dest / "workflow" / "Snakefile").read_text()
    assert f'github("{OWNER_REPO}", path="Snakefile", tag="{TAG}")' in snakefile, snakefile
    assert (dest / "config" / "config.yaml").is_file() and (dest / "config" / "datasets.tsv").is_file()
    # as a user would: edit the deployed config (here: a small demo)
    with open(dest / "config" / "config.yaml", "a") as fh:
        fh.write(f"simulate:\n  n_cells: {SMALL['n_cells']}\n  n_genes: {SMALL['n_genes']}\n")
    _run([str(published["py"]), "-m", "snakemake", "--cores", "2"], cwd=dest, env=published["env"], timeout=1500)
    out = dest / "results" / "demo"
    _check_report(out / "report.html", out / "figures")


def test_tag_of_another_version_is_refused_in_one_line(published):
    work = _consumer(published["base"] / "consumer_old", "v9.9.9")
    res = _run([str(published["py"]), "-m", "snakemake", "--cores", "1", "--dry-run"], cwd=work,
               env=published["env"], timeout=300, check=False)
    assert res.returncode != 0
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("metastem:")]
    assert len(lines) == 1, res.stderr[-3000:]
    assert "9.9.9" in lines[0] and metastem.__version__ in lines[0] and "pip install" in lines[0]
    assert "Traceback" not in res.stderr
