"""Time and peak memory of the stemness stage, and sparse-vs-dense CytoTRACE agreement.

Usage (from the repository root):
    .venv/bin/python benchmarks/bench_stemness.py            # 10k and 100k cells (minutes)
    .venv/bin/python benchmarks/bench_stemness.py --quick    # smoke test, < 1 min

Each size is simulated with ``metastem.simulate.simulate_tumour``, normalised and given the
pipeline's kNN graph (HVG -> PCA -> sc.pp.neighbors; UMAP and Leiden are skipped because stemness
does not use them), then ``score_stemness`` is timed with tracemalloc measuring its peak Python/numpy
allocations (tracemalloc adds some overhead to the timing). The slope is the log-log growth of time
between the two sizes: 1.0 means linear in cells.
"""
from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]


def prepared(n_cells: int, n_genes: int, seed: int = 0):
    """Simulated counts, normalised, with HVG/PCA/kNN as the cluster stage builds them."""
    import scanpy as sc

    from metastem.cluster import normalize
    from metastem.simulate import simulate_tumour

    adata = simulate_tumour(n_cells, n_genes, seed=seed, frac_doublets=0.0, frac_low_quality=0.0)
    normalize(adata, values="counts", target_sum=1e4)
    sc.pp.highly_variable_genes(adata, n_top_genes=min(2000, n_genes), flavor="seurat")
    sc.pp.pca(adata, n_comps=30, mask_var="highly_variable", svd_solver="arpack", random_state=seed)
    sc.pp.neighbors(adata, n_neighbors=15, n_pcs=30, random_state=seed)
    return adata


def stemness_params() -> dict:
    from metastem.config import load_schema, validate_with_defaults

    cfg = validate_with_defaults({}, load_schema(REPO / "workflow/schemas/config.schema.yaml"), where="defaults")
    return dict(cfg["stemness"], gene_sets=[str(REPO / "config/gene_sets/stemness_{species}.gmt")])


def time_stemness(n_cells: int, n_genes: int) -> dict:
    from metastem.stemness import score_stemness

    t0 = time.perf_counter()
    adata = prepared(n_cells, n_genes)
    prep = time.perf_counter() - t0
    tracemalloc.start()
    t0 = time.perf_counter()
    info = score_stemness(adata, stemness_params(), species="human", seed=0)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"cells": adata.n_obs, "genes": adata.n_vars, "nnz_X": adata.X.nnz, "prep_s": prep,
            "stemness_s": elapsed, "peak_mb": peak / 2**20, "method": info["method_used"],
            "auroc_stem_like": auroc(adata.obs["true_stem_like"].to_numpy(), adata.obs["stemness"].to_numpy())}


def auroc(truth: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth, score))


def agreement(n_cells: int, n_genes: int) -> dict:
    from metastem.stemness import cytotrace_dense, score_cytotrace

    adata = prepared(n_cells, n_genes)
    t0 = time.perf_counter()
    sparse = score_cytotrace(adata)
    t_sparse = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = cytotrace_dense(adata)
    t_dense = time.perf_counter() - t0
    truth = adata.obs["true_stem_like"].to_numpy()
    return {"cells": adata.n_obs, "spearman": float(spearmanr(sparse, dense)[0]), "sparse_s": t_sparse,
            "dense_s": t_dense, "auroc_sparse": auroc(truth, sparse), "auroc_dense": auroc(truth, dense)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test (< 1 min)")
    parser.add_argument("--genes", type=int, default=2000, help="simulated genes (default 2000)")
    args = parser.parse_args()
    sizes = (1000, 4000) if args.quick else (10_000, 100_000)
    agree_cells = 500 if args.quick else 1500

    rows = [time_stemness(n, args.genes) for n in sizes]
    print(f"{'cells':>8} {'genes':>6} {'nnz(X)':>11} {'prep s':>7} {'stemness s':>10} {'peak MB':>8} {'method':>10} {'AUROC':>6}")
    for r in rows:
        print(f"{r['cells']:>8} {r['genes']:>6} {r['nnz_X']:>11} {r['prep_s']:>7.1f} {r['stemness_s']:>10.2f} "
              f"{r['peak_mb']:>8.0f} {r['method']:>10} {r['auroc_stem_like']:>6.3f}")
    a, b = rows
    slope_t = np.log(b["stemness_s"] / a["stemness_s"]) / np.log(b["cells"] / a["cells"])
    slope_m = np.log(b["peak_mb"] / a["peak_mb"]) / np.log(b["cells"] / a["cells"])
    print(f"log-log slope vs cells: time {slope_t:.2f}, peak memory {slope_m:.2f} (1.0 = linear)")

    g = agreement(agree_cells, args.genes)
    print(f"sparse vs dense CytoTRACE at {g['cells']} cells: Spearman {g['spearman']:.3f}; "
          f"time sparse {g['sparse_s']:.2f} s, dense {g['dense_s']:.2f} s; "
          f"AUROC(true_stem_like) sparse {g['auroc_sparse']:.3f}, dense {g['auroc_dense']:.3f}")


if __name__ == "__main__":
    main()
