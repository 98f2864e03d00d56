"""One log line per step of a pipeline job, so a user sees where the time and the memory go.

``step(name)`` is a context manager and a decorator. When timing is enabled (``metastem.smk.run``
enables it for every rule) each step logs, to the logger ``metastem.timing``, exactly one line::

    step read: 12.3 s, peak RSS 1.42 GB

``s`` is the step's wall time; ``peak RSS`` is the process's peak resident memory so far
(``getrusage``: monotonic, so a step that does not raise it shows the peak of an earlier one). Nested
steps each log their own line, inner first. Outside a pipeline job (library use, tests) nothing is
logged and the cost is two ``perf_counter`` calls. ``benchmarks/run.py`` parses these lines
(``LINE``) from every rule's log and prints them per rule.

Used as a decorator, ``name`` may name the function's arguments in braces, e.g.
``@step("write {path}")``: a path is shown by its file name only.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import resource
import sys
import time
from typing import Any, Callable, TypeVar

log = logging.getLogger("metastem.timing")
F = TypeVar("F", bound=Callable[..., Any])

#: The format of a step line, for parsers (benchmarks/run.py).
LINE = re.compile(r"step (?P<step>.+?): (?P<wall_s>\d+(?:\.\d+)?) s, peak RSS (?P<peak_rss_gb>\d+(?:\.\d+)?) GB")

_enabled = False


def enable(on: bool = True) -> None:
    """Log a line per step from now on (``False``: stop)."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (2**30 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # Linux: kB; macOS: bytes


def _show(value: Any) -> str:
    if isinstance(value, os.PathLike) or (isinstance(value, str) and os.sep in value):
        return os.path.basename(os.fspath(value))
    return str(value)


class step:
    """Time a block or a function and log ``step <name>: <s> s, peak RSS <GB>`` when enabled."""

    def __init__(self, name: str):
        self.name = name
        self._t0: list[float] = []  # a stack: the same instance may be re-entered (recursion, decorator)

    def __enter__(self) -> "step":
        self._t0.append(time.perf_counter())
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._emit(self.name, self._t0.pop(), failed=exc_type is not None)
        return False

    @staticmethod
    def _emit(name: str, t0: float, failed: bool = False) -> None:
        if _enabled:
            log.info("step %s: %.2f s, peak RSS %.2f GB%s", name, time.perf_counter() - t0, peak_rss_gb(),
                     " (failed)" if failed else "")

    def __call__(self, func: F) -> F:
        name = self.name
        templated = "{" in name
        sig = inspect.signature(func) if templated else None

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            failed = True
            try:
                result = func(*args, **kwargs)
                failed = False
                return result
            finally:
                if _enabled:
                    label = name
                    if templated:
                        try:
                            bound = sig.bind(*args, **kwargs)
                            bound.apply_defaults()
                            label = name.format(**{k: _show(v) for k, v in bound.arguments.items()})
                        except (KeyError, IndexError, TypeError, ValueError):
                            pass
                    step._emit(label, t0, failed)

        return wrapper  # type: ignore[return-value]


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None where that is unknown."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def log_startup(name: str = "start-up (interpreter, Snakemake preamble)") -> None:
    """One step line for the time from the process's start to now: what a job pays before its work."""
    age = process_age_s()
    if _enabled and age is not None:
        log.info("step %s: %.2f s, peak RSS %.2f GB", name, age, peak_rss_gb())


def timed(name: str, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` as one step: ``adata = timed("read qc.h5ad", ad.read_h5ad, path)``."""
    with step(name):
        return func(*args, **kwargs)
