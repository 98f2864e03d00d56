"""Glue between Snakemake `script:` jobs and the analysis functions.

Every script is ``run(snakemake, main)``: logging goes to the rule's log file, threads are applied to
BLAS/numba, and a ``MetastemError`` becomes one line on stderr (and in the log) with exit status 1.
Any other exception is logged with its traceback in the log file, and summarised in one line on stderr.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn

from metastem.errors import MetastemError


def _set_threads(n: int) -> None:
    """Use the job's threads, no more: numpy and numba are loaded by now, so their pools are resized
    in place. Changing NUMBA_NUM_THREADS after numba has launched its threads makes the next JIT
    compilation fail (seen with --cores 1), so numba gets ``set_num_threads`` instead."""
    import numba
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # for child processes
        os.environ[var] = str(n)


def run(smk: Any, main: Callable[[Any], None]) -> None:
    """Run ``main(smk)`` as a pipeline step with logging, threads and one-line errors."""
    from metastem import enable_numba_cache

    log_path = Path(smk.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    enable_numba_cache()  # before anything imports pynndescent or umap: compile once, reuse in every later job
    _set_threads(max(1, int(smk.threads)))
    logging.basicConfig(filename=log_path, filemode="w", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    log = logging.getLogger("metastem")
    digest = WarningDigest(logging.getLogger("py.warnings"))   # instead of logging.captureWarnings
    saved_showwarning, warnings.showwarning = warnings.showwarning, digest.showwarning
    t0 = time.time()
    dataset = getattr(smk.wildcards, "dataset", None)
    log.info("rule %s, dataset %s, threads %s", smk.rule, dataset, smk.threads)
    from metastem import _timing  # a line per step (read, computations, write) with its peak RSS

    _timing.enable()
    _timing.log_startup()
    try:
        main(smk)
    except MetastemError as err:
        err.with_context(dataset=dataset)
        log.error("%s", err)
        print(f"metastem: {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            _unexpected(exc, log, log_path, smk.rule, dataset)
        log.error("disk full\n%s", traceback.format_exc())
        print(f"metastem: dataset '{dataset}': rule {smk.rule}: no space left on the disk while writing its outputs "
              f"(nothing partial was kept). Fix: free space on the disk that holds {log_path.parent} (df -h) and "
              "rerun; finished rules are not redone.", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:  # unexpected: full traceback in the log, one line for the user
        _unexpected(exc, log, log_path, smk.rule, dataset)
    finally:  # also on sys.exit
        digest.summarise()
        warnings.showwarning = saved_showwarning
    log.info("done in %.1f s, peak RSS %.2f GB", time.time() - t0, _timing.peak_rss_gb())


class WarningDigest:
    """Python warnings into the log, one line per kind: the first occurrence of each (category, message
    with digits blanked, first 80 characters) is logged with where it came from, later ones are only
    counted, and :meth:`summarise` logs one line per kind that repeated.

    Python's own once-per-location rule does not hold in a pipeline job: every ``warnings.catch_warnings``
    block (scanpy and anndata open many) resets the registry, so pandas' ``PerformanceWarning: DataFrame
    is highly fragmented`` filled the cluster log with hundreds of identical lines.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.counts: dict[tuple[str, str], int] = {}

    @staticmethod
    def key(message: Warning | str, category: type[Warning]) -> tuple[str, str]:
        lines = str(message).strip().splitlines()
        return category.__name__, re.sub(r"\d+", "#", lines[0] if lines else "")[:80]

    def showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        key = self.key(message, category)
        n = self.counts.get(key, 0)
        self.counts[key] = n + 1
        if n == 0:
            lines = str(message).strip().splitlines()
            self.logger.warning("%s: %s (%s:%s; repeats of this warning are counted, not logged)",
                                category.__name__, lines[0] if lines else "", filename, lineno)

    def summarise(self) -> None:
        """One line per warning kind that occurred more than once (then the counts restart)."""
        for (category, text), n in self.counts.items():
            if n > 1:
                self.logger.warning("%s '%s' occurred %d times in all (logged once)", category, text, n)
        self.counts = {k: 1 for k in self.counts}


def _unexpected(exc: BaseException, log: logging.Logger, log_path: Path, rule: str, dataset: str | None) -> NoReturn:
    """Full traceback in the log, one line for the user, exit status 1."""
    log.error("unexpected error\n%s", traceback.format_exc())
    print(f"metastem: dataset '{dataset}': rule {rule} failed unexpectedly ({type(exc).__name__}: {exc}). "
          f"Fix: see the traceback in {log_path} and report it.", file=sys.stderr)
    sys.exit(1)


def write_json_atomic(obj: dict, path: str | os.PathLike) -> None:
    from metastem.io import write_text_atomic

    write_text_atomic(json.dumps(obj, indent=2, default=_jsonable), path)


def _jsonable(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
