"""The demo report in a real browser: headless Chromium with networking off loads it without console
errors, runs its inline script, and renders a page that is not blank. The screenshot is kept in
tests/artifacts/ for a human to look at."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from test_report import REPO, run_demo_pipeline

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "tests/artifacts"
# Every request to a network host fails: unknown hosts and a proxy on a closed port.
OFFLINE = ["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run on a local page, with console messages logged to stderr."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars", *OFFLINE,
           *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    """Lines the page wrote to the console (errors, uncaught exceptions): the report writes none."""
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE(:\d+)?\]", line)]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    require(Path(CHROMIUM).is_file(), f"Chromium is not installed ({CHROMIUM}); run tests/browser/install_chromium.sh")
    return run_demo_pipeline(tmp_path_factory.getbasetemp()) / "results/demo/report.html"


@pytest.mark.slow
@pytest.mark.browser
def test_report_loads_offline_without_console_errors(report, tmp_path):
    res = chromium(report, tmp_path / "profile", "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    assert console_messages(res.stderr) == []
    dom = res.stdout
    assert "Methods and provenance" in dom and "</footer>" in dom, "page did not load completely"
    assert re.search(r'<td class="num">', dom), "the inline table script did not run"


@pytest.mark.slow
@pytest.mark.browser
def test_full_page_screenshot_is_not_blank(report, tmp_path):
    from PIL import Image

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_demo.png"
    res = chromium(report, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,6000")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert console_messages(res.stderr) == []
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (6000, 1280)
    assert pixels.std() > 20, "screenshot is (nearly) blank"
    # figures were drawn: the page holds many distinct grey levels, not just background and text
    assert len(np.unique(pixels)) > 64
