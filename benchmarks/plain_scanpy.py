"""The analysis a user would write instead of the pipeline: one process, plain scanpy, timed per step.

Reads an h5ad of raw counts and runs QC metrics + MAD filter (+ scrublet), normalisation, HVG, PCA,
neighbors, UMAP, Leiden (+ Wilcoxon markers) and DPT, then writes the result. Each step's wall time,
CPU time (user + system, this process) and the process's peak RSS so far are written as a TSV. Used
by ``benchmarks/run.py`` in three variants (``VARIANTS``), can be run on its own:

    .venv/bin/python benchmarks/plain_scanpy.py data.h5ad --out steps.tsv --threads 2 --variant core

- ``core``: the core steps only (no doublets, no markers), scanpy's defaults (``--params scanpy``);
- ``full``: scanpy's own ``sc.pp.scrublet`` defaults and Wilcoxon markers, scanpy's defaults;
- ``lean``: scrublet with the pipeline's settings, the pipeline's parameters (like for like).

``--params scanpy`` means each call's defaults: PCA 50 components (scanpy's default solver),
neighbors on all of them, UMAP and DPT defaults; the only choices made are 2,000 HVGs (seurat flavour,
as every tutorial) and Leiden with ``flavor='igraph', n_iterations=2, directed=False`` (what scanpy
1.11 warns its default will become). ``--params pipeline`` uses the pipeline's defaults instead
(30 PCs, arpack). Steps up to ``markers`` are the ones the pipeline's qc + cluster rules share with
this script (``SHARED_STEPS``); ``dpt`` and ``write`` complete the whole run.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

STEPS = ["import", "read", "qc_metrics", "mad_filter", "scrublet", "filter_genes", "normalise", "hvg", "pca",
         "neighbors", "umap", "leiden", "markers", "dpt", "write"]
VARIANTS = {  # name -> (scrublet, markers, params)
    "core": ("none", False, "scanpy"),
    "full": ("default", True, "scanpy"),
    "lean": ("lean", False, "pipeline"),
}
SHARED_STEPS = STEPS[:STEPS.index("markers") + 1]  # what the pipeline's qc + cluster rules also do
COLUMNS = ["step", "wall_s", "cpu_s", "peak_rss_mb"]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


class Timer:
    def __init__(self, t_start: float, cpu_start: float):
        self.rows = []
        self._t, self._c = t_start, cpu_start
        self.stop_after: str | None = None

    def step(self, name: str) -> bool:
        """Close the step `name` (it started where the previous one ended); True when the run stops here."""
        t, c = time.perf_counter(), _cpu()
        self.rows.append((name, t - self._t, c - self._c, _peak_mb()))
        print(f"plain_scanpy: {name:<13} {t - self._t:8.1f} s", file=sys.stderr, flush=True)
        self._t, self._c = t, c
        return name == self.stop_after

    def save(self, path: str) -> None:
        with open(path, "w") as fh:
            fh.write("\t".join(COLUMNS) + "\n")
            for name, wall, cpu, rss in self.rows:
                fh.write(f"{name}\t{wall:.3f}\t{cpu:.3f}\t{rss:.1f}\n")


def mad_outlier(x, nmads: float, upper_only: bool = False):
    import numpy as np

    med = np.median(x)
    mad = np.median(np.abs(x - med))
    if upper_only:
        return x > med + nmads * mad
    return (x < med - nmads * mad) | (x > med + nmads * mad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("h5ad", help="raw counts, cells x genes")
    ap.add_argument("--out", required=True, help="TSV of per-step timings")
    ap.add_argument("--result", default=None, help="h5ad written at the end (default: next to --out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default=None,
                    help="sets --scrublet, --markers and --params together (see the module docstring)")
    ap.add_argument("--scrublet", choices=["none", "default", "lean"], default="default",
                    help="'lean': sparse truncated SVD (mean_center=False) and 30 neighbours instead of "
                         "0.5*sqrt(cells), the settings that keep scrublet linear in memory and time; "
                         "'none': no doublet detection")
    ap.add_argument("--markers", action="store_true", help="Wilcoxon marker genes per Leiden cluster")
    ap.add_argument("--params", choices=["scanpy", "pipeline"], default="pipeline",
                    help="parameters of HVG..DPT: scanpy's defaults or the pipeline's")
    ap.add_argument("--stop-after", choices=STEPS[1:], default=None, help="stop after this step (smoke tests)")
    ap.add_argument("--numba-cache", action="store_true",
                    help="reuse compiled numba code across runs (NUMBA_CACHE_DIR), as the pipeline does")
    args = ap.parse_args(argv)
    if args.variant:
        args.scrublet, args.markers, args.params = VARIANTS[args.variant]
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    t0, c0 = time.perf_counter(), _cpu()
    timer = Timer(t0, c0)
    timer.stop_after = args.stop_after
    if args.numba_cache:
        from metastem import _numba_cache

        _numba_cache.enable()
    import numpy as np
    import scanpy as sc

    timer.step("import")

    adata = sc.read_h5ad(args.h5ad)
    if timer.step("read"):
        return timer.save(args.out)

    adata.var["mt"] = adata.var_names.str.startswith("MT-")
    adata.var["ribo"] = adata.var_names.str.match(r"^RP[SL]\d")
    adata.var["hb"] = adata.var_names.str.match(r"^HB[ABDGEMQZ]\d?$")
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt", "ribo", "hb"], percent_top=None, log1p=True, inplace=True)
    if timer.step("qc_metrics"):
        return timer.save(args.out)

    obs = adata.obs
    outlier = (mad_outlier(obs["log1p_total_counts"].to_numpy(), 5)
               | mad_outlier(obs["log1p_n_genes_by_counts"].to_numpy(), 5)
               | mad_outlier(obs["pct_counts_mt"].to_numpy(), 3, upper_only=True)
               | (obs["pct_counts_mt"].to_numpy() > 20))
    adata = adata[~outlier].copy()
    if timer.step("mad_filter"):
        return timer.save(args.out)

    if args.scrublet != "none":
        lean = dict(mean_center=False, n_neighbors=30, sim_doublet_ratio=1.0) if args.scrublet == "lean" else {}
        sc.pp.scrublet(adata, expected_doublet_rate=0.05, random_state=args.seed, verbose=False, **lean)
        adata = adata[~adata.obs["predicted_doublet"].to_numpy()].copy()
    if timer.step("scrublet"):
        return timer.save(args.out)

    sc.pp.filter_genes(adata, min_cells=3)
    if timer.step("filter_genes"):
        return timer.save(args.out)

    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    if timer.step("normalise"):
        return timer.save(args.out)

    sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat")
    if timer.step("hvg"):
        return timer.save(args.out)

    if args.params == "pipeline":
        sc.pp.pca(adata, n_comps=30, mask_var="highly_variable", svd_solver="arpack", random_state=args.seed)
    else:
        sc.pp.pca(adata, mask_var="highly_variable", random_state=args.seed)
    if timer.step("pca"):
        return timer.save(args.out)

    if args.params == "pipeline":
        sc.pp.neighbors(adata, n_neighbors=15, n_pcs=30, random_state=args.seed)
    else:
        sc.pp.neighbors(adata, random_state=args.seed)
    if timer.step("neighbors"):
        return timer.save(args.out)

    sc.tl.umap(adata, min_dist=0.5, random_state=args.seed)  # 0.5 is scanpy's default too
    if timer.step("umap"):
        return timer.save(args.out)

    sc.tl.leiden(adata, resolution=1.0, random_state=args.seed, flavor="igraph", n_iterations=2, directed=False)
    if timer.step("leiden"):
        return timer.save(args.out)

    if args.markers:
        sc.tl.rank_genes_groups(adata, "leiden", method="wilcoxon")
    if timer.step("markers"):
        return timer.save(args.out)

    # Root: the cell detecting the most genes (the simplest stemness proxy), as a user might pick it.
    adata.uns["iroot"] = int(np.argmax(adata.obs["n_genes_by_counts"].to_numpy()))
    sc.tl.diffmap(adata, n_comps=15)
    sc.tl.dpt(adata, n_dcs=10)
    if timer.step("dpt"):
        return timer.save(args.out)

    result = args.result or os.path.splitext(args.out)[0] + ".h5ad"
    adata.write_h5ad(result)
    timer.step("write")
    os.remove(result)  # only its cost matters; a million-cell result would fill the disk

    timer.save(args.out)
    print(f"plain_scanpy: total {time.perf_counter() - t0:.1f} s, peak RSS {_peak_mb():.0f} MB, "
          f"{adata.n_obs} cells x {adata.n_vars} genes after QC", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
