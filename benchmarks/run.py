"""Scaling benchmark: the whole pipeline vs plain scanpy scripts, per generator and size (`make bench`).

For each generator (``--generator metastem,tree``, both by default; see ``generators.py``) and size it
1. generates raw counts once into ``{out}/data/*.h5ad``, cached by generator, size and the generator's
   source, so generation is never counted as pipeline time (its own cost is in ``simulate.tsv``);
2. runs the pipeline (``snakemake --cores N``) on that file in a dedicated workdir
   ``{out}/runs/<generator>_<size>/`` with its own config and sheet (``format: h5ad``, ``values: counts``),
   and collects per rule Snakemake's ``benchmark:`` TSV (wall ``s``, ``cpu_time``, ``max_rss``), the exact
   peak RSS and CPU time of the script process from a probe loaded into every job's Python
   (``sitecustomize``; Snakemake samples memory every 30 s after the first 15 s), and the per-step lines
   every rule logs (``step <name>: <s> s, peak RSS <GB>``, ``metastem._timing``);
3. runs ``benchmarks/plain_scanpy.py`` (one process, what a user would write) on the same file, in the
   same invocation, once per variant (``--plain core,full``): ``core`` = QC metrics, filters, normalise,
   HVG, PCA, neighbors, UMAP, Leiden, DPT with scanpy's defaults; ``full`` = the same with scanpy's own
   ``sc.pp.scrublet`` defaults and Wilcoxon markers; ``lean`` = the pipeline's scrublet and parameters;
4. prints per size the rule table, each rule's steps, the end-to-end wall and largest peak RSS, the
   pipeline/script ratios of wall time, peak RSS and CPU for every variant (against issue 18's targets
   for ``core``), and the log-log slopes of time and memory vs cells; writes TSVs and ``scaling.png``.

Usage:
    .venv/bin/python benchmarks/run.py --sizes 20000,100000 --genes 20000 --out benchmarks/out
    make bench BENCH_ARGS="--sizes 1000,5000 --genes 2000 --generator tree"
A watchdog stops a run (and records it as failed) when the machine's available memory falls below
``--min-free-mb``, so a size that does not fit never pushes a shared node into the OOM killer.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "benchmarks"
PLAIN = HERE / "plain_scanpy.py"
GENERATE = HERE / "generators.py"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))

from generators import GENERATORS, source_hash  # noqa: E402
from plain_scanpy import SHARED_STEPS, VARIANTS  # noqa: E402

from metastem._timing import LINE as STEP_LINE  # noqa: E402

ISSUE_TARGETS = {"wall_small": 1.0, "wall_large": 1.25, "rss": 0.8, "large_from_cells": 60000}
RULE_ORDER = ["qc", "cluster", "malignant", "stemness", "pseudotime", "pathways", "niche", "report", "index"]
RULE_COLUMNS = ["generator", "cells", "genes", "nnz", "rule", "wall_s", "cpu_s", "max_rss_mb", "job_wall_s",
                "job_cpu_s", "job_peak_rss_mb", "load_1m"]
STEP_COLUMNS = ["generator", "cells", "rule", "step", "wall_s", "peak_rss_gb"]
RUN_COLUMNS = (["generator", "cells", "genes", "nnz", "status", "pipeline_wall_s", "rules_wall_s", "overhead_s",
                "pipeline_peak_rss_mb", "pipeline_cpu_s", "shared_wall_s", "shared_cpu_s"]
               + [f"{v}_{k}" for v in VARIANTS for k in ("status", "wall_s", "cpu_s", "peak_rss_mb", "shared_wall_s")]
               + [f"ratio_{k}_{v}" for v in VARIANTS for k in ("wall", "rss", "cpu", "shared_wall")]
               + ["load_before", "load_after"])
PLAIN_COLUMNS = ["generator", "cells", "genes", "variant", "step", "wall_s", "cpu_s", "peak_rss_mb"]
SIM_COLUMNS = ["generator", "cells", "genes", "library_size", "nnz_per_cell", "n_obs", "nnz",
               "median_genes_per_cell", "wall_s", "cpu_s", "peak_rss_mb", "file_mb", "cached"]
SLOPE_COLUMNS = ["generator", "series", "metric", "slope", "slope_two_largest", "n_sizes", "from_cells", "to_cells"]
SHARED_RULES = ("qc", "cluster")
INT_COLUMNS = ("cells", "genes", "nnz", "n_obs")
NAN = float("nan")

# Loaded by every Python process of a pipeline run (PYTHONPATH): for Snakemake `script:` jobs it appends
# one JSON line with the exact wall time, CPU time and peak RSS of that process.
PROBE = '''
import atexit, json, os, resource, sys, time
_T0 = time.time()
def _metastem_probe():
    smk = getattr(sys.modules.get("__main__"), "snakemake", None)
    out = os.environ.get("METASTEM_BENCH_PROBE")
    if smk is None or not out:
        return
    r = resource.getrusage(resource.RUSAGE_SELF)
    rec = {"rule": str(smk.rule), "dataset": str(getattr(smk.wildcards, "dataset", "")), "pid": os.getpid(),
           "wall_s": time.time() - _T0, "cpu_s": r.ru_utime + r.ru_stime, "peak_rss_mb": r.ru_maxrss / 1024}
    with open(out, "a") as fh:
        fh.write(json.dumps(rec) + "\\n")
atexit.register(_metastem_probe)
'''


def load() -> float:
    return round(os.getloadavg()[0], 2)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def ok(x) -> bool:
    return isinstance(x, (int, float)) and x == x


def div(a, b) -> float:
    return a / b if ok(a) and ok(b) and b else NAN


class Watchdog(threading.Thread):
    """Kill the process group of `proc` when available memory drops below `min_free_mb`."""

    def __init__(self, proc: subprocess.Popen, min_free_mb: float, timeout: float | None):
        super().__init__(daemon=True)
        self.proc, self.min_free_mb, self.timeout = proc, min_free_mb, timeout
        self.reason: str | None = None
        self.min_available_mb = math.inf

    def run(self) -> None:
        import psutil

        t0 = time.time()
        while self.proc.poll() is None:
            avail = psutil.virtual_memory().available / 2**20
            self.min_available_mb = min(self.min_available_mb, avail)
            if avail < self.min_free_mb:
                self.reason = f"stopped: available memory {avail:.0f} MB < --min-free-mb {self.min_free_mb:.0f}"
            elif self.timeout and time.time() - t0 > self.timeout:
                self.reason = f"stopped: over --timeout {self.timeout:.0f} s"
            if self.reason:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            time.sleep(0.25)


def run_watched(cmd: list[str], *, cwd: Path, env: dict, log: Path, min_free_mb: float,
                timeout: float | None) -> tuple[int, float, float, str | None]:
    """Run `cmd` in its own session (so the watchdog can stop all of it). Returns rc, wall, cpu, reason."""
    c0, t0 = children_cpu(), time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        dog = Watchdog(proc, min_free_mb, timeout)
        dog.start()
        rc = proc.wait()
        dog.join(1)
    return rc, time.perf_counter() - t0, children_cpu() - c0, dog.reason


# ---------------------------------------------------------------------------------------------- data

def data_stem(gen: str, cells: int, args) -> str:
    if gen == "metastem":  # the name earlier versions of the harness used: their cached files still count
        samples = f"_{args.samples}s" if args.samples != 3 else ""
        return f"sim_{cells}c_{args.genes}g_lib{args.library_size:g}{samples}_seed{args.seed}_{source_hash(gen)}"
    return f"{gen}_{cells}c_{args.genes}g_nnz{args.nnz_per_cell:g}_seed{args.seed}_{source_hash(gen)}"


def dataset_for(gen: str, cells: int, args, env: dict) -> dict:
    """The cached h5ad for this generator and size (generated on first use) and its facts."""
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    stem = data_stem(gen, cells, args)
    path, facts_path = data_dir / f"{stem}.h5ad", data_dir / f"{stem}.json"
    if path.exists() and facts_path.exists():
        facts = json.loads(facts_path.read_text())
        facts.update(generator=gen, cached=True, path=str(path))
        return facts
    print(f"bench: generating ({gen}) {cells} cells x {args.genes} genes -> {path}", flush=True)
    log = data_dir / f"{stem}.log"
    cmd = [sys.executable, str(GENERATE), gen, str(cells), str(path), "--genes", str(args.genes),
           "--seed", str(args.seed), "--library-size", str(args.library_size),
           "--nnz-per-cell", str(args.nnz_per_cell), "--samples", str(args.samples)]
    rc, wall, cpu, reason = run_watched(cmd, cwd=REPO, env=env, log=log, min_free_mb=args.min_free_mb, timeout=None)
    if rc != 0:
        raise SystemExit(f"bench: generating {cells} cells ({gen}) failed ({reason or f'exit {rc}'}); see {log}")
    out = json.loads([line for line in log.read_text().splitlines() if line.startswith("{")][-1])
    facts = {"generator": gen, "cells": cells, "genes": args.genes,
             "library_size": args.library_size if gen == "metastem" else NAN,
             "nnz_per_cell": args.nnz_per_cell if gen == "tree" else NAN, "n_obs": out["n_obs"],
             "nnz": out["nnz"], "median_genes_per_cell": out["median_genes_per_cell"], "wall_s": round(wall, 2),
             "cpu_s": round(cpu, 2), "simulate_s": round(out["simulate_s"], 2),
             "peak_rss_mb": round(out["peak_rss_mb"], 1),
             "file_mb": round(path.stat().st_size / 2**20, 1), "path": str(path)}
    facts_path.write_text(json.dumps(facts, indent=1))
    facts["cached"] = False
    return facts


# ------------------------------------------------------------------------------------------ pipeline

def write_workdir(wd: Path, dataset: str, h5ad: str, seed: int) -> None:
    (wd / "config").mkdir(parents=True, exist_ok=True)
    (wd / "config" / "config.yaml").write_text(f"datasets: config/datasets.tsv\noutdir: results\nseed: {seed}\n")
    header = ["dataset", "path", "format", "orientation", "species", "values", "labels", "params"]
    row = [dataset, h5ad, "h5ad", "", "human", "counts", "true_state", ""]
    (wd / "config" / "datasets.tsv").write_text("\t".join(header) + "\n" + "\t".join(row) + "\n")
    # Gene sets ship with the package ('metastem:' paths); a user's config/gene_sets may still be read
    # relative to the working directory, so link it when it holds files.
    link, target = wd / "config" / "gene_sets", REPO / "config" / "gene_sets"
    if not link.exists() and not link.is_symlink() and target.is_dir() and any(target.iterdir()):
        link.symlink_to(target, target_is_directory=True)


def read_benchmark_tsv(path: Path) -> dict:
    import pandas as pd

    df = pd.read_csv(path, sep="\t")
    rec = df.iloc[-1]
    num = lambda k: float(rec[k]) if k in rec and str(rec[k]) != "NA" else NAN  # noqa: E731
    return {"wall_s": num("s"), "cpu_s": num("cpu_time"), "max_rss_mb": num("max_rss")}


def parse_step_lines(log: Path) -> list[dict]:
    """The ``step <name>: <s> s, peak RSS <GB>`` lines of one rule's log, in order."""
    rows = []
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            m = STEP_LINE.search(line)
            if m:
                rows.append({"step": m["step"], "wall_s": float(m["wall_s"]), "peak_rss_gb": float(m["peak_rss_gb"])})
    return rows


def rule_key(rule: str) -> tuple:
    return (RULE_ORDER.index(rule) if rule in RULE_ORDER else len(RULE_ORDER), rule)


def run_pipeline(gen: str, facts: dict, args, env: dict) -> tuple[dict, list[dict], list[dict]]:
    cells = facts["cells"]
    dataset = f"{'sim' if gen == 'metastem' else gen}{cells}"
    wd = args.out / "runs" / f"{gen}_{cells}c_{args.genes}g"
    shutil.rmtree(wd / "results", ignore_errors=True)
    write_workdir(wd, dataset, facts["path"], args.seed)
    probe_file = wd / "probe.jsonl"
    probe_file.unlink(missing_ok=True)
    env = dict(env, METASTEM_BENCH_PROBE=str(probe_file))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", str(args.cores),
           "--configfile", "config/config.yaml", "--forceall", "--rerun-incomplete", "--nolock"]
    if args.until:
        cmd += ["--until", *args.until.split(",")]
    cmd += args.snakemake_args
    before = load()
    print(f"bench: [{gen}] pipeline on {facts['n_obs']} cells in {wd}  [load {before}]", flush=True)
    rc, wall, cpu, reason = run_watched(cmd, cwd=wd, env=env, log=wd / "snakemake.log",
                                        min_free_mb=args.min_free_mb, timeout=args.timeout)
    after = load()
    probes = {}
    if probe_file.exists():
        for line in probe_file.read_text().splitlines():
            rec = json.loads(line)
            if rec["dataset"] in (dataset, ""):  # "": rules over all datasets (the index page)
                probes[rec["rule"]] = rec
    rules, steps = [], []
    res = wd / "results"
    bench_dir = res / "benchmarks" / dataset
    done = {p.stem: read_benchmark_tsv(p) for p in sorted(bench_dir.glob("*.tsv"))} if bench_dir.is_dir() else {}
    for p in sorted((res / "benchmarks").glob("*.tsv")):  # rules over all datasets
        done.setdefault(p.stem, read_benchmark_tsv(p))
    logs = {p.stem: p for p in sorted((res / "logs" / dataset).glob("*.log"))}
    logs.update({p.stem: p for p in sorted((res / "logs").glob("*.log"))})
    key = {"generator": gen, "cells": facts["n_obs"]}
    for rule in sorted(set(done) | set(probes), key=rule_key):
        b, p = done.get(rule, {}), probes.get(rule, {})
        rules.append({**key, "genes": args.genes, "nnz": facts["nnz"], "rule": rule,
                      "wall_s": b.get("wall_s", NAN), "cpu_s": b.get("cpu_s", NAN),
                      "max_rss_mb": b.get("max_rss_mb", NAN),
                      "job_wall_s": p.get("wall_s", NAN), "job_cpu_s": p.get("cpu_s", NAN),
                      "job_peak_rss_mb": p.get("peak_rss_mb", NAN), "load_1m": before})
    for rule in sorted(logs, key=rule_key):
        steps += [{**key, "rule": rule, **s} for s in parse_step_lines(logs[rule])]
    status = "ok" if rc == 0 else (reason or f"failed (exit {rc}); see {wd / 'snakemake.log'}")
    if rc != 0:
        missing = [r for r in RULE_ORDER if r not in done and r in {"qc", "cluster", "stemness", "pseudotime",
                                                                     "pathways", "report"}]
        if missing:
            status += f"; first rule without a result: {missing[0]}"
    rules_wall = sum(r["wall_s"] for r in rules if ok(r["wall_s"]))
    peaks = [x for r in rules for x in (r["max_rss_mb"], r["job_peak_rss_mb"]) if ok(x)]
    shared = [r for r in rules if r["rule"] in SHARED_RULES]
    summary = {"status": status, "pipeline_wall_s": wall, "pipeline_cpu_s": cpu, "rules_wall_s": rules_wall,
               "overhead_s": wall - rules_wall, "pipeline_peak_rss_mb": max(peaks) if peaks else NAN,
               "shared_wall_s": sum(r["wall_s"] for r in shared) if len(shared) == len(SHARED_RULES) else NAN,
               "shared_cpu_s": sum(r["job_cpu_s"] for r in shared) if len(shared) == len(SHARED_RULES) else NAN,
               "shared_peak_rss_mb": max([x for r in shared for x in (r["max_rss_mb"], r["job_peak_rss_mb"])
                                          if ok(x)] or [NAN]),
               "load_before": before, "load_after": after}
    return summary, rules, steps


def run_plain(gen: str, variant: str, facts: dict, args, env: dict) -> tuple[dict, list[dict]]:
    import pandas as pd

    v = variant
    if v == "full" and facts["n_obs"] > args.plain_full_max_cells:
        return {f"{v}_status": f"skipped: over --plain-full-max-cells {args.plain_full_max_cells}"}, []
    wd = args.out / "runs" / f"{gen}_{facts['cells']}c_{args.genes}g"
    wd.mkdir(parents=True, exist_ok=True)
    steps_tsv = wd / f"plain_{v}_steps.tsv"
    steps_tsv.unlink(missing_ok=True)
    cmd = [sys.executable, str(PLAIN), facts["path"], "--out", str(steps_tsv), "--threads", str(args.cores),
           "--seed", str(args.seed), "--variant", v] + (
              ["--numba-cache"] if args.plain_jit == "cached" else []) + (
              ["--stop-after", args.plain_stop_after] if args.plain_stop_after else [])
    before = load()
    print(f"bench: [{gen}] plain scanpy script ({v}) on the same file  [load {before}]", flush=True)
    rc, wall, cpu, reason = run_watched(cmd, cwd=wd, env=env, log=wd / f"plain_{v}.log",
                                        min_free_mb=args.min_free_mb, timeout=args.timeout)
    if rc != 0 or not steps_tsv.exists():
        return {f"{v}_status": reason or f"failed (exit {rc}); see {wd / f'plain_{v}.log'}"}, []
    df = pd.read_csv(steps_tsv, sep="\t")
    steps = [{"generator": gen, "cells": facts["n_obs"], "genes": args.genes, "variant": v, **rec}
             for rec in df.to_dict("records")]
    shared = df["step"].isin(SHARED_STEPS)
    return {f"{v}_status": "ok", f"{v}_wall_s": wall, f"{v}_cpu_s": float(df["cpu_s"].sum()),
            f"{v}_shared_wall_s": float(df.loc[shared, "wall_s"].sum()),
            f"{v}_shared_cpu_s": float(df.loc[shared, "cpu_s"].sum()),
            f"{v}_peak_rss_mb": float(df["peak_rss_mb"].max())}, steps


def add_ratios(run: dict) -> None:
    for v in VARIANTS:
        if run.get(f"{v}_status") != "ok" or run.get("status") != "ok":
            continue
        run[f"ratio_wall_{v}"] = div(run.get("pipeline_wall_s"), run.get(f"{v}_wall_s"))
        run[f"ratio_rss_{v}"] = div(run.get("pipeline_peak_rss_mb"), run.get(f"{v}_peak_rss_mb"))
        run[f"ratio_cpu_{v}"] = div(run.get("pipeline_cpu_s"), run.get(f"{v}_cpu_s"))
        run[f"ratio_shared_wall_{v}"] = div(run.get("shared_wall_s"), run.get(f"{v}_shared_wall_s"))


# ------------------------------------------------------------------------------------------ reporting

def fmt(x, nd=1) -> str:
    if isinstance(x, float):
        return "NA" if x != x else f"{x:.{nd}f}"
    return str(x)


def print_table(rows: list[dict], cols: list[str], title: str | None = None) -> None:
    if title:
        print(title)
    cells = [[fmt(r.get(c, ""), 2 if c.startswith(("ratio", "load")) else 0 if c.endswith("_mb") else 1)
              for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def slope(xs: list[float], ys: list[float]) -> float:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and ok(y) and y > 0]
    if len(pts) < 2:
        return NAN
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else NAN


def series(all_rules: list[dict], runs: list[dict]) -> dict[tuple[str, str, str], list[tuple[int, float]]]:
    """(generator, series, metric) -> [(cells, value)] for rules, the pipeline and each plain variant."""
    out: dict = {}
    for r in all_rules:
        wall = r["wall_s"] if ok(r["wall_s"]) else r["job_wall_s"]  # no benchmark: directive
        out.setdefault((r["generator"], r["rule"], "wall_s"), []).append((r["cells"], wall))
        rss = max(r["max_rss_mb"], r["job_peak_rss_mb"]) if ok(r["job_peak_rss_mb"]) else r["max_rss_mb"]
        out.setdefault((r["generator"], r["rule"], "peak_rss_mb"), []).append((r["cells"], rss))
    for run in runs:
        g = run["generator"]
        if run["status"] == "ok":
            out.setdefault((g, "pipeline", "wall_s"), []).append((run["cells"], run["pipeline_wall_s"]))
            out.setdefault((g, "pipeline", "peak_rss_mb"), []).append((run["cells"], run["pipeline_peak_rss_mb"]))
        for v in VARIANTS:
            if run.get(f"{v}_status") == "ok":
                out.setdefault((g, f"scanpy_{v}", "wall_s"), []).append((run["cells"], run[f"{v}_wall_s"]))
                out.setdefault((g, f"scanpy_{v}", "peak_rss_mb"), []).append((run["cells"], run[f"{v}_peak_rss_mb"]))
    return out


def plot(ser: dict, slopes: dict, path: Path) -> None:
    os.environ.setdefault("MPLCONFIGDIR", str(REPO / ".cache" / "matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = sorted({k[0] for k in ser})
    fig, axes = plt.subplots(len(gens), 2, figsize=(11, 4.2 * len(gens)), squeeze=False)
    for row, gen in zip(axes, gens):
        for ax, metric, label in ((row[0], "wall_s", "wall time (s)"), (row[1], "peak_rss_mb", "peak RSS (MB)")):
            for (g, name, m), pts in sorted(ser.items()):
                if g != gen or m != metric or not pts:
                    continue
                pts = sorted(p for p in pts if ok(p[1]) and p[1] > 0)
                if not pts:
                    continue
                style = dict(lw=2.5, color="k") if name == "pipeline" else (
                    dict(lw=2.5, ls="--") if name.startswith("scanpy_") else dict(lw=1.2))
                s = slopes.get((g, name, m), NAN)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                        label=f"{name} (slope {s:.2f})" if ok(s) else name, **style)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("cells")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{gen}: {'time' if metric == 'wall_s' else 'peak RSS'} vs cells (log-log)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tsv(path: Path, rows: list[dict], cols: list[str]) -> None:
    with open(path, "w") as fh:
        fh.write("\t".join(cols) + "\n")
        for r in rows:
            fh.write("\t".join(fmt(r.get(c, ""), 3) for c in cols) + "\n")


def report_size(run: dict, rules: list[dict], steps: list[dict], plain_steps: list[dict]) -> None:
    print()
    print_table(rules, ["rule", "wall_s", "cpu_s", "max_rss_mb", "job_wall_s", "job_cpu_s", "job_peak_rss_mb"],
                title=f"== [{run['generator']}] {run['cells']} cells x {run['genes']} genes, nnz {run['nnz']:,} "
                      f"(load {run.get('load_before', 'NA')} -> {run.get('load_after', 'NA')}) ==")
    by_rule: dict[str, list[dict]] = {}
    for s in steps:
        by_rule.setdefault(s["rule"], []).append(s)
    if by_rule:
        print("steps per rule (wall s, process peak RSS GB so far):")
        for rule in sorted(by_rule, key=rule_key):
            print(f"  {rule:<11} " + " | ".join(f"{s['step']} {s['wall_s']:.1f} s {s['peak_rss_gb']:.2f} GB"
                                                 for s in by_rule[rule]))
    if run["status"] != "skipped":
        print(f"pipeline: {run['status']}; end-to-end wall {fmt(run.get('pipeline_wall_s', NAN))} s "
              f"(rules {fmt(run.get('rules_wall_s', NAN))} s + scheduling/job start-up {fmt(run.get('overhead_s', NAN))} s); "
              f"largest peak RSS {fmt(run.get('pipeline_peak_rss_mb', NAN), 0)} MB")
    for v in VARIANTS:
        st = run.get(f"{v}_status")
        if st in (None, "", "skipped"):
            continue
        vs = [s for s in plain_steps if s.get("variant") == v]
        if vs:
            print(f"scanpy {v} steps: " + ", ".join(f"{s['step']} {s['wall_s']:.1f}" for s in vs))
        print(f"scanpy {v}: {st}; wall {fmt(run.get(f'{v}_wall_s', NAN))} s, peak RSS "
              f"{fmt(run.get(f'{v}_peak_rss_mb', NAN), 0)} MB")
        if st == "ok" and run["status"] != "skipped":
            line = (f"ratio pipeline/scanpy {v}: whole run wall {fmt(run.get(f'ratio_wall_{v}', NAN), 2)}x, "
                    f"peak RSS {fmt(run.get(f'ratio_rss_{v}', NAN), 2)}x, CPU {fmt(run.get(f'ratio_cpu_{v}', NAN), 2)}x; "
                    f"qc+cluster vs read..markers wall {fmt(run.get(f'ratio_shared_wall_{v}', NAN), 2)}x")
            if v == "core":
                large = run["cells"] >= ISSUE_TARGETS["large_from_cells"]
                tw = ISSUE_TARGETS["wall_large" if large else "wall_small"]
                rw, rr = run.get("ratio_wall_core", NAN), run.get("ratio_rss_core", NAN)
                verdict = lambda r, t: "NA" if not ok(r) else ("met" if r <= t else "NOT met")  # noqa: E731
                line += (f"  [issue 18 targets: wall <= {tw:.2f}x {verdict(rw, tw)}, "
                         f"peak RSS <= {ISSUE_TARGETS['rss']:.2f}x {verdict(rr, ISSUE_TARGETS['rss'])}]")
            print(line)
    print(flush=True)


def _typed(rec: dict) -> dict:
    out = {}
    for k, v in rec.items():
        if k in INT_COLUMNS and isinstance(v, (int, float)) and v == v:
            v = int(v)
        elif k in ("status", "generator", "variant", "rule", "step") or k.endswith("_status"):
            v = "" if v != v else str(v)
        out[k] = v
    out.setdefault("generator", "metastem")  # results written before the tree generator existed
    if not out["generator"]:
        out["generator"] = "metastem"
    return out


def read_rows(path: Path) -> list[dict]:
    import pandas as pd

    if not path.is_file():
        return []
    df = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["NA", ""])
    return [_typed(rec) for rec in df.to_dict("records")]


RESULT_FILES = {"simulate.tsv": ("generator", "cells"), "runs.tsv": ("generator", "cells"),
                "rules.tsv": ("generator", "cells", "rule"), "rule_steps.tsv": None,
                "plain_steps.tsv": ("generator", "cells", "variant", "step")}


def finish(args, tables: dict[str, list[dict]], final: bool) -> None:
    """Merge with earlier results in --out (other sizes and generators kept), write, summarise, plot."""
    old = getattr(args, "_earlier", None) or {}
    redone = {(r["generator"], r["cells"]) for r in tables["runs.tsv"]}
    redone_sims = {(r["generator"], r["cells"]) for r in tables["simulate.tsv"]}
    merged = {}
    for name, rows in tables.items():
        drop = redone_sims if name == "simulate.tsv" else redone
        keep = [r for r in old.get(name, []) if (r["generator"], r["cells"]) not in drop]
        merged[name] = sorted(keep + rows, key=lambda r: (r["generator"], r["cells"]))
    cols = {"simulate.tsv": SIM_COLUMNS, "runs.tsv": RUN_COLUMNS, "rules.tsv": RULE_COLUMNS,
            "rule_steps.tsv": STEP_COLUMNS, "plain_steps.tsv": PLAIN_COLUMNS}
    for name, rows in merged.items():
        write_tsv(args.out / name, rows, cols[name])
    runs = merged["runs.tsv"]
    ser = series(merged["rules.tsv"], runs)
    slopes = {k: slope([p[0] for p in v], [p[1] for p in v]) for k, v in ser.items()}
    rows = []
    for (gen, name, metric), pts in sorted(ser.items()):
        xs = sorted(p[0] for p in pts)
        top2 = sorted(pts)[-2:]
        rows.append({"generator": gen, "series": name, "metric": metric, "slope": slopes[(gen, name, metric)],
                     "slope_two_largest": slope([p[0] for p in top2], [p[1] for p in top2]),
                     "n_sizes": len(pts), "from_cells": xs[0], "to_cells": xs[-1]})
    write_tsv(args.out / "slopes.tsv", rows, SLOPE_COLUMNS)
    if max([len({r["cells"] for r in runs if r["generator"] == g}) for g in {r["generator"] for r in runs}] or [0]) >= 2:
        try:
            plot(ser, slopes, args.out / "scaling.png")
        except Exception as exc:  # a plot must never lose the measurements
            print(f"bench: plot failed ({type(exc).__name__}: {exc})")
    if final:
        if len(runs) > 1:
            print_table(runs, ["generator", "cells", "status", "pipeline_wall_s", "pipeline_peak_rss_mb"]
                        + [f"{v}_wall_s" for v in VARIANTS if any(r.get(f"{v}_status") == "ok" for r in runs)]
                        + [f"ratio_{k}_{v}" for v in VARIANTS for k in ("wall", "rss")
                           if any(r.get(f"{v}_status") == "ok" for r in runs)] + ["load_before"],
                        title="== summary ==")
            print()
        if any(r["n_sizes"] >= 2 for r in rows):
            by: dict = {}
            for r in rows:
                by.setdefault((r["generator"], r["series"]), {})[r["metric"]] = (r["slope"], r["slope_two_largest"])
            print("log-log slope vs cells (1.0 = linear), over all sizes [between the two largest]:")
            na = (NAN, NAN)
            for (gen, name), d in by.items():
                (t, t2), (m, m2) = d.get("wall_s", na), d.get("peak_rss_mb", na)
                print(f"  {gen:<9} {name:<14} time {fmt(t, 2):>6} [{fmt(t2, 2):>5}]   "
                      f"memory {fmt(m, 2):>6} [{fmt(m2, 2):>5}]")
        print(f"bench: results in {args.out} ({', '.join(cols)}, slopes.tsv"
              f"{', scaling.png' if (args.out / 'scaling.png').exists() else ''})")


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Pipeline vs plain scanpy scaling benchmark.")
    ap.add_argument("--sizes", default="10000,50000,100000", help="cells to generate, comma-separated "
                    "(the metastem simulator adds 5%% doublets)")
    ap.add_argument("--genes", type=int, default=20000)
    ap.add_argument("--generator", default="metastem,tree",
                    help=f"comma-separated, from {', '.join(GENERATORS)} (see benchmarks/generators.py)")
    ap.add_argument("--library-size", type=float, default=2000.0,
                    help="metastem: simulate.mean_library_size; 2000 gives ~1600 genes detected per cell at 20k genes")
    ap.add_argument("--nnz-per-cell", type=float, default=1200.0, help="tree: stored values per cell (median)")
    ap.add_argument("--samples", type=int, default=3, help="metastem: patients of the simulated tumour (obs 'sample'; "
                    "several samples mean per-sample QC and Harmony)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--until", default="", help="stop the pipeline after these rules (snakemake --until), e.g. cluster")
    ap.add_argument("--plain", default="core,full",
                    help=f"plain scanpy variants to run, comma-separated from {', '.join(VARIANTS)}, or 'none' "
                         "(core: the core steps with scanpy's defaults; full: + scanpy's scrublet defaults and "
                         "Wilcoxon markers; lean: the pipeline's scrublet settings and parameters)")
    ap.add_argument("--plain-full-max-cells", type=int, default=40000,
                    help="skip the 'full' variant above this many cells: scanpy's scrublet defaults densify "
                         "cells x HVGs (11.8 GB at 20k cells) and cannot run 100k cells in 24 GB")
    ap.add_argument("--skip-plain", action="store_true", help="same as --plain none")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the plain scanpy scripts")
    ap.add_argument("--plain-stop-after", default=None, help="stop the plain scripts after this step (smoke tests)")
    ap.add_argument("--plain-jit", choices=["cached", "cold"], default="cached",
                    help="'cached': the scripts reuse compiled numba code from the same cache as the pipeline "
                         "(one line, metastem._numba_cache.enable()), so ratios measure the pipeline's structure; "
                         "'cold': as a user runs it, recompiling pynndescent/umap (~30 s) every time")
    ap.add_argument("--numba-cache", default=None,
                    help="NUMBA_CACHE_DIR for the runs (default: $NUMBA_CACHE_DIR or .cache/numba, as make sets it); "
                         "'fresh' = an empty folder per size, to measure cold JIT compilation")
    ap.add_argument("--min-free-mb", type=float, default=1500.0,
                    help="stop a run when the machine's available memory falls below this")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per pipeline or script run")
    ap.add_argument("--snakemake-args", nargs=argparse.REMAINDER, default=[],
                    help="everything after this is passed to snakemake")
    ap.add_argument("--fresh", action="store_true",
                    help="forget results of earlier invocations in --out (default: other sizes are kept and merged)")
    ap.add_argument("--combine", nargs="+", type=Path, default=None, metavar="DIR",
                    help="no runs: merge the TSVs of earlier --out folders (one size each, say) into --out, "
                         "then print the summary and slopes and draw the plot")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    args.generators = [g.strip() for g in args.generator.split(",") if g.strip()]
    bad = [g for g in args.generators if g not in GENERATORS]
    if bad:
        ap.error(f"--generator: unknown {', '.join(bad)} (known: {', '.join(GENERATORS)})")
    args.variants = [] if args.skip_plain or args.plain.strip() == "none" else \
        [v.strip() for v in args.plain.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"--plain: unknown {', '.join(bad)} (known: {', '.join(VARIANTS)}, none)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.combine:
        return combine(args)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    args._earlier = {} if args.fresh else {name: read_rows(args.out / name) for name in RESULT_FILES}
    probe_dir = args.out / "_probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(probe_dir), str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("MPLCONFIGDIR", str(REPO / ".cache" / "matplotlib"))
    if args.numba_cache and args.numba_cache != "fresh":
        env["NUMBA_CACHE_DIR"] = str(Path(args.numba_cache).resolve())
    else:
        env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    print(f"bench: generators {args.generators}, sizes {sizes}, {args.genes} genes, {args.cores} cores, "
          f"plain scanpy variants {args.variants or 'none'}, out {args.out}, load "
          f"{os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}", flush=True)

    tables: dict[str, list[dict]] = {name: [] for name in RESULT_FILES}
    todo = [(g, c) for c in sizes for g in args.generators]
    for i, (gen, cells) in enumerate(todo):
        facts = dataset_for(gen, cells, args, env)
        tables["simulate.tsv"].append(facts)
        print(f"bench: [{gen}] data {facts['n_obs']} cells, nnz {facts['nnz']:,}, median genes/cell "
              f"{facts['median_genes_per_cell']:.0f}, generated in {facts['wall_s']} s"
              f"{' (cached)' if facts['cached'] else ''}", flush=True)
        run_env = dict(env)
        if args.numba_cache == "fresh":
            fresh = args.out / "runs" / f"numba_fresh_{gen}_{cells}"
            shutil.rmtree(fresh, ignore_errors=True)
            run_env["NUMBA_CACHE_DIR"] = str(fresh)
        run = {"generator": gen, "cells": facts["n_obs"], "genes": args.genes, "nnz": facts["nnz"],
               "status": "skipped", **{f"{v}_status": "skipped" for v in VARIANTS}}
        steps: list[dict] = []
        rules: list[dict] = []
        if not args.skip_pipeline:
            summary, rules, steps = run_pipeline(gen, facts, args, run_env)
            run.update(summary)
        plain_steps: list[dict] = []
        for v in args.variants:
            if args.numba_cache == "fresh":
                shutil.rmtree(run_env["NUMBA_CACHE_DIR"], ignore_errors=True)
            psum, psteps = run_plain(gen, v, facts, args, run_env)
            run.update(psum)
            plain_steps += psteps
        add_ratios(run)
        tables["runs.tsv"].append(run)
        tables["rules.tsv"] += rules
        tables["rule_steps.tsv"] += steps
        tables["plain_steps.tsv"] += plain_steps
        report_size(run, rules, steps, plain_steps)
        # Write after every size, so a long run interrupted later still leaves its results.
        finish(args, tables, final=i == len(todo) - 1)
    return 0 if all(r["status"] in ("ok", "skipped") for r in tables["runs.tsv"]) else 1


def combine(args) -> int:
    """Merge earlier results (later folders win for a generator and size already seen); report them."""
    tables: dict[str, list[dict]] = {}
    for name, key in RESULT_FILES.items():
        seen: dict = {}
        for d in args.combine:
            rows = read_rows(d / name)
            sizes = {(r["generator"], r["cells"]) for r in rows}
            seen = {k: r for k, r in seen.items() if (k[0], k[1]) not in sizes}  # a later folder replaces a size
            for j, r in enumerate(rows):
                seen[(r["generator"], r["cells"], j)] = r
        tables[name] = list(seen.values())
    args.out.mkdir(parents=True, exist_ok=True)
    args._earlier = {}
    for run in tables["runs.tsv"]:
        k = (run["generator"], run["cells"])
        report_size(run, [r for r in tables["rules.tsv"] if (r["generator"], r["cells"]) == k],
                    [s for s in tables["rule_steps.tsv"] if (s["generator"], s["cells"]) == k],
                    [s for s in tables["plain_steps.tsv"] if (s["generator"], s["cells"]) == k])
    finish(args, tables, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
