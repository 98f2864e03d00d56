"""Wall time of the niche stage's ligand-receptor analysis (LIANA+, offline) as the dataset grows.

Usage (from the repository root):
    .venv/bin/python benchmarks/bench_niche.py                          # 20k and 100k cells, 8 samples
    .venv/bin/python benchmarks/bench_niche.py --sizes 100000 --samples 8 --genes 10000

Each size is ``simulate_tumour(cells, genes, n_samples)`` log-normalised, with the simulator's truth standing in
for the upstream stages (what is timed is the niche step alone): ``leiden`` = the true cell type of normal cells
and the true state of malignant ones, ``malignant`` = the true call, ``csc_like`` = stem-like malignant cells.
Timed: ``niche.niche_interactions`` with its defaults (pooled run and one run per sample, each on at most
``max_cells_per_group`` cells per group, 1000 permutations), once after a small warm-up call so that imports and
JIT are outside the timing (the first-call cost is printed apart). Compare with the pathway stage
(bench_pathways.py) and the clustering stage at the same size.

Measured 2026-12-03 (10,000 genes, 8 samples, 8 groups, nothing else running): 53.2 s at 20k cells (4,434
interactions), 48.1 s at 100k (4,389): the per-group subsample bounds the cost, which is 9 LIANA runs (pooled and
per sample), not the number of cells. First call 6.6 s. The printed RSS is the process peak, the simulation
included (4.7 GB at 100k). With the pathway stage's null and bootstrap (~18 s at 100k, bench_pathways.py) the
two take ~66 s at 100k cells, against 75 s for the clustering stage at 105k in the README (another day's run).
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import pandas as pd


def prepared(n_cells: int, n_genes: int, n_samples: int, seed: int = 0):
    from metastem.cluster import normalize
    from metastem.simulate import simulate_tumour

    a = simulate_tumour(n_cells, n_genes, seed=seed, n_samples=n_samples, frac_doublets=0.0, frac_low_quality=0.0)
    normalize(a, values="counts", target_sum=1e4)
    o = a.obs
    malignant = o["true_malignant"].to_numpy(bool)
    kind = np.where(malignant, "malignant_" + o["true_state"].astype(str), o["true_cell_type"].astype(str))
    o["leiden"] = pd.Categorical(np.asarray(kind, dtype=str))
    o["malignant"] = malignant
    o["csc_like"] = malignant & o["true_stem_like"].to_numpy(bool)
    return a


def main() -> None:
    from metastem import niche

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--genes", type=int, default=10_000)
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    t0 = time.perf_counter()
    niche.niche_interactions(prepared(2000, 2000, 2), n_perms=10, per_sample=False)
    print(f"first call (imports, LIANA resource, JIT) on 2,000 cells: {time.perf_counter() - t0:.1f} s")
    print(" cells samples  groups | niche s | interactions | peak RSS GB (process, simulation included)")
    for n in args.sizes:
        a = prepared(n, args.genes, args.samples)
        t0 = time.perf_counter()
        niche.niche_interactions(a)
        dt = time.perf_counter() - t0
        table = niche.interactions_table(a)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        groups = a.obs["leiden"].nunique()
        print(f"{a.n_obs:6d} {args.samples:7d} {groups:7d} | {dt:7.1f} | {len(table):12d} | {rss:.2f}")


if __name__ == "__main__":
    main()
