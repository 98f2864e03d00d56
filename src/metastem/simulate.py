"""A deterministic simulator of a tumour sample with a stem-like population, for the built-in demo.

What it models, and why each part is there:
- a latent differentiation time ``t`` in [0, 1]: a stem-like trunk (t < 0.3) that splits into two
  branches (A, B); ``true_stem_like`` is t < 0.2. Genes of a stem module fall along t, branch
  modules rise on their own branch only, so the trajectory has a known order and a known topology;
- a *breadth* module: hundreds of lowly expressed genes that stem-like cells transcribe and
  differentiated cells switch off, so the number of detected genes falls with differentiation as it
  does in real data (Gulati et al. 2020) — what a CytoTRACE-style score must recover;
- a cycling module (S/G2M genes) peaking in transit-amplifying progenitors, not in the stem cells,
  so "stem-like" and "dividing" can be told apart;
- migration/metastasis programmes (CXCR4/CXCL12, HGF-MET, Wnt, Notch, ...) planted in a random
  subset of stem-like cells only, with the planted genes recorded in ``uns['simulation']``;
- mitochondrial, ribosomal and haemoglobin genes, low-quality cells (few counts, high % mito) and
  doublets (sums of two cells), each flagged in obs.

Counts are negative binomial (gamma-Poisson, shape 2). They are drawn sparsely: every gene module adds
a per-cell term to the log-mean, so within a group of genes sharing modules the mean is rank one
(cell factor x gene factor). Only the non-zero entries are then drawn, exactly (see ``_sample_counts``):
the cost grows with the number of non-zeros, not cells x genes, and 250k cells x 20k genes takes about
a minute. Cells are generated in chunks so that temporary arrays stay small.
"""
from __future__ import annotations

import gzip
from importlib import resources

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

# Planted programmes: genes chosen from the curated pathway sets, avoiding genes that the curated
# sets share with unplanted ones, so that "unplanted" stays clean.
PLANTED_PROGRAMMES: dict[str, list[str]] = {
    "CXCL12_CXCR4": ["CXCR4", "CXCL12", "ACKR3"],
    "HGF_MET": ["MET", "HGF"],
    "WNT_BETACATENIN": ["CTNNB1", "LEF1", "TCF7", "AXIN2", "LGR5", "TCF7L2", "WNT3A"],
    "NOTCH": ["NOTCH1", "NOTCH2", "HES1", "HEY1", "DLL1", "RBPJ"],
    "HEDGEHOG": ["GLI1", "PTCH1", "SMO", "GLI2", "HHIP", "SHH"],
    "EMT_CORE": ["SNAI1", "SNAI2", "TWIST1", "ZEB1", "ZEB2", "VIM"],
}
STEM_GENES = ["SOX2", "PROM1", "CD44", "ALDH1A1", "ITGA6", "NES", "BMI1", "LIN28B", "SALL4", "MSI1",
              "KLF4", "POU5F1", "NANOG", "LIN28A", "DPPA4", "TDGF1", "L1TD1", "ZFP42", "SOX4", "SOX11",
              "CD34", "THY1", "ABCG2", "EPCAM", "LRIG1", "OLFM4", "ASCL2", "SOX9", "HMGA2", "IGF2BP1"]
CYCLING_GENES = ["MKI67", "TOP2A", "CCNB1", "CDK1", "PCNA", "MCM2", "MCM5", "TYMS", "UBE2C", "BIRC5",
                 "CENPF", "TPX2", "NUSAP1", "HMGB2", "CDC20", "RRM2", "MCM6", "GINS2", "CCNE2", "E2F1"]
BRANCH_A_GENES = ["KRT8", "KRT18", "KRT19", "CLDN4", "MUC1", "CDH1", "ELF3", "TACSTD2", "AGR2", "TFF1"]
BRANCH_B_GENES = ["COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "ACTA2", "TAGLN", "MYL9", "POSTN", "SPARC"]
MITO_GENES = ["MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3", "MT-ND3",
              "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB"]
HB_GENES = ["HBA1", "HBA2", "HBB", "HBD", "HBG1", "HBG2"]


def human_gene_symbols() -> list[str]:
    """Real HGNC symbols shipped with the package (see data/human_genes.txt.gz)."""
    path = resources.files("metastem") / "data" / "human_genes.txt.gz"
    with gzip.open(str(path), "rt") as fh:
        return [line.strip() for line in fh if line.strip() and not line.startswith("#")]


def _gene_universe(n_genes: int, rng: np.random.Generator) -> list[str]:
    required = (STEM_GENES + CYCLING_GENES + BRANCH_A_GENES + BRANCH_B_GENES + MITO_GENES + HB_GENES
                + [g for genes in PLANTED_PROGRAMMES.values() for g in genes])
    pool = human_gene_symbols()
    ribo = [g for g in pool if g.startswith(("RPL", "RPS")) and g[3:4].isdigit()][:80]
    required = list(dict.fromkeys(required + ribo))
    rest = [g for g in pool if g not in set(required)]
    n_rest = n_genes - len(required)
    if n_rest < 0:
        raise ValueError(f"n_genes must be at least {len(required)}")
    picked = list(rng.choice(rest, size=min(n_rest, len(rest)), replace=False))
    # Beyond the real symbols we ship, pad with clearly synthetic names (benchmarks at 20k+ genes).
    picked += [f"SIMGENE{i:05d}" for i in range(max(0, n_rest - len(rest)))]
    return required + picked


_NB_SHAPE = 2.0  # NB dispersion: gamma-Poisson with shape 2 (the sampler below relies on shape 2)
_BIN_RATIO = 1.2  # cells whose per-group factor differ by less than this share a candidate bound


def _p_nonzero(mu: np.ndarray) -> np.ndarray:
    """P(X > 0) for X ~ NB(shape 2, mean mu)."""
    x = 1.0 + mu * (1.0 / _NB_SHAPE)
    return 1.0 - 1.0 / (x * x)


def _bernoulli_positions(rng: np.random.Generator, p: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each task i, the positions in [0, n[i]) of independent Bernoulli(p[i]) successes.

    Geometric gaps between successes (inversion), drawn for all tasks at once: the cost is the number
    of successes plus about one draw per task, not sum(n). Returns (task, position) arrays.
    """
    p = np.minimum(p, 1.0 - 1e-12)
    log1mp = np.log1p(-p)
    tasks_out, pos_out = [], []
    active = np.flatnonzero((p > 0) & (n > 0))
    start = np.zeros(p.size)
    while active.size:
        rem = n[active] - start[active]
        lam = rem * p[active]
        length = (lam + 3.0 * np.sqrt(lam)).astype(np.int64) + 1
        task = np.repeat(np.arange(active.size), length)
        gaps = np.floor(np.log1p(-rng.random(task.size)) / log1mp[active][task]) + 1.0
        np.minimum(gaps, rem[task] + 1.0, out=gaps)  # a gap past the end means no more successes; keeps sums exact
        ends = np.cumsum(length)
        cs = np.cumsum(gaps)
        cs -= np.repeat(cs[ends - 1] - np.add.reduceat(gaps, ends - length), length)  # restart per task
        keep = cs <= rem[task]
        tasks_out.append(active[task[keep]])
        pos_out.append((start[active][task[keep]] + cs[keep] - 1).astype(np.int64))
        last = cs[ends - 1]
        more = last < rem
        start[active[more]] += last[more]
        active = active[more]
    return np.concatenate(tasks_out), np.concatenate(pos_out)


def _nb_positive(rng: np.random.Generator, mu: np.ndarray) -> np.ndarray:
    """X ~ NB(shape 2, mean mu) conditioned on X > 0, exactly.

    NB with shape 2 is the sum of two geometric variables G1 + G2 (failures, continuation q = mu/(2+mu)).
    Given the sum is positive: both are positive with probability q/(2-q), else one is; and a positive
    geometric is 1 + a geometric (memorylessness).
    """
    mu = mu.astype(np.float32)
    q = mu / (np.float32(_NB_SHAPE) + mu)
    logq = np.log(q)
    out = np.log1p(-rng.random(mu.size, dtype=np.float32))
    out /= logq
    np.floor(out, out=out)
    out += 1.0
    both = np.flatnonzero(rng.random(mu.size, dtype=np.float32) * (2.0 - q) < q)
    out[both] += np.floor(np.log1p(-rng.random(both.size, dtype=np.float32)) / logq[both]) + 1.0
    return out


def _sample_counts(rng: np.random.Generator, base: np.ndarray, modules: list, lib: np.ndarray,
                   sl: slice) -> sp.csr_matrix:
    """NB counts (CSR float32) for the cells in ``sl``, drawing only the non-zero entries.

    log mu[c, g] = base[g] + sum of the effects of g's modules in cell c, rescaled so that mu sums to
    the cell's library size: the same model as a dense gamma-Poisson draw. Genes sharing the same
    modules form a group whose mean is A[c] * w[g]. Per group, cells are binned by A (within a ratio of
    1.2); for each (bin, gene) candidates are Bernoulli(P(X>0) at the bin's largest A), thinned to the
    cell's own P(X>0), and given a zero-truncated NB count.
    """
    n_g = base.size
    nc = sl.stop - sl.start
    member = np.zeros((n_g, len(modules)), dtype=np.int8)
    for m, (gi, _) in enumerate(modules):
        member[np.unique(gi), m] = 1
    groups, gid = np.unique(member, axis=0, return_inverse=True)
    gid = gid.ravel()
    effects = np.stack([np.asarray(e, dtype=float)[sl] for _, e in modules], axis=1)  # cells x modules
    log_a = effects @ groups.T.astype(float)  # cells x groups
    w = np.exp(base.astype(np.float64))
    w_group = np.bincount(gid, weights=w, minlength=len(groups))
    # Normalise as the dense model did: mu = exp(logmu) * lib / rowsum(exp(logmu)).
    shift = log_a.max(axis=1, keepdims=True)
    log_scale = np.log(lib) - shift[:, 0] - np.log(np.exp(log_a - shift) @ w_group)
    log_a += log_scale[:, None]

    rows, cols, vals = [], [], []
    for k in range(len(groups)):
        genes = np.flatnonzero(gid == k)
        la = log_a[:, k]
        bin_of = np.floor((la - la.min()) / np.log(_BIN_RATIO)).astype(np.int64)
        order = np.argsort(bin_of, kind="stable")
        _, first, size = np.unique(bin_of[order], return_index=True, return_counts=True)
        a_max = np.exp(np.maximum.reduceat(la[order], first))
        # tasks: (bin, gene) pairs, bin-major
        p_max = _p_nonzero(a_max[:, None] * w[genes][None, :]).ravel()
        task, pos = _bernoulli_positions(rng, p_max, np.repeat(size, genes.size).astype(float))
        b, j = np.divmod(task, genes.size)
        cell = order[first[b] + pos]
        gene = genes[j]
        mu = np.exp(la[cell]) * w[gene]
        accept = rng.random(cell.size) * p_max[task] < _p_nonzero(mu)
        rows.append(cell[accept])
        cols.append(gene[accept])
        vals.append(_nb_positive(rng, mu[accept]))
    rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    # CSR with sorted column indices by two stable (radix, for 16-bit keys) sorts: by gene, then by cell.
    key16 = lambda x, n: x.astype(np.uint16) if n <= 65536 else x  # noqa: E731
    o = np.argsort(key16(cols, n_g), kind="stable")
    rows, cols, vals = rows[o], cols[o], vals[o]
    o = np.argsort(key16(rows, nc), kind="stable")
    indptr = np.zeros(nc + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=nc), out=indptr[1:])
    X = sp.csr_matrix((vals[o], cols[o].astype(np.int32), indptr), shape=(nc, n_g))
    X.has_sorted_indices = True
    return X


def _take_rows(chunks: list[sp.csr_matrix], block: int, rows: np.ndarray) -> sp.csr_matrix:
    """Rows (global indices, in the given order) of the matrix the row-blocks `chunks` stack into."""
    cid = rows // block
    o = np.argsort(cid, kind="stable")
    parts = [chunks[c][rows[o][cid[o] == c] - c * block] for c in np.unique(cid)]
    stacked = sp.vstack(parts, format="csr")
    back = np.empty_like(o)
    back[o] = np.arange(o.size)
    return stacked[back]


def _assemble_rows(blocks: list[sp.csr_matrix], order: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """CSR whose row i is row ``order[i]`` of the stacked `blocks`, filled block by block into
    preallocated arrays while each block is released, instead of vstack + vstack (doublets) + a
    permuted copy. Column indices stay sorted. Peak memory is still about twice X: the rows of every
    block scatter over the whole output, so (with transparent huge pages) the output is resident
    from the first block on."""
    lengths = np.concatenate([np.diff(b.indptr) for b in blocks])
    indptr = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths[order], out=indptr[1:])
    nnz = int(indptr[-1])
    idx_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=idx_dtype)
    dest = np.empty_like(order)
    dest[order] = np.arange(order.size)
    start = 0
    for i in range(len(blocks)):
        b = blocks[i]
        rows = dest[start:start + b.shape[0]]
        start += b.shape[0]
        pos = np.repeat(indptr[rows] - b.indptr[:-1], np.diff(b.indptr)) + np.arange(b.nnz)
        data[pos] = b.data
        indices[pos] = b.indices
        blocks[i] = None
    blocks.clear()
    X = sp.csr_matrix((data, indices, indptr.astype(idx_dtype)), shape=(order.size, n_cols), copy=False)
    X.has_sorted_indices = True
    return X


def simulate_tumour(n_cells: int = 3000, n_genes: int = 4000, *, seed: int = 0,
                    frac_doublets: float = 0.05, frac_low_quality: float = 0.05,
                    mean_library_size: float = 6000.0, frac_programme_cells: float = 0.7,
                    chunk_size: int = 5000) -> ad.AnnData:
    """Simulate raw UMI counts of a tumour with a branching stem-cell hierarchy.

    Returns AnnData (CSR float32 counts) with ground truth in ``obs``: ``true_pseudotime``,
    ``true_stem_like``, ``true_branch``, ``true_state``, ``true_doublet``, ``true_low_quality``,
    ``true_programme`` (cell carries the planted programmes), and in ``uns['simulation']``.
    """
    rng = np.random.default_rng(seed)
    genes = _gene_universe(n_genes, rng)
    g_index = {g: i for i, g in enumerate(genes)}
    n_g = len(genes)

    # Baseline log-means: a long-tailed distribution as in real UMI data.
    base = rng.normal(-1.0, 1.6, size=n_g)
    idx = lambda names: np.array([g_index[g] for g in names if g in g_index], dtype=int)  # noqa: E731
    stem_i, cyc_i = idx(STEM_GENES), idx(CYCLING_GENES)
    a_i, b_i, mito_i, hb_i = idx(BRANCH_A_GENES), idx(BRANCH_B_GENES), idx(MITO_GENES), idx(HB_GENES)
    ribo_i = np.array([i for g, i in g_index.items() if g.startswith(("RPL", "RPS"))], dtype=int)
    prog_i = {k: idx(v) for k, v in PLANTED_PROGRAMMES.items()}
    special = np.unique(np.concatenate([stem_i, cyc_i, a_i, b_i, mito_i, hb_i, ribo_i, *prog_i.values()]))
    base[special] = rng.normal(-0.5, 0.5, size=special.size)
    base[mito_i] = rng.normal(2.5, 0.4, size=mito_i.size)
    base[ribo_i] = rng.normal(2.0, 0.5, size=ribo_i.size)
    base[hb_i] = -6.0
    others = np.setdiff1d(np.arange(n_g), special)
    # Breadth module: a third of the lowly expressed genes, on in stem-like cells, off when differentiated.
    breadth_i = rng.choice(others, size=others.size // 3, replace=False)
    base[breadth_i] = rng.normal(-2.0, 0.8, size=breadth_i.size)
    # Extra genes specific to each branch (beyond the named markers), to give the branches depth.
    rest_pool = np.setdiff1d(others, breadth_i)
    extra = rng.choice(rest_pool, size=min(120, rest_pool.size), replace=False)
    a_i, b_i = np.concatenate([a_i, extra[:60]]), np.concatenate([b_i, extra[60:]])

    # Latent structure.
    n = n_cells
    t = rng.beta(1.1, 1.3, size=n)
    branch = np.where(t < 0.3, "trunk", np.where(rng.random(n) < 0.5, "A", "B"))
    stem_like = t < 0.2
    programme = stem_like & (rng.random(n) < frac_programme_cells)
    # Graded activity, strongest in the earliest cells: real programmes vary continuously, and an
    # on/off switch would split the stem compartment into a separate island of the kNN graph.
    activity = programme * rng.uniform(0.3, 1.0, size=n)
    mito_shift = rng.normal(0.0, 0.2, size=n)  # cell-to-cell spread of the mitochondrial fraction
    low_q = rng.random(n) < frac_low_quality
    lib = rng.lognormal(np.log(mean_library_size), 0.35, size=n)
    lib = lib * (1.0 + 0.6 * (1.0 - t))          # stem-like cells are larger and richer in mRNA
    lib[low_q] /= 6.0
    state = np.select([t < 0.2, t < 0.45], ["stem", "progenitor"],
                      default=np.where(branch == "A", "branch_A", "branch_B"))

    # Additive log-mean effects per module (cells x modules) and module membership (genes x modules).
    ramp = np.clip((t - 0.3) / 0.7, 0, 1)
    modules = [
        (stem_i, 3.0 * np.clip(1 - t / 0.4, 0, 1)),
        (breadth_i, -4.0 * np.clip((t - 0.1) / 0.6, 0, 1) + 1.0),
        (cyc_i, 2.5 * np.exp(-((t - 0.35) ** 2) / 0.01)),
        (a_i, 3.5 * ramp * (branch == "A")),
        (b_i, 3.5 * ramp * (branch == "B")),
        *[(gi, 3.0 * activity) for gi in prog_i.values()],
        (mito_i, 2.5 * low_q + mito_shift),
    ]
    # Blocks of at most 2000 cells: the per-block arrays stay below glibc's mmap threshold range, which
    # avoids page-fault (system) time that otherwise exceeds the sampling itself.
    block = max(1, min(chunk_size, 2000))
    chunks = [_sample_counts(rng, base, modules, lib[sl], sl)
              for sl in (slice(s0, min(n, s0 + block)) for s0 in range(0, n, block))]
    obs = pd.DataFrame({
        "true_pseudotime": t, "true_stem_like": stem_like, "true_branch": branch,
        "true_state": pd.Categorical(state), "true_doublet": False, "true_low_quality": low_q,
        "true_programme": programme,
    }, index=[f"cell{i:06d}" for i in range(n)])

    # Doublets: sums of two random healthy cells, flagged and carrying the first cell's truth.
    n_dbl = int(round(frac_doublets * n))
    if n_dbl:
        healthy = np.flatnonzero(~low_q)
        pa, pb = rng.choice(healthy, size=(2, n_dbl))
        chunks.append(_take_rows(chunks, block, pa) + _take_rows(chunks, block, pb))
        dbl = obs.iloc[pa].copy()
        dbl["true_doublet"] = True
        dbl.index = [f"doublet{i:05d}" for i in range(n_dbl)]
        obs = pd.concat([obs, dbl])
    obs["true_branch"] = pd.Categorical(obs["true_branch"])
    order = rng.permutation(n + n_dbl)  # doublets must not sit at the end of the matrix
    X = _assemble_rows(chunks, order, n_g)  # empties `chunks`: peak memory about one copy of X
    adata = ad.AnnData(X=X, obs=obs.iloc[order],
                       var=pd.DataFrame(index=pd.Index(genes, name="gene_symbols")))
    adata.uns["simulation"] = {
        "seed": seed, "n_cells": n_cells, "n_genes": n_g,
        "planted_programmes": {k: list(v) for k, v in PLANTED_PROGRAMMES.items()},
        "stem_genes": STEM_GENES, "cycling_genes": CYCLING_GENES,
    }
    return adata
