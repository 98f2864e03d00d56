"""Time and peak memory of the pathway stage: scores with the matched null, and separately GSEA/ssGSEA.

Usage (from the repository root):
    .venv/bin/python benchmarks/bench_pathways.py                       # 20k, 50k and 100k cells (minutes)
    .venv/bin/python benchmarks/bench_pathways.py --quick               # smoke test, < 1 min
    .venv/bin/python benchmarks/bench_pathways.py --sizes 100000 --genes 10000

Each size is simulated with ``metastem.simulate.simulate_tumour`` and log-normalised; Leiden
clusters are replaced by the simulator's true states (clustering is not what is timed) and
``csc_like`` by ``true_stem_like``; cells are split into four samples so the per-sample statistics
run as they do on a cohort. Timed steps, each with tracemalloc's peak of Python/numpy allocations
(tracemalloc slows the timing a little):
- ``score_pathways`` with the config defaults: AUCell of the curated sets and of ``n_null`` (1000)
  matched random sets per set in one pass over the cells, per-sample effects, bootstrap CIs;
- the same with ``n_null=0`` and ``n_boot=100`` (what the null and the bootstrap add);
- the Wilcoxon ranking of CSC-like vs other cells, then GSEA prerank (gseapy);
- ssGSEA of per-cluster pseudobulk profiles (gseapy).
Compare ``score`` with the clustering stage at the same size (README: 75 s at 105k cells).

Measured 2026-12-02 (10,000 genes, 25 sets scored, 4 samples; 2 cores shared with eight other jobs, so
timings are noisy; tracemalloc peaks): score_pathways with 1000 null sets per set and 1000 bootstraps
26.5 s / 89 MB at 20k cells, 31.3 s / 129 MB at 50k, 48.3 s / 150 MB at 100k (151M non-zeros); without
the null and with 100 bootstraps 5.3, 12.6 and 20.5 s: the null and the bootstrap add about 28 s at
100k cells, under half of clustering's 75 s at 105k. Wilcoxon ranking 21.6 s, GSEA prerank 2.3 s,
ssGSEA 4.0 s at 100k.
Measured 2026-12-03, after the 11 *_NICHE sets left the contrast (scored per cell, no null sets drawn for
them; 27 sets, nothing else running): score_pathways 27.9 s / 162 MB at 100k cells (188M non-zeros), without
the null and with 100 bootstraps 9.7 s, so the null and the bootstrap add about 18 s; Wilcoxon 6.1 s, GSEA
prerank 3.5 s, ssGSEA 2.7 s.
"""
from __future__ import annotations

import argparse
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def measured(into: dict, name: str):
    """Record wall time (s) and tracemalloc peak (MB) of the block as ``name_s`` / ``name_mb``."""
    tracemalloc.start()
    t0 = time.perf_counter()
    yield
    into[f"{name}_s"] = time.perf_counter() - t0
    into[f"{name}_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()


def prepared(n_cells: int, n_genes: int, seed: int = 0):
    from metastem.cluster import normalize
    from metastem.simulate import simulate_tumour

    adata = simulate_tumour(n_cells, n_genes, seed=seed, frac_doublets=0.0, frac_low_quality=0.0)
    adata.obs["n_genes_by_counts"] = np.diff(adata.X.indptr)
    normalize(adata, values="counts", target_sum=1e4)
    adata.obs["leiden"] = adata.obs["true_state"].astype("category")
    adata.obs["csc_like"] = adata.obs["true_stem_like"].astype(bool)
    return adata


def median_planted_auroc(adata) -> float:
    from sklearn.metrics import roc_auc_score

    from metastem.simulate import PLANTED_PROGRAMMES

    truth = adata.obs["true_programme"].to_numpy()
    aurocs = [roc_auc_score(truth, adata.obs[f"pathway_{s}"]) for s in PLANTED_PROGRAMMES if f"pathway_{s}" in adata.obs]
    return float(np.median(aurocs)) if aurocs else float("nan")


def bench(n_cells: int, n_genes: int, permutations: int) -> dict:
    from metastem import pathways as pw

    t0 = time.perf_counter()
    adata = prepared(n_cells, n_genes)
    adata.obs["sample"] = np.array(["S0", "S1", "S2", "S3"])[np.arange(adata.n_obs) % 4]
    row = {"cells": adata.n_obs, "genes": adata.n_vars, "nnz": adata.X.nnz, "prep_s": time.perf_counter() - t0}
    pw.score_pathways(adata[:2000].copy(), n_null=10, n_boot=10, exclude_genes=[])  # compile outside the timing
    with measured(row, "no_null"):
        pw.score_pathways(adata, n_null=0, n_boot=100, exclude_genes=[])
    with measured(row, "score"):
        st = pw.score_pathways(adata, exclude_genes=[])
    row["n_sets"] = int((st.details["n_used"] > 0).sum())
    row["auroc"] = median_planted_auroc(adata)
    resolved = {k: v for k, v in pw.resolved_sets(st.coverage).items() if k in pw.scored_sets(adata)}
    with measured(row, "wilcoxon"):
        ranking = pw.wilcoxon_ranking(adata, max_cells=10_000)
    with measured(row, "prerank"):
        pw.gsea_prerank(ranking, {k: v for k, v in resolved.items() if len(v) >= 5}, permutations=permutations,
                        seed=0, min_size=5)
    with measured(row, "ssgsea"):
        pw.ssgsea_pseudobulk(adata, resolved, seed=0)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test (< 1 min)")
    parser.add_argument("--genes", type=int, default=10000, help="simulated genes (default 10000)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000, 100_000], help="cells per run")
    parser.add_argument("--permutations", type=int, default=1000, help="GSEA permutations (config default 1000)")
    args = parser.parse_args()
    sizes = (1000, 4000) if args.quick else tuple(args.sizes)
    perms = min(args.permutations, 100) if args.quick else args.permutations
    rows = [bench(n, args.genes, perms) for n in sizes]
    print(f"{'cells':>7} {'genes':>5} {'nnz':>11} {'sets':>4} | {'score s/MB':>12} | {'no-null s/MB':>12} | "
          f"{'wilcoxon s/MB':>13} | {'prerank s/MB':>12} | {'ssgsea s/MB':>11} | AUROC")
    for r in rows:
        print(f"{r['cells']:>7} {r['genes']:>5} {r['nnz']:>11} {r['n_sets']:>4} | {r['score_s']:>6.1f} {r['score_mb']:>5.0f} | "
              f"{r['no_null_s']:>6.1f} {r['no_null_mb']:>5.0f} | {r['wilcoxon_s']:>6.2f} {r['wilcoxon_mb']:>6.0f} | "
              f"{r['prerank_s']:>5.2f} {r['prerank_mb']:>6.0f} | {r['ssgsea_s']:>5.2f} {r['ssgsea_mb']:>5.0f} | "
              f"{r['auroc']:.3f}")
    print(f"GSEA prerank permutations: {perms}; prep (simulate + normalise) "
          + ", ".join(f"{r['prep_s']:.0f} s" for r in rows))


if __name__ == "__main__":
    main()
