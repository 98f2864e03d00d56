"""Input generators for the scaling benchmark (``benchmarks/run.py --generator metastem,tree``).

Two independent sources of raw counts, so that a speed-up measured on one is not an artefact of its
structure:

- ``metastem``: the package's own tumour simulator (``metastem.simulate.simulate_tumour``): a stem-like
  trunk with two branches, planted stem/cycling/pathway programmes, 5 % doublets, low-quality cells.
- ``tree``: written here, sharing nothing with the simulator but the list of gene symbols. Cells lie on
  the edges of a connected, branching random tree of ``n_states`` states (default 8): each state has
  its own expression profile (a log-normal gene background times fold changes on ``state_genes`` genes
  per state, the genes drawn **uniformly at random**: no stem, cycling or pathway programme), a cell at
  position ``t`` on edge (u, v) draws each of its counts from state u with probability 1 - t and from v
  with probability t. Library sizes are log-normal and calibrated so that a cell stores about
  ``nnz_per_cell`` non-zero values (1,200 by default, ~ a 10x v3 tumour sample at 20k genes). Gene
  names are real HGNC symbols: the 18,089 the package ships, then named GENCODE genes from the
  gene-position table (package data, else ../shared/reference/genome) when more are asked for; only
  beyond those are synthetic names used. ``obs``: ``true_state`` (the nearer state of the cell's
  edge), ``edge``, ``edge_position``, ``tree_distance`` (from the root state S0, in edges).

Command line (the harness runs this in a child process so that generation is never pipeline time)::

    .venv/bin/python benchmarks/generators.py tree 20000 data.h5ad --genes 20000 --seed 0

prints one JSON line of facts (cells, nnz, median genes per cell, time, peak RSS).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GENERATORS = ("metastem", "tree")
_ENSEMBL_LIKE = re.compile(r"^(ENS[A-Z]*G\d+|[A-Z]{1,2}\d{6}\.\d+|\d+)$")


def _positions_tables() -> list[Path]:
    here = sorted((REPO / "src" / "metastem" / "data").glob("**/human_gene_positions.tsv.gz"))
    shared = Path(os.environ.get("METASTEM_SHARED", REPO.parent / "shared")) / "reference" / "genome"
    return here + [shared / "human_gene_positions.tsv.gz"]


def real_symbols(n_genes: int) -> tuple[list[str], str]:
    """At least ``n_genes`` distinct real human symbols when available, and where they came from."""
    from metastem.simulate import human_gene_symbols

    symbols = list(dict.fromkeys(human_gene_symbols()))
    source = f"{len(symbols)} HGNC symbols shipped with metastem"
    if len(symbols) >= n_genes:
        return symbols, source
    have = set(symbols)
    for table in _positions_tables():
        if not table.is_file():
            continue
        extra: dict[str, list[str]] = {"protein_coding": [], "lncRNA": [], "other": []}
        with gzip.open(table, "rt") as fh:
            header = fh.readline().rstrip("\n").split("\t")
            i_sym, i_bio = header.index("symbol"), header.index("biotype")
            for line in fh:
                f = line.rstrip("\n").split("\t")
                sym, bio = f[i_sym], f[i_bio]
                if sym in have or _ENSEMBL_LIKE.match(sym) or "." in sym:
                    continue
                have.add(sym)
                extra.get(bio, extra["other"]).append(sym)
        add = extra["protein_coding"] + extra["lncRNA"] + extra["other"]
        symbols += add
        source += f" + {len(add)} named GENCODE genes from {table.name}"
        break
    return symbols, source


def _random_tree(n_states: int, rng: np.random.Generator) -> np.ndarray:
    """Parent of each state (state 0 is the root, parent -1): a random recursive tree that branches."""
    for _ in range(1000):
        parent = np.array([-1] + [int(rng.integers(0, k)) for k in range(1, n_states)])
        degree = np.bincount(parent[1:], minlength=n_states) + (np.arange(n_states) > 0)
        if n_states < 4 or degree.max() >= 3:
            return parent
    return parent


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table: O(1) draws from a discrete distribution."""
    n = p.size
    q = p * n / p.sum()
    prob, alias = np.zeros(n), np.zeros(n, dtype=np.int64)
    small = [i for i in range(n) if q[i] < 1.0]
    large = [i for i in range(n) if q[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s], alias[s] = q[s], g
        q[g] -= 1.0 - q[s]
        (small if q[g] < 1.0 else large).append(g)
    for i in small + large:
        prob[i] = 1.0
    return prob, alias


def _expected_distinct(p: np.ndarray, lib: np.ndarray) -> float:
    """Mean over the given library sizes of the expected number of distinct genes drawn."""
    lp = np.log1p(-np.minimum(p, 1 - 1e-12))
    return float(np.mean([np.sum(1.0 - np.exp(L * lp)) for L in lib]))


def tree_counts(n_cells: int, n_genes: int = 20000, *, n_states: int = 8, nnz_per_cell: float = 1200,
                state_genes: int = 200, gene_sd: float = 1.5, lfc_sd: float = 1.5, library_sd: float = 0.35,
                seed: int = 0, chunk: int = 4000):
    """Raw counts of cells spread along the edges of a random branching tree (see the module docstring).

    A uniform random subset of the symbol pool would mix in many GENCODE-only names when fewer
    genes than the pool are asked for; the shipped HGNC symbols come first instead (all of them at
    20k genes), so the gene-set stages see real, scorable genes.

    Returns an AnnData: X CSR float32 integer counts, obs ``true_state``, ``edge``, ``edge_position``,
    ``tree_distance``; ``uns['generator']`` the parameters as JSON text.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    pool, source = real_symbols(n_genes)
    if len(pool) >= n_genes:  # the shipped HGNC list first (it comes first in the pool), then the extras in order
        genes = pool[:n_genes]
        source += f": the first {n_genes}"
    else:
        genes = pool + [f"TREEGENE{i:05d}" for i in range(n_genes - len(pool))]
        source += f" + {n_genes - len(pool)} synthetic names"
    genes = list(np.asarray(genes, dtype=object)[rng.permutation(n_genes)])  # no order shared with the pool
    n_genes = len(genes)

    parent = _random_tree(n_states, rng)
    depth = np.zeros(n_states)
    for s in range(1, n_states):
        depth[s] = depth[parent[s]] + 1
    edges = [(int(parent[s]), s) for s in range(1, n_states)]

    # Expression profiles: a shared log-normal background, fold changes on genes drawn uniformly at random.
    log_w = rng.normal(0.0, gene_sd, n_genes)
    profiles = np.empty((n_states, n_genes))
    for s in range(n_states):
        lw = log_w.copy()
        idx = rng.choice(n_genes, size=min(state_genes, n_genes), replace=False)
        lw[idx] += rng.normal(0.0, lfc_sd, idx.size)
        w = np.exp(lw - lw.max())
        profiles[s] = w / w.sum()
    tables = [_alias_table(p) for p in profiles]

    # Library size calibrated so that the expected number of stored values per cell is nnz_per_cell.
    # (the median cell: the median library size, half-way along an edge)
    mid = 0.5 * (profiles[[u for u, _ in edges]] + profiles[[v for _, v in edges]])
    lo, hi = 10.0, 1e6
    for _ in range(50):
        L0 = np.sqrt(lo * hi)
        got = np.mean([_expected_distinct(m, np.array([L0])) for m in mid])
        lo, hi = (L0, hi) if got < nnz_per_cell else (lo, L0)

    edge_of = rng.integers(0, len(edges), n_cells)
    t = rng.random(n_cells)
    lib = np.maximum(1, np.round(L0 * np.exp(rng.normal(0.0, library_sd, n_cells)))).astype(np.int64)
    u_state = np.array([edges[e][0] for e in edge_of])
    v_state = np.array([edges[e][1] for e in edge_of])

    blocks = []
    for start in range(0, n_cells, chunk):
        stop = min(n_cells, start + chunk)
        L = lib[start:stop]
        cell = np.repeat(np.arange(stop - start), L)
        from_v = rng.random(cell.size) < t[start:stop][cell]
        state = np.where(from_v, v_state[start:stop][cell], u_state[start:stop][cell])
        gene = np.empty(cell.size, dtype=np.int64)
        for s in np.unique(state):
            m = state == s
            prob, alias = tables[s]
            k = rng.integers(0, n_genes, int(m.sum()))
            keep = rng.random(k.size) < prob[k]
            gene[m] = np.where(keep, k, alias[k])
        block = sp.csr_matrix((np.ones(cell.size, dtype=np.float32), (cell, gene)),
                              shape=(stop - start, n_genes))  # duplicates are summed: counts
        block.sum_duplicates()
        blocks.append(block)
        del cell, from_v, state, gene
    X = sp.vstack(blocks, format="csr", dtype=np.float32)
    X.sort_indices()

    names = [f"S{s}" for s in range(n_states)]
    nearer = np.where(t < 0.5, u_state, v_state)
    obs = pd.DataFrame({
        "true_state": pd.Categorical([names[s] for s in nearer], categories=names),
        "edge": pd.Categorical([f"{names[edges[e][0]]}-{names[edges[e][1]]}" for e in edge_of]),
        "edge_position": t.astype(np.float32),
        "tree_distance": (depth[u_state] + t).astype(np.float32),
    }, index=pd.Index([f"tree_cell{i:07d}" for i in range(n_cells)]))
    var = pd.DataFrame(index=pd.Index(genes, dtype=str))
    params = {"generator": "tree", "n_cells": n_cells, "n_genes": n_genes, "n_states": n_states,
              "edges": [[names[u], names[v]] for u, v in edges], "nnz_per_cell": nnz_per_cell,
              "state_genes": state_genes, "gene_sd": gene_sd, "lfc_sd": lfc_sd, "library_sd": library_sd,
              "median_library_size": float(np.median(lib)), "seed": seed, "symbols": source}
    return ad.AnnData(X=X, obs=obs, var=var, uns={"generator": {"params_json": json.dumps(params)}})


def generate(name: str, cells: int, genes: int, *, seed: int = 0, library_size: float = 2000.0,
             nnz_per_cell: float = 1200.0, samples: int = 3):
    """An AnnData of raw counts from generator ``name`` (labels in obs 'true_state'); ``samples``: the
    simulated tumour's patients (obs 'sample')."""
    if name == "metastem":
        from metastem.simulate import simulate_tumour

        return simulate_tumour(cells, genes, seed=seed, mean_library_size=library_size, n_samples=samples)
    if name == "tree":
        return tree_counts(cells, genes, nnz_per_cell=nnz_per_cell, seed=seed)
    raise ValueError(f"unknown generator {name!r} (known: {', '.join(GENERATORS)})")


def source_hash(name: str) -> str:
    """A short hash of the code a generator depends on, so a changed generator never reuses stale data."""
    files = [REPO / "src" / "metastem" / "simulate.py"] + ([Path(__file__)] if name == "tree" else [])
    h = hashlib.sha1()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:8]


def write(name: str, cells: int, genes: int, path: str, *, seed: int = 0, library_size: float = 2000.0,
          nnz_per_cell: float = 1200.0, samples: int = 3) -> dict:
    """Generate and write the h5ad atomically; return (and print) the facts as one JSON line."""
    t0 = time.perf_counter()
    adata = generate(name, cells, genes, seed=seed, library_size=library_size, nnz_per_cell=nnz_per_cell,
                     samples=samples)
    gen_s = time.perf_counter() - t0
    tmp = f"{path}.tmp.h5ad"
    adata.write_h5ad(tmp)
    os.replace(tmp, path)
    n_per_cell = np.diff(adata.X.indptr)
    facts = {"n_obs": int(adata.n_obs), "nnz": int(adata.X.nnz), "simulate_s": gen_s,
             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "median_genes_per_cell": float(np.median(n_per_cell))}
    print(json.dumps(facts), flush=True)
    return facts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("generator", choices=GENERATORS)
    ap.add_argument("cells", type=int)
    ap.add_argument("path")
    ap.add_argument("--genes", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--library-size", type=float, default=2000.0, help="metastem: mean library size")
    ap.add_argument("--nnz-per-cell", type=float, default=1200.0, help="tree: stored values per cell")
    ap.add_argument("--samples", type=int, default=3, help="metastem: patients of the simulated tumour")
    a = ap.parse_args(argv)
    write(a.generator, a.cells, a.genes, a.path, seed=a.seed, library_size=a.library_size, samples=a.samples,
          nnz_per_cell=a.nnz_per_cell)
    return 0


if __name__ == "__main__":
    sys.exit(main())
