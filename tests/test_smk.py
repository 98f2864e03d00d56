"""The job wrapper: one line on stderr per failure, the traceback in the rule's log, exit status 1."""
from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest

from metastem import smk
from metastem.errors import MetastemError


def _job(tmp_path):
    return SimpleNamespace(log=[str(tmp_path / "logs" / "cluster.log")], threads=1, rule="cluster",
                           wildcards=SimpleNamespace(dataset="big"))


def _raise(exc):
    def main(_):
        raise exc
    return main


@pytest.mark.parametrize("exc, words", [
    (OSError(errno.ENOSPC, "No space left on device"), ["rule cluster: no space left on the disk", "Fix: free space"]),
    (OSError(errno.EACCES, "Permission denied"), ["rule cluster failed unexpectedly (PermissionError", "Fix: see"]),
    (MetastemError("only 2 cells reach clustering", fix="provide more cells"), ["only 2 cells", "Fix: provide"]),
])
def test_failures_are_one_line_with_a_fix(tmp_path, monkeypatch, capsys, exc, words):
    monkeypatch.setattr(smk, "_set_threads", lambda n: None)   # keep this test process's thread pools
    with pytest.raises(SystemExit) as stop:
        smk.run(_job(tmp_path), _raise(exc))
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dataset 'big'" in err and "Traceback" not in err
    for w in words:
        assert w in err
    if not isinstance(exc, MetastemError):
        assert "Traceback" in (tmp_path / "logs" / "cluster.log").read_text()
