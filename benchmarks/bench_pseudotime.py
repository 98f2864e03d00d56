"""Time and peak memory of the pseudotime stage at 10k and 100k simulated cells.

    .venv/bin/python benchmarks/bench_pseudotime.py            # 10k and 100k cells (minutes)
    .venv/bin/python benchmarks/bench_pseudotime.py --quick    # 2k cells, smoke test (< 1 min)

The kNN graph is built by the cheapest honest route (normalise, log1p, 1,000 HVGs, 30 PCs, 15
neighbours); only the pseudotime-stage steps are measured, each on its own: ``pseudotime``
(diffusion map + root + DPT), ``pseudotime_diagnostics`` (re-roots from every candidate),
``paga`` without and with the PAGA-initialised UMAP. Memory is the peak of Python-traced
allocations (numpy/scipy arrays included; numba's own buffers are not), above what was held before.
"""
from __future__ import annotations

import argparse
import time
import tracemalloc
import warnings
from typing import Any, Callable

import numpy as np
import pandas as pd


def knn_graph(n_cells: int, n_genes: int, seed: int = 0):
    """Simulated tumour with the kNN graph a clustering would give, plus a detected-genes stemness proxy."""
    import scanpy as sc

    from metastem.simulate import simulate_tumour

    adata = simulate_tumour(n_cells, n_genes, seed=seed, frac_doublets=0.0, frac_low_quality=0.0)
    detected = np.asarray((adata.X > 0).sum(axis=1)).ravel()
    adata.obs["stemness"] = pd.Series(detected, index=adata.obs_names).rank(pct=True)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=1000, flavor="seurat")
    sc.pp.pca(adata, n_comps=30, mask_var="highly_variable", svd_solver="arpack", random_state=seed)
    sc.pp.neighbors(adata, n_neighbors=15, n_pcs=30, random_state=seed)
    sc.tl.leiden(adata, resolution=1.0, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return adata


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak MiB of traced allocations during the call)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = (tracemalloc.get_traced_memory()[1] - base) / 2**20
    tracemalloc.stop()
    return out, seconds, peak


def bench(n_cells: int, n_genes: int, params: dict) -> list[dict]:
    from metastem import pseudotime as pt

    t0 = time.perf_counter()
    adata = knn_graph(n_cells, n_genes)
    setup = time.perf_counter() - t0
    rows = []
    kwargs = {k: v for k, v in params.items() if k != "paga_umap_max_cells"}  # that one is pt.paga's
    _, s, m = measure(lambda: pt.pseudotime(adata, **kwargs))
    info = pt.pseudotime_info(adata)
    rows.append({"step": "pseudotime", "seconds": s, "peak_MiB": m})
    _, s, m = measure(lambda: pt.pseudotime_diagnostics(adata))
    rows.append({"step": "pseudotime_diagnostics", "seconds": s, "peak_MiB": m})
    _, s, m = measure(lambda: pt.paga(adata, paga_umap_max_cells=0))
    rows.append({"step": "paga (no UMAP)", "seconds": s, "peak_MiB": m})
    _, s, m = measure(lambda: pt.paga(adata, paga_umap_max_cells=adata.n_obs))
    rows.append({"step": "paga (+ PAGA-initialised UMAP)", "seconds": s, "peak_MiB": m})
    for r in rows:
        r.update(cells=n_cells, clusters=adata.obs["leiden"].nunique(), unreachable=info["n_unreachable"],
                 graph_setup_s=setup)
    return rows


def main() -> None:
    from metastem.smk.config import load_schema, validate_with_defaults

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 cells only: a smoke test under a minute")
    ap.add_argument("--genes", type=int, default=3000, help="simulated genes (default 3000)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    params = validate_with_defaults({}, load_schema("workflow/schemas/config.schema.yaml"), where="defaults")["pseudotime"]
    sizes = [2000] if args.quick else [10_000, 100_000]
    rows = [r for n in sizes for r in bench(n, args.genes, params)]
    df = pd.DataFrame(rows)[["cells", "clusters", "step", "seconds", "peak_MiB", "unreachable", "graph_setup_s"]]
    with pd.option_context("display.width", 200, "display.float_format", "{:.1f}".format):
        print(df.to_string(index=False))


if __name__ == "__main__":
    main()
