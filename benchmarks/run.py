"""Scaling benchmark: the whole pipeline vs a plain scanpy script, per dataset size (`make bench`).

For each size it
1. simulates raw counts once (``metastem.simulate.simulate_tumour``, 20k genes, ~1600 genes detected per
   cell at the default library size) into ``{out}/data/*.h5ad``, cached by size, so simulation is never
   counted as pipeline time (its own cost is reported in ``simulate.tsv``);
2. runs the pipeline (``snakemake --cores N``) on that file in a dedicated workdir
   ``{out}/runs/<size>/`` with its own config and sheet (``format: h5ad``), and collects per rule
   Snakemake's ``benchmark:`` TSV (wall ``s``, ``cpu_time``, ``max_rss``) and, from a probe loaded into
   every job's Python process (``sitecustomize``), the exact peak RSS (getrusage) and CPU time of the
   script process — Snakemake samples memory every 0.5 s for 15 s, then only every 30 s;
3. runs ``benchmarks/plain_scanpy.py`` (one process, what a user would write) on the same file;
4. prints a table per rule, the end-to-end wall and largest peak RSS, the pipeline/script ratios
   (shared steps = qc + cluster vs the script's read..leiden; whole run = end-to-end vs script total),
   and the log-log slopes of time and memory vs cells; writes TSVs and ``scaling.png`` to ``--out``.

Usage:
    .venv/bin/python benchmarks/run.py --sizes 10000,50000,100000 --genes 20000 --out benchmarks/out
    make bench BENCH_ARGS="--sizes 1000,5000 --genes 2000"
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
PLAIN = REPO / "benchmarks" / "plain_scanpy.py"

RULE_COLUMNS = ["cells", "genes", "nnz", "rule", "wall_s", "cpu_s", "max_rss_mb", "job_wall_s", "job_cpu_s",
                "job_peak_rss_mb", "load_1m"]
RUN_COLUMNS = ["cells", "genes", "nnz", "status", "pipeline_wall_s", "rules_wall_s", "overhead_s",
               "pipeline_peak_rss_mb", "shared_wall_s", "plain_status", "plain_wall_s", "plain_shared_wall_s",
               "plain_peak_rss_mb", "ratio_shared_wall", "ratio_shared_rss", "ratio_wall", "ratio_rss",
               "pipeline_cpu_s", "plain_cpu_s", "ratio_shared_cpu", "ratio_cpu", "load_before", "load_after"]
PLAIN_COLUMNS = ["cells", "genes", "step", "wall_s", "cpu_s", "peak_rss_mb"]
SIM_COLUMNS = ["cells", "genes", "library_size", "n_obs", "nnz", "median_genes_per_cell", "wall_s", "cpu_s",
               "peak_rss_mb", "file_mb", "cached"]
SLOPE_COLUMNS = ["series", "metric", "slope", "slope_two_largest", "n_sizes", "from_cells", "to_cells"]
SHARED_RULES = ("qc", "cluster")

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

def simulate_to_h5ad(cells: int, genes: int, library_size: float, seed: int, path: str) -> None:
    """(Child process.) Simulate and write the h5ad atomically; print a JSON line of facts."""
    import numpy as np

    from metastem.simulate import simulate_tumour

    t0 = time.perf_counter()
    adata = simulate_tumour(cells, genes, seed=seed, mean_library_size=library_size)
    sim_s = time.perf_counter() - t0
    tmp = path + ".tmp.h5ad"
    adata.write_h5ad(tmp)
    os.replace(tmp, path)
    n_per_cell = np.diff(adata.X.indptr)
    print(json.dumps({"n_obs": int(adata.n_obs), "nnz": int(adata.X.nnz), "simulate_s": sim_s,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "median_genes_per_cell": float(np.median(n_per_cell))}))


def dataset_for(cells: int, args, env: dict) -> dict:
    """The cached h5ad for this size (simulated on first use) and its facts."""
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    # keyed by the simulator's source too: a changed simulator never reuses stale data
    import hashlib

    sim_src = hashlib.sha1((REPO / "src" / "metastem" / "simulate.py").read_bytes()).hexdigest()[:8]
    stem = f"sim_{cells}c_{args.genes}g_lib{args.library_size:g}_seed{args.seed}_{sim_src}"
    path, facts_path = data_dir / f"{stem}.h5ad", data_dir / f"{stem}.json"
    if path.exists() and facts_path.exists():
        facts = json.loads(facts_path.read_text())
        facts["cached"] = True
        return facts
    print(f"bench: simulating {cells} cells x {args.genes} genes -> {path}", flush=True)
    log = data_dir / f"{stem}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_simulate",
           f"{cells},{args.genes},{args.library_size},{args.seed},{path}"]
    rc, wall, cpu, reason = run_watched(cmd, cwd=REPO, env=env, log=log, min_free_mb=args.min_free_mb, timeout=None)
    if rc != 0:
        raise SystemExit(f"bench: simulation of {cells} cells failed ({reason or f'exit {rc}'}); see {log}")
    out = json.loads([line for line in log.read_text().splitlines() if line.startswith("{")][-1])
    facts = {"cells": cells, "genes": args.genes, "library_size": args.library_size, "n_obs": out["n_obs"],
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
    # Rules read curated gene sets by paths relative to the working directory.
    link = wd / "config" / "gene_sets"
    if not link.exists():
        link.symlink_to(REPO / "config" / "gene_sets", target_is_directory=True)


def read_benchmark_tsv(path: Path) -> dict:
    import pandas as pd

    df = pd.read_csv(path, sep="\t")
    rec = df.iloc[-1]
    num = lambda k: float(rec[k]) if k in rec and str(rec[k]) != "NA" else float("nan")  # noqa: E731
    return {"wall_s": num("s"), "cpu_s": num("cpu_time"), "max_rss_mb": num("max_rss")}


def run_pipeline(facts: dict, args, env: dict) -> tuple[dict, list[dict]]:
    cells = facts["cells"]
    dataset = f"sim{cells}"
    wd = args.out / "runs" / f"{cells}c_{args.genes}g"
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
    print(f"bench: pipeline on {facts['n_obs']} cells ({cells} + doublets) in {wd}  [load {before}]", flush=True)
    rc, wall, cpu, reason = run_watched(cmd, cwd=wd, env=env, log=wd / "snakemake.log",
                                        min_free_mb=args.min_free_mb, timeout=args.timeout)
    after = load()
    probes = {}
    if probe_file.exists():
        for line in probe_file.read_text().splitlines():
            rec = json.loads(line)
            if rec["dataset"] in (dataset, ""):  # "": rules over all datasets (the index page)
                probes[rec["rule"]] = rec
    rules = []
    bench_dir = wd / "results" / "benchmarks" / dataset
    done = {p.stem: read_benchmark_tsv(p) for p in sorted(bench_dir.glob("*.tsv"))} if bench_dir.is_dir() else {}
    for p in sorted((wd / "results" / "benchmarks").glob("*.tsv")):  # rules over all datasets
        done.setdefault(p.stem, read_benchmark_tsv(p))
    order = ["qc", "cluster", "stemness", "pseudotime", "pathways", "report", "index"]
    for rule in sorted(set(done) | set(probes), key=lambda r: (order.index(r) if r in order else 99, r)):
        b, p = done.get(rule, {}), probes.get(rule, {})
        rules.append({"cells": facts["n_obs"], "genes": args.genes, "nnz": facts["nnz"], "rule": rule,
                      "wall_s": b.get("wall_s", float("nan")), "cpu_s": b.get("cpu_s", float("nan")),
                      "max_rss_mb": b.get("max_rss_mb", float("nan")),
                      "job_wall_s": p.get("wall_s", float("nan")), "job_cpu_s": p.get("cpu_s", float("nan")),
                      "job_peak_rss_mb": p.get("peak_rss_mb", float("nan")), "load_1m": before})
    status = "ok" if rc == 0 else (reason or f"failed (exit {rc}); see {wd / 'snakemake.log'}")
    if rc != 0:
        missing = [r for r in order if r not in done]
        if missing:
            status += f"; first rule without a result: {missing[0]}"
    rules_wall = sum(r["wall_s"] for r in rules if r["wall_s"] == r["wall_s"])
    peaks = [max(r["max_rss_mb"], r["job_peak_rss_mb"]) for r in rules
             if r["max_rss_mb"] == r["max_rss_mb"] or r["job_peak_rss_mb"] == r["job_peak_rss_mb"]]
    peaks = [x for x in peaks if x == x]
    summary = {"status": status, "pipeline_wall_s": wall, "pipeline_cpu_s": cpu, "rules_wall_s": rules_wall,
               "overhead_s": wall - rules_wall, "pipeline_peak_rss_mb": max(peaks) if peaks else float("nan"),
               "shared_wall_s": sum(r["wall_s"] for r in rules if r["rule"] in SHARED_RULES)
               if all(any(r["rule"] == s for r in rules) for s in SHARED_RULES) else float("nan"),
               "shared_cpu_s": sum(r["job_cpu_s"] for r in rules if r["rule"] in SHARED_RULES),
               "shared_peak_rss_mb": max([max(r["max_rss_mb"], r["job_peak_rss_mb"]) for r in rules
                                          if r["rule"] in SHARED_RULES] or [float("nan")]),
               "load_before": before, "load_after": after}
    return summary, rules


def run_plain(facts: dict, args, env: dict) -> tuple[dict, list[dict]]:
    import pandas as pd

    wd = args.out / "runs" / f"{facts['cells']}c_{args.genes}g"
    wd.mkdir(parents=True, exist_ok=True)
    steps_tsv = wd / "plain_steps.tsv"
    steps_tsv.unlink(missing_ok=True)
    cmd = [sys.executable, str(PLAIN), facts["path"], "--out", str(steps_tsv), "--threads", str(args.cores),
           "--seed", str(args.seed), "--scrublet", args.plain_scrublet] + (
              ["--numba-cache"] if args.plain_jit == "cached" else []) + (
              ["--stop-after", args.plain_stop_after] if args.plain_stop_after else [])
    before = load()
    print(f"bench: plain scanpy script on the same file  [load {before}]", flush=True)
    rc, wall, cpu, reason = run_watched(cmd, cwd=wd, env=env, log=wd / "plain_scanpy.log",
                                        min_free_mb=args.min_free_mb, timeout=args.timeout)
    if rc != 0 or not steps_tsv.exists():
        return {"plain_status": reason or f"failed (exit {rc}); see {wd / 'plain_scanpy.log'}",
                "plain_wall_s": float("nan"), "plain_shared_wall_s": float("nan"),
                "plain_peak_rss_mb": float("nan")}, []
    sys.path.insert(0, str(PLAIN.parent))
    from plain_scanpy import SHARED_STEPS

    df = pd.read_csv(steps_tsv, sep="\t")
    steps = [{"cells": facts["n_obs"], "genes": args.genes, **rec} for rec in df.to_dict("records")]
    return {"plain_status": "ok", "plain_wall_s": wall, "plain_cpu_s": float(df["cpu_s"].sum()),
            "plain_shared_cpu_s": float(df.loc[df["step"].isin(SHARED_STEPS), "cpu_s"].sum()),
            "plain_shared_wall_s": float(df.loc[df["step"].isin(SHARED_STEPS), "wall_s"].sum()),
            "plain_shared_peak_rss_mb": float(df.loc[df["step"].isin(SHARED_STEPS), "peak_rss_mb"].max()),
            "plain_peak_rss_mb": float(df["peak_rss_mb"].max())}, steps


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
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y == y and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else float("nan")


def series(all_rules: list[dict], runs: list[dict]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(series, metric) -> [(cells, value)] for rules, the pipeline end-to-end and the plain script."""
    out: dict = {}
    for r in all_rules:
        wall = r["wall_s"] if r["wall_s"] == r["wall_s"] else r["job_wall_s"]  # no benchmark: directive
        out.setdefault((r["rule"], "wall_s"), []).append((r["cells"], wall))
        rss = max(r["max_rss_mb"], r["job_peak_rss_mb"]) if r["job_peak_rss_mb"] == r["job_peak_rss_mb"] else r["max_rss_mb"]
        out.setdefault((r["rule"], "peak_rss_mb"), []).append((r["cells"], rss))
    for run in runs:
        if run["status"] == "ok":
            out.setdefault(("pipeline", "wall_s"), []).append((run["cells"], run["pipeline_wall_s"]))
            out.setdefault(("pipeline", "peak_rss_mb"), []).append((run["cells"], run["pipeline_peak_rss_mb"]))
        if run.get("plain_status") == "ok":
            out.setdefault(("plain_scanpy", "wall_s"), []).append((run["cells"], run["plain_wall_s"]))
            out.setdefault(("plain_scanpy", "peak_rss_mb"), []).append((run["cells"], run["plain_peak_rss_mb"]))
    return out


def plot(ser: dict, slopes: dict, path: Path) -> None:
    os.environ.setdefault("MPLCONFIGDIR", str(REPO / ".cache" / "matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "wall_s", "wall time (s)"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
        for (name, m), pts in sorted(ser.items()):
            if m != metric or not pts:
                continue
            pts = sorted(p for p in pts if p[1] == p[1] and p[1] > 0)
            if not pts:
                continue
            style = dict(lw=2.5, color="k") if name == "pipeline" else (
                dict(lw=2.5, ls="--", color="grey") if name == "plain_scanpy" else dict(lw=1.2))
            s = slopes.get((name, m), float("nan"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                    label=f"{name} (slope {s:.2f})" if s == s else name, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cells")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_title("time vs cells (log-log)")
    axes[1].set_title("peak RSS vs cells (log-log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tsv(path: Path, rows: list[dict], cols: list[str]) -> None:
    with open(path, "w") as fh:
        fh.write("\t".join(cols) + "\n")
        for r in rows:
            fh.write("\t".join(fmt(r.get(c, ""), 3) for c in cols) + "\n")


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Pipeline vs plain scanpy scaling benchmark.")
    ap.add_argument("--sizes", default="10000,50000,100000", help="cells to simulate (before 5%% doublets), comma-separated")
    ap.add_argument("--genes", type=int, default=20000)
    ap.add_argument("--library-size", type=float, default=2000.0,
                    help="simulate.mean_library_size; 2000 gives ~1600 genes detected per cell at 20k genes")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--until", default="", help="stop the pipeline after these rules (snakemake --until), e.g. cluster")
    ap.add_argument("--skip-plain", action="store_true", help="do not run the plain scanpy script")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the plain scanpy script")
    ap.add_argument("--plain-stop-after", default=None, help="stop the plain script after this step (smoke tests)")
    ap.add_argument("--plain-jit", choices=["cached", "cold"], default="cached",
                    help="'cached': the script reuses compiled numba code from the same cache as the pipeline "
                         "(one line, metastem._numba_cache.enable()), so ratios measure the pipeline's structure; "
                         "'cold': as a user runs it, recompiling pynndescent/umap (~30 s) every time")
    ap.add_argument("--plain-scrublet", choices=["default", "lean"], default="lean",
                    help="scrublet settings of the plain script: 'lean' = the pipeline's (sparse SVD, 30 neighbours, "
                         "1 simulated doublet per cell), or scanpy's defaults (they densify cells x HVGs: ~100k cells "
                         "at most in 24 GB)")
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
    ap.add_argument("--_simulate", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._simulate:
        cells, genes, lib, seed, path = args._simulate.split(",", 4)
        simulate_to_h5ad(int(cells), int(genes), float(lib), int(seed), path)
        return 0
    if args.combine:
        return combine(args)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    args._earlier = earlier_results(args)
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
    print(f"bench: sizes {sizes}, {args.genes} genes, {args.cores} cores, out {args.out}, "
          f"load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}", flush=True)

    sims, runs, all_rules, all_steps = [], [], [], []
    for cells in sizes:
        facts = dataset_for(cells, args, env)
        sims.append(facts)
        print(f"bench: data {facts['n_obs']} cells, nnz {facts['nnz']:,}, median genes/cell "
              f"{facts['median_genes_per_cell']:.0f}, simulated in {facts['wall_s']} s"
              f"{' (cached)' if facts['cached'] else ''}", flush=True)
        run_env = dict(env)
        if args.numba_cache == "fresh":
            fresh = args.out / "runs" / f"numba_fresh_{cells}"
            shutil.rmtree(fresh, ignore_errors=True)
            run_env["NUMBA_CACHE_DIR"] = str(fresh)
        run = {"cells": facts["n_obs"], "genes": args.genes, "nnz": facts["nnz"], "status": "skipped",
               "plain_status": "skipped"}
        if not args.skip_pipeline:
            summary, rules = run_pipeline(facts, args, run_env)
            run.update(summary)
            all_rules += rules
        if not args.skip_plain:
            if args.numba_cache == "fresh":
                shutil.rmtree(run_env["NUMBA_CACHE_DIR"], ignore_errors=True)
            psum, steps = run_plain(facts, args, run_env)
            run.update(psum)
            all_steps += steps
        nan = float("nan")
        div = lambda a, b: a / b if (a == a and b == b and b) else nan  # noqa: E731
        run["ratio_shared_wall"] = div(run.get("shared_wall_s", nan), run.get("plain_shared_wall_s", nan))
        run["ratio_shared_rss"] = div(run.get("shared_peak_rss_mb", nan), run.get("plain_shared_peak_rss_mb", nan))
        run["ratio_wall"] = div(run.get("pipeline_wall_s", nan), run.get("plain_wall_s", nan))
        run["ratio_rss"] = div(run.get("pipeline_peak_rss_mb", nan), run.get("plain_peak_rss_mb", nan))
        run["ratio_shared_cpu"] = div(run.get("shared_cpu_s", nan), run.get("plain_shared_cpu_s", nan))
        run["ratio_cpu"] = div(run.get("pipeline_cpu_s", nan), run.get("plain_cpu_s", nan))
        runs.append(run)
        report_size(run, [r for r in all_rules if r["cells"] == run["cells"]],
                    [s for s in all_steps if s["cells"] == run["cells"]])
        # Write after every size, so a long run interrupted later still leaves its results.
        finish(args, sims, runs, all_rules, all_steps, final=cells == sizes[-1])
    return 0 if all(r["status"] in ("ok", "skipped") for r in runs) else 1


def combine(args) -> int:
    """Merge earlier results (later folders win for a size already seen) and report them together."""
    import pandas as pd

    def load_rows(name: str, key: list[str]) -> list[dict]:
        frames = [pd.read_csv(d / name, sep="\t") for d in args.combine if (d / name).is_file()]
        frames = [f for f in frames if len(f)]
        if not frames:
            return []
        df = pd.concat(frames).drop_duplicates(subset=key, keep="last").sort_values("cells", kind="stable")
        return [{k: (v if not isinstance(v, (int, float)) or isinstance(v, bool) else float(v)
                     if k not in ("cells", "genes", "nnz") else int(v)) for k, v in rec.items()}
                for rec in df.to_dict("records")]

    runs = load_rows("runs.tsv", ["cells"])
    for r in runs:
        for k in ("status", "plain_status"):
            r[k] = str(r.get(k, "skipped"))
    all_rules = load_rows("rules.tsv", ["cells", "rule"])
    all_steps = load_rows("plain_steps.tsv", ["cells", "step"])
    sims = load_rows("simulate.tsv", ["cells"])
    args.out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        report_size(run, [r for r in all_rules if r["cells"] == run["cells"]],
                    [s for s in all_steps if s["cells"] == run["cells"]])
    finish(args, sims, runs, all_rules, all_steps, final=True)
    return 0


def report_size(run: dict, rules: list[dict], steps: list[dict]) -> None:
    print()
    print_table(rules, ["rule", "wall_s", "cpu_s", "max_rss_mb", "job_wall_s", "job_cpu_s", "job_peak_rss_mb"],
                title=f"== {run['cells']} cells x {run['genes']} genes, nnz {run['nnz']:,} "
                      f"(load {run.get('load_before', 'NA')} -> {run.get('load_after', 'NA')}) ==")
    if run["status"] != "skipped":
        print(f"pipeline: {run['status']}; end-to-end wall {fmt(run['pipeline_wall_s'])} s "
              f"(rules {fmt(run['rules_wall_s'])} s + scheduling/job start-up {fmt(run['overhead_s'])} s); "
              f"largest peak RSS {fmt(run['pipeline_peak_rss_mb'], 0)} MB")
    by = {r["rule"]: r for r in rules}
    if all(k in by for k in ("cluster", "stemness", "pseudotime", "pathways")):
        down = sum(by[k]["wall_s"] for k in ("stemness", "pseudotime", "pathways"))
        down_cpu = sum(by[k]["job_cpu_s"] for k in ("stemness", "pseudotime", "pathways"))
        print(f"stemness+pseudotime+pathways: wall {fmt(down)} s vs cluster {fmt(by['cluster']['wall_s'])} s; "
              f"CPU {fmt(down_cpu)} s vs {fmt(by['cluster']['job_cpu_s'])} s")
    if steps:
        print("plain scanpy steps: " + ", ".join(f"{s['step']} {s['wall_s']:.1f}" for s in steps))
    if run.get("plain_status") not in (None, "skipped"):
        print(f"plain scanpy: {run['plain_status']}; wall {fmt(run.get('plain_wall_s'))} s, shared steps "
              f"{fmt(run.get('plain_shared_wall_s'))} s, peak RSS {fmt(run.get('plain_peak_rss_mb'), 0)} MB")
        print(f"ratio pipeline/script: shared steps (qc+cluster vs read..leiden) wall "
              f"{fmt(run['ratio_shared_wall'], 2)}x, peak RSS {fmt(run['ratio_shared_rss'], 2)}x; "
              f"whole run wall {fmt(run['ratio_wall'], 2)}x, peak RSS {fmt(run['ratio_rss'], 2)}x; CPU time "
              f"(less sensitive to load): shared {fmt(run['ratio_shared_cpu'], 2)}x, whole {fmt(run['ratio_cpu'], 2)}x")
    print(flush=True)


def earlier_results(args) -> dict[str, list[dict]]:
    """Rows already in --out from earlier invocations (other sizes are kept unless --fresh)."""
    import pandas as pd

    out = {}
    for name in ("simulate.tsv", "runs.tsv", "rules.tsv", "plain_steps.tsv"):
        path = args.out / name
        rows = []
        if path.is_file() and not args.fresh:
            df = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["NA", ""])
            for rec in df.to_dict("records"):
                rows.append({k: (int(v) if k in ("cells", "genes", "nnz", "n_obs") and v == v else v)
                             for k, v in rec.items()})
        out[name] = rows
    return out


def finish(args, sims, runs, all_rules, all_steps, final: bool) -> None:
    old = getattr(args, "_earlier", None)
    if old:  # keep earlier sizes that this invocation did not re-run
        done = {r["cells"] for r in runs}
        sims = [r for r in old["simulate.tsv"] if r["cells"] not in {s["cells"] for s in sims}] + sims
        runs = [r for r in old["runs.tsv"] if r["cells"] not in done] + runs
        all_rules = [r for r in old["rules.tsv"] if r["cells"] not in done] + all_rules
        all_steps = [r for r in old["plain_steps.tsv"] if r["cells"] not in done] + all_steps
        for rows in (sims, runs, all_rules, all_steps):
            rows.sort(key=lambda r: r["cells"])
    write_tsv(args.out / "simulate.tsv", sims, SIM_COLUMNS)
    write_tsv(args.out / "runs.tsv", runs, RUN_COLUMNS)
    write_tsv(args.out / "rules.tsv", all_rules, RULE_COLUMNS)
    write_tsv(args.out / "plain_steps.tsv", all_steps, PLAIN_COLUMNS)
    ser = series(all_rules, runs)
    slopes = {k: slope([p[0] for p in v], [p[1] for p in v]) for k, v in ser.items()}
    rows = []
    for (name, metric), pts in sorted(ser.items()):
        xs = sorted(p[0] for p in pts)
        top2 = sorted(pts)[-2:]
        rows.append({"series": name, "metric": metric, "slope": slopes[(name, metric)],
                     "slope_two_largest": slope([p[0] for p in top2], [p[1] for p in top2]),
                     "n_sizes": len(pts), "from_cells": xs[0], "to_cells": xs[-1]})
    write_tsv(args.out / "slopes.tsv", rows, SLOPE_COLUMNS)
    if len({r["cells"] for r in runs}) >= 2:
        try:
            plot(ser, slopes, args.out / "scaling.png")
        except Exception as exc:  # a plot must never lose the measurements
            print(f"bench: plot failed ({type(exc).__name__}: {exc})")
    if final:
        if len(runs) > 1:
            print_table(runs, ["cells", "status", "pipeline_wall_s", "pipeline_peak_rss_mb", "plain_wall_s",
                               "plain_peak_rss_mb", "ratio_shared_wall", "ratio_wall", "ratio_rss", "load_before"],
                        title="== summary ==")
            print()
        if any(r["n_sizes"] >= 2 for r in rows):
            by = {}
            for r in rows:
                by.setdefault(r["series"], {})[r["metric"]] = (r["slope"], r["slope_two_largest"])
            print("log-log slope vs cells (1.0 = linear), over all sizes [between the two largest]:")
            na = (float("nan"), float("nan"))
            for name, d in by.items():
                (t, t2), (m, m2) = d.get("wall_s", na), d.get("peak_rss_mb", na)
                print(f"  {name:<14} time {fmt(t, 2):>6} [{fmt(t2, 2):>5}]   memory {fmt(m, 2):>6} [{fmt(m2, 2):>5}]")
        print(f"bench: results in {args.out} (rules.tsv, runs.tsv, plain_steps.tsv, simulate.tsv, slopes.tsv"
              f"{', scaling.png' if (args.out / 'scaling.png').exists() else ''})")


if __name__ == "__main__":
    sys.exit(main())
