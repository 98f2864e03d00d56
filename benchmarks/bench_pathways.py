"""Time and peak memory of the pathway stage: per-cell scores, and separately GSEA/ssGSEA.

Usage (from the repository root):
    .venv/bin/python benchmarks/bench_pathways.py            # 10k and 100k cells (minutes)
    .venv/bin/python benchmarks/bench_pathways.py --quick    # smoke test, < 1 min

Each size is simulated with ``metastem.simulate.simulate_tumour`` and log-normalised; Leiden
clusters are replaced by the simulator's true states (clustering is not what is timed) and
``csc_like`` by ``true_stem_like``. Timed steps, each with tracemalloc's peak of Python/numpy
allocations (tracemalloc slows the timing a little):
- per-cell scores of the curated sets with each scorer (score_genes, aucell);
- the Wilcoxon ranking of CSC-like vs other cells (scanpy), then GSEA prerank (gseapy);
- ssGSEA of per-cluster pseudobulk profiles (gseapy).
AUROC is how well each set's score recovers the cells carrying the planted programmes
(``true_programme``), as the median over the planted sets.
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
    return float(np.median([roc_auc_score(truth, adata.obs[f"pathway_{s}"]) for s in PLANTED_PROGRAMMES
                            if f"pathway_{s}" in adata.obs]))


def bench(n_cells: int, n_genes: int, permutations: int) -> dict:
    from metastem import pathways as pw
    from metastem.genesets import read_aliases

    t0 = time.perf_counter()
    adata = prepared(n_cells, n_genes)
    row = {"cells": adata.n_obs, "genes": adata.n_vars, "nnz": adata.X.nnz, "prep_s": time.perf_counter() - t0}
    sets = pw.load_pathway_sets([str(REPO / "config/gene_sets/metastasis_{species}.gmt")], [], "human")
    aliases = read_aliases(REPO / "config/gene_sets/aliases_human.tsv", "human")
    for scorer in ("score_genes", "aucell"):
        with measured(row, scorer):
            cov = pw.score_pathways(adata, sets, scorer=scorer, seed=0, aliases=aliases)
        row[f"{scorer}_auroc"] = median_planted_auroc(adata)
    resolved = {k: v for k, v in pw.resolved_sets(cov).items() if k in pw.scored_sets(adata)}
    with measured(row, "wilcoxon"):
        ranking = pw.wilcoxon_ranking(adata)
    with measured(row, "prerank"):
        pw.gsea_prerank(ranking, resolved, permutations=permutations, seed=0)
    with measured(row, "ssgsea"):
        pw.ssgsea_pseudobulk(adata, resolved, seed=0)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test (< 1 min)")
    parser.add_argument("--genes", type=int, default=4000, help="simulated genes (default 4000)")
    parser.add_argument("--permutations", type=int, default=1000, help="GSEA permutations (config default 1000)")
    args = parser.parse_args()
    sizes = (1000, 4000) if args.quick else (10_000, 100_000)
    perms = min(args.permutations, 100) if args.quick else args.permutations
    rows = [bench(n, args.genes, perms) for n in sizes]
    print(f"{'cells':>7} {'genes':>5} {'nnz':>10} | {'score_genes s/MB/AUROC':>22} | {'aucell s/MB/AUROC':>19} | "
          f"{'wilcoxon s/MB':>13} | {'prerank s/MB':>12} | {'ssgsea s/MB':>11}")
    for r in rows:
        print(f"{r['cells']:>7} {r['genes']:>5} {r['nnz']:>10} | "
              f"{r['score_genes_s']:>7.2f} {r['score_genes_mb']:>7.0f} {r['score_genes_auroc']:>6.3f} | "
              f"{r['aucell_s']:>6.2f} {r['aucell_mb']:>6.0f} {r['aucell_auroc']:>5.3f} | "
              f"{r['wilcoxon_s']:>6.2f} {r['wilcoxon_mb']:>6.0f} | {r['prerank_s']:>5.2f} {r['prerank_mb']:>6.0f} | "
              f"{r['ssgsea_s']:>5.2f} {r['ssgsea_mb']:>5.0f}")
    print(f"GSEA prerank permutations: {perms}; {len(rows)} sizes; prep (simulate + normalise) "
          + ", ".join(f"{r['prep_s']:.0f} s" for r in rows))


if __name__ == "__main__":
    main()
