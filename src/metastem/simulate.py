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
- migration/metastasis programmes planted in a random subset of stem-like cells only: shipped tumour-side
  readout sets under their shipped names (Wnt, Notch, Hedgehog targets and the mesenchymal EMT arm raised,
  the epithelial arm EMT_CORE_DN lowered), with the truth (set, direction, effect size) recorded in
  ``uns['simulation']['planted_truth']``; every other shipped set is left unplanted, and every gene of the
  shipped sets is simulated (outside the breadth module), so each set can be scored and the unplanted
  ones stay flat between stem-like and other malignant cells;
- gene-level parameters (gene universe, baselines, batch shifts, CNVs) are drawn before any cell, so the
  same seed with more cells is a larger sample of the same tumours (how tests get a planted effect's
  population value on any statistic's own scale);
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
import json
from collections.abc import Sequence
from importlib import resources

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

# Planted programmes (issue 16): shipped tumour-side readout sets of data/gene_sets/metastasis_human.gmt, whole and
# under their shipped names, shifted in the programme cells (a random ``frac_programme_cells`` of the stem-like
# malignant cells, graded activity): four raised, the epithelial arm of the signed EMT pair lowered (migrating
# CSCs are mesenchymal). Every other shipped set is left unplanted: its genes vary only with the baseline, the
# patient's batch shift and CNVs, never between stem-like and other malignant cells (they are kept out of the
# breadth module). tests/test_simulate.py checks that these lists equal the shipped sets.
PLANTED_PROGRAMMES: dict[str, list[str]] = {
    "WNT_BETACATENIN": ["AXIN2", "NKD1", "NKD2", "NOTUM", "SP5", "LGR5", "RNF43", "ZNRF3", "APCDD1"],
    "NOTCH": ["HES1", "HES5", "HEY1", "HEY2", "HEYL", "NRARP"],
    "HEDGEHOG": ["GLI1", "PTCH1", "PTCH2", "HHIP"],
    "EMT_CORE": ["SNAI1", "SNAI2", "TWIST1", "ZEB1", "ZEB2", "VIM", "CDH2", "FN1"],
    "EMT_CORE_DN": ["CDH1", "CLDN4", "CLDN7", "OCLN", "ESRP1", "GRHL2", "KRT19"],
}
PLANTED_DIRECTION: dict[str, int] = {"WNT_BETACATENIN": 1, "NOTCH": 1, "HEDGEHOG": 1, "EMT_CORE": 1, "EMT_CORE_DN": -1}
PROGRAMME_LOG_EFFECT = 4.0  # log-mean shift of a programme gene in a programme cell at activity 1
PROGRAMME_ACTIVITY = (0.3, 1.0)  # activity of a programme cell ~ uniform on this range (0 in every other cell)
# The lowered arm is carcinoma identity: its epithelial genes are raised by this log-mean in every malignant cell, so
# that what the programme cells lose is expressed to begin with (a rank score such as AUCell cannot see a fall in
# genes that never reach a cell's top ranks).
EPITHELIAL_LOG_EFFECT = 3.0
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


def curated_gene_sets(species: str = "human") -> dict[str, list[str]]:
    """The shipped metastasis gene sets (data/gene_sets/metastasis_<species>.gmt) as {set: genes}."""
    path = resources.files("metastem") / "data" / "gene_sets" / f"metastasis_{species}.gmt"
    sets = {}
    for line in path.read_text().splitlines():
        parts = line.rstrip("\n").split("\t")
        if len(parts) > 2 and not line.startswith("#"):
            sets[parts[0]] = [g for g in parts[2:] if g]
    return sets


def _curated_genes() -> list[str]:
    """Every gene of the shipped human metastasis sets: always simulated, so that every shipped set can be
    scored on the demo, and never in the breadth module, so that an unplanted set stays unplanted."""
    return list(dict.fromkeys(g for genes in curated_gene_sets().values() for g in genes))


def _gene_universe(n_genes: int, rng: np.random.Generator) -> list[str]:
    required = (STEM_GENES + CYCLING_GENES + BRANCH_A_GENES + BRANCH_B_GENES + MITO_GENES + HB_GENES
                + [g for genes in PLANTED_PROGRAMMES.values() for g in genes] + _curated_genes()
                + [p[k] for p in PLANTED_INTERACTIONS for k in ("ligand", "receptor")])
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


def _take_rows_at(chunks: list[sp.csr_matrix], rows: np.ndarray) -> sp.csr_matrix:
    """Like _take_rows for row blocks of any sizes (the cohort's blocks end at sample boundaries)."""
    starts = np.cumsum([0] + [c.shape[0] for c in chunks])
    cid = np.searchsorted(starts, rows, side="right") - 1
    o = np.argsort(cid, kind="stable")
    parts = [chunks[c][rows[o][cid[o] == c] - starts[c]] for c in np.unique(cid)]
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


def _planted_truth(frac_programme_cells: float) -> str:
    """The planted programmes as JSON text (h5ad holds no nested records): one record per set with its
    direction and effect sizes on the simulator's log-mean scale."""
    lo, hi = PROGRAMME_ACTIVITY
    recs = [{"set": k, "direction": "up" if PLANTED_DIRECTION[k] > 0 else "down", "genes": list(v),
             "cells": "programme cells: a random frac_programme_cells of the stem-like malignant cells",
             "frac_stem_like_cells": float(frac_programme_cells), "activity": [lo, hi],
             "baseline_log_effect_malignant": EPITHELIAL_LOG_EFFECT if PLANTED_DIRECTION[k] < 0 else 0.0,
             "log_effect_per_activity": PLANTED_DIRECTION[k] * PROGRAMME_LOG_EFFECT,
             # mean log-mean shift over all stem-like cells (programme share x mean activity x effect)
             "mean_log_effect_stem_like": PLANTED_DIRECTION[k] * PROGRAMME_LOG_EFFECT * frac_programme_cells
             * (lo + hi) / 2}
            for k, v in PLANTED_PROGRAMMES.items()]
    return json.dumps(recs)


def planted_truth(adata: ad.AnnData) -> pd.DataFrame:
    """The planted programmes of a simulated AnnData (``uns['simulation']['planted_truth']``), one row per set:
    ``set``, ``direction`` ('up' / 'down' in stem-like malignant cells), ``genes``, ``frac_stem_like_cells``,
    ``log_effect_per_activity`` and ``mean_log_effect_stem_like`` (log-mean scale, signed)."""
    return pd.DataFrame(json.loads(adata.uns["simulation"]["planted_truth"]))


def _simulate_single(n_cells: int, n_genes: int, *, seed: int, frac_doublets: float, frac_low_quality: float,
                     mean_library_size: float, frac_programme_cells: float, chunk_size: int) -> ad.AnnData:
    """One sample of malignant cells only, no CNVs: the model as it was before the tumour cohort, selected by
    n_samples=1, frac_normal=0, n_cnv_arms=0."""
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
    epi_i = np.concatenate([gi for k, gi in prog_i.items() if PLANTED_DIRECTION[k] < 0])
    special = np.unique(np.concatenate([stem_i, cyc_i, a_i, b_i, mito_i, hb_i, ribo_i, *prog_i.values(),
                                        idx(_curated_genes())]))
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
    activity = programme * rng.uniform(*PROGRAMME_ACTIVITY, size=n)
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
        *[(gi, PLANTED_DIRECTION[k] * PROGRAMME_LOG_EFFECT * activity) for k, gi in prog_i.items()],
        (epi_i, np.full(n, EPITHELIAL_LOG_EFFECT)),
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
        "planted_truth": _planted_truth(frac_programme_cells),
        "stem_genes": STEM_GENES, "cycling_genes": CYCLING_GENES,
    }
    return adata


# ----------------------------------------------------------------------------- the tumour cohort

# Normal compartments of a tumour sample: marker genes (real symbols) that the malignant-cell rules of
# metastem.cnv look for, plus niche ligands. T cells and myeloid cells share PTPRC (pan-leukocyte).
NORMAL_TYPES: dict[str, list[str]] = {
    "T_cell": ["PTPRC", "CD3E", "CD3D", "CD2", "CD247", "IL7R", "GZMA", "NKG7", "CD52", "TRAC"],
    "myeloid": ["PTPRC", "CD68", "LYZ", "CD14", "S100A8", "S100A9", "FCGR3A", "CSF1R", "AIF1", "TYROBP",
                "C1QA", "C1QB"],
    "fibroblast": ["DCN", "LUM", "COL1A1", "COL1A2", "COL3A1", "PDGFRA", "PDGFRB", "FAP", "FBLN1"],
    "endothelial": ["PECAM1", "VWF", "KDR", "FLT1", "CDH5", "CLDN5", "EMCN", "ESAM"],
}
NORMAL_TYPE_SHARES = {"T_cell": 0.35, "myeloid": 0.25, "fibroblast": 0.25, "endothelial": 0.15}
# Log-mean shift of a normal type's marker genes in its own cells (~55-fold). It sets how much of a normal cell's
# library its markers take, hence its complexity: at +6.5 they took most of it and normal cells detected 4.4x fewer
# genes than malignant ones at the same depth (median 212-309 vs 1192 genes), against 1.1-1.7x in the real
# oligodendroglioma data (malignant 3.7k-5.2k genes, normal 3.0k-3.4k; ../shared/datasets/README.md); at +4.0 the
# ratio is 1.7x (582-753 vs 1192), and a sample-wide QC genes bound no longer falls inside the normal compartments.
NORMAL_LOG_EFFECT = 4.0
# Planted ligand-receptor pairs (issue 16): niche ligands made by stromal and immune cells (log-mean +6.5 in the
# sender type), their receptors raised in every stem-like malignant cell (+2.0, on top of the graded programmes
# above): fibroblast CXCL12 -> CXCR4 and HGF -> MET, endothelial Jagged-1 -> NOTCH1 (the Notch readout is planted
# in the same cells), myeloid osteopontin (SPP1) -> CD44.
PLANTED_INTERACTIONS: list[dict[str, str]] = [
    {"ligand": "CXCL12", "receptor": "CXCR4", "sender": "fibroblast", "receiver": "stem_like_malignant"},
    {"ligand": "HGF", "receptor": "MET", "sender": "fibroblast", "receiver": "stem_like_malignant"},
    {"ligand": "JAG1", "receptor": "NOTCH1", "sender": "endothelial", "receiver": "stem_like_malignant"},
    {"ligand": "SPP1", "receptor": "CD44", "sender": "myeloid", "receiver": "stem_like_malignant"},
]
LIGAND_LOG_EFFECT, RECEPTOR_LOG_EFFECT = 6.5, 2.0
# In the cohort, the malignant branch B is mesenchymal-like (smooth-muscle genes and its own extra genes)
# without the fibroblast ECM genes, so that fibroblasts stay the only COL1A1/DCN-high cells.
_FIBROBLAST_ONLY = {"COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "POSTN", "SPARC"}

# Approximate GRCh38 centromere midpoints (Mb, UCSC hg38 centromere track): where p arms end and q arms begin.
CENTROMERE_MB = {
    "chr1": 123.4, "chr2": 93.9, "chr3": 90.9, "chr4": 50.0, "chr5": 48.8, "chr6": 59.8, "chr7": 60.1,
    "chr8": 45.2, "chr9": 43.0, "chr10": 39.8, "chr11": 53.4, "chr12": 35.5, "chr13": 17.7, "chr14": 17.2,
    "chr15": 19.0, "chr16": 36.8, "chr17": 25.1, "chr18": 18.5, "chr19": 26.2, "chr20": 28.1, "chr21": 12.0,
    "chr22": 15.0,
}
_MIN_ARM_GENES = 60  # arms with fewer simulated genes carry no planted CNV (too little signal to plant)


def chromosome_arms(genes: list[str], species: str = "human") -> pd.Series:
    """Arm of each gene ('7p', '10q', ...; '' when the gene has no autosomal position), from the shipped
    gene-position table and approximate centromeres."""
    from metastem.cnv import gene_position_table

    pos = gene_position_table(species).set_index("symbol")
    pos = pos.reindex(pd.Index(genes))
    cen = pos["chromosome"].map(CENTROMERE_MB)
    ok = cen.notna() & pos["start"].notna()
    arm = pd.Series("", index=pd.Index(genes), dtype=object)
    arm[ok] = (pos.loc[ok, "chromosome"].str.removeprefix("chr")
               + np.where(pos.loc[ok, "start"] / 1e6 < cen[ok], "p", "q"))
    return arm


def _plant_cnvs(arm: pd.Series, n_samples: int, n_arms: int, gain: float, loss: float,
                rng: np.random.Generator) -> list[list[dict]]:
    """Per sample, ``n_arms`` distinct arms (with >= _MIN_ARM_GENES genes, or else the 2 x n_arms arms
    holding the most genes), alternating gain and loss."""
    counts = arm[arm != ""].value_counts()
    eligible = sorted(counts.index[counts >= _MIN_ARM_GENES])
    if len(eligible) < 2 * n_arms:  # few genes (small test data): the arms holding the most genes
        eligible = sorted(counts.index[:2 * n_arms])
    if n_arms > len(eligible):
        raise ValueError(f"n_cnv_arms={n_arms} but only {len(eligible)} chromosome arms hold simulated genes")
    events = []
    for _ in range(n_samples):
        arms = rng.choice(eligible, size=n_arms, replace=False)
        events.append([{"arm": str(a), "kind": "gain" if k % 2 == 0 else "loss",
                        "fold": gain if k % 2 == 0 else loss, "n_genes": int(counts[a])}
                       for k, a in enumerate(arms)])
    return events


def _default_stem_fractions(n_samples: int) -> list[float]:
    """Planted stem-like shares of the malignant cells, different in every patient (8 % to 22 %)."""
    if n_samples == 1:
        return [0.15]
    return [round(float(x), 3) for x in np.linspace(0.08, 0.22, n_samples)]


def _simulate_cohort(n_cells: int, n_genes: int, *, seed: int, frac_doublets: float, frac_low_quality: float,
                     mean_library_size: float, frac_programme_cells: float, n_samples: int, frac_normal: float,
                     stem_fractions, n_cnv_arms: int, cnv_gain: float, cnv_loss: float,
                     batch_sd: float) -> ad.AnnData:
    """Several patients: malignant hierarchy + CNVs per patient, normal compartments, batch shifts."""
    rng = np.random.default_rng(seed)
    stem_fractions = list(stem_fractions) or _default_stem_fractions(n_samples)
    if len(stem_fractions) != n_samples or not all(0 < s < 1 for s in stem_fractions):
        raise ValueError(f"stem_fractions needs {n_samples} values in (0, 1), got {stem_fractions}")
    # Gene universe: the single-sample genes plus the normal-compartment markers.
    from metastem.cnv import REFERENCE_MARKERS

    # every marker of the reference rules (also B-cell ones: no B cells here) is off outside its own type,
    # so random modules never make malignant cells look like a normal compartment
    extra_required = [g for genes in [*NORMAL_TYPES.values(), *REFERENCE_MARKERS.values()] for g in genes]
    genes = list(dict.fromkeys(_gene_universe(n_genes, rng)))
    have = set(genes)
    missing = [g for g in dict.fromkeys(extra_required) if g not in have]
    # Replace random (non-required) genes at the end by the missing markers, keeping n_genes.
    genes = genes[:len(genes) - len(missing)] + missing if missing else genes
    g_index = {g: i for i, g in enumerate(genes)}
    n_g = len(genes)
    idx = lambda names: np.array([g_index[g] for g in dict.fromkeys(names) if g in g_index], dtype=int)  # noqa: E731

    base = rng.normal(-1.0, 1.6, size=n_g)
    stem_i, cyc_i = idx(STEM_GENES), idx(CYCLING_GENES)
    a_i = idx(BRANCH_A_GENES)
    b_i = idx([g for g in BRANCH_B_GENES if g not in _FIBROBLAST_ONLY])
    mito_i, hb_i = idx(MITO_GENES), idx(HB_GENES)
    ribo_i = np.array([i for g, i in g_index.items() if g.startswith(("RPL", "RPS"))], dtype=int)
    prog_i = {k: idx(v) for k, v in PLANTED_PROGRAMMES.items()}
    epi_i = np.concatenate([gi for k, gi in prog_i.items() if PLANTED_DIRECTION[k] < 0])
    type_i = {k: idx(v) for k, v in NORMAL_TYPES.items()}
    ligand_i = {k: idx([p["ligand"] for p in PLANTED_INTERACTIONS if p["sender"] == k])
                for k in dict.fromkeys(p["sender"] for p in PLANTED_INTERACTIONS)}
    receptor_i = idx([p["receptor"] for p in PLANTED_INTERACTIONS])
    special = np.unique(np.concatenate([stem_i, cyc_i, idx(BRANCH_A_GENES), idx(BRANCH_B_GENES), mito_i, hb_i,
                                        ribo_i, *prog_i.values(), *type_i.values(), idx(extra_required),
                                        idx(_curated_genes()), *ligand_i.values(), receptor_i]))
    base[special] = rng.normal(-0.5, 0.5, size=special.size)
    base[mito_i] = rng.normal(2.5, 0.4, size=mito_i.size)
    base[ribo_i] = rng.normal(2.0, 0.5, size=ribo_i.size)
    base[hb_i] = -6.0
    base[idx(extra_required)] = rng.normal(-4.0, 0.4, size=idx(extra_required).size)  # markers off outside their type
    others = np.setdiff1d(np.arange(n_g), special)
    breadth_i = rng.choice(others, size=others.size // 3, replace=False)
    base[breadth_i] = rng.normal(-2.0, 0.8, size=breadth_i.size)
    rest_pool = np.setdiff1d(others, breadth_i)
    n_extra = min(60, rest_pool.size // 6)
    extra = rng.choice(rest_pool, size=6 * n_extra, replace=False)
    a_i, b_i = np.concatenate([a_i, extra[:n_extra]]), np.concatenate([b_i, extra[n_extra:2 * n_extra]])
    type_i = {k: np.concatenate([gi, extra[(2 + j) * n_extra:(3 + j) * n_extra]]).astype(int)
              for j, (k, gi) in enumerate(type_i.items())}  # 4 types: extra[2n:6n]

    # Patients: sizes, normal fractions, planted CNVs, batch shifts (gene scaling) and depth.
    samples = [f"P{i + 1}" for i in range(n_samples)]
    weights = np.linspace(0.8, 1.2, n_samples) if n_samples > 1 else np.ones(1)
    n_per = np.floor(n_cells * weights / weights.sum()).astype(int)
    n_per[-1] += n_cells - n_per.sum()
    normal_frac = frac_normal * (np.linspace(1.25, 0.75, n_samples) if n_samples > 1 else np.ones(1))
    arm = chromosome_arms(genes)
    events = _plant_cnvs(arm, n_samples, n_cnv_arms, cnv_gain, cnv_loss, rng) if n_cnv_arms else [[]] * n_samples
    gene_shift = rng.normal(0.0, batch_sd, size=(n_samples, n_g)) if batch_sd > 0 else np.zeros((n_samples, n_g))
    depth = np.exp(rng.normal(0.0, 0.25, size=n_samples)) if batch_sd > 0 else np.ones(n_samples)

    # Per-cell latent structure, sample by sample (cells of one sample are contiguous until the shuffle).
    n = n_cells
    sample_of = np.repeat(np.arange(n_samples), n_per)
    cell_type = np.empty(n, dtype=object)
    t = np.full(n, np.nan)
    from scipy.stats import beta as beta_dist

    f_stem = beta_dist.cdf(0.2, 1.1, 1.3)
    for s in range(n_samples):
        rows = np.flatnonzero(sample_of == s)
        n_norm = int(round(normal_frac[s] * rows.size))
        types = rng.choice(list(NORMAL_TYPE_SHARES), size=n_norm, p=list(NORMAL_TYPE_SHARES.values()))
        cell_type[rows[:n_norm]] = types
        mal = rows[n_norm:]
        cell_type[mal] = "malignant"
        # Exactly round(share x malignant cells) stem-like cells (t < 0.2); the others from the rest of the
        # same Beta(1.1, 1.3) time as the single-sample simulator, so the hierarchy keeps its shape.
        n_stem = int(round(stem_fractions[s] * mal.size))
        u = np.concatenate([rng.uniform(0, f_stem, n_stem), rng.uniform(f_stem, 1, mal.size - n_stem)])
        t[mal] = beta_dist.ppf(u, 1.1, 1.3)
    malignant = cell_type == "malignant"
    t_m = np.where(malignant, t, 1.0)  # placeholder time for normal cells in the formulas below (not truth)
    branch = np.where(~malignant, "normal", np.where(t_m < 0.3, "trunk", np.where(rng.random(n) < 0.5, "A", "B")))
    stem_like = malignant & (t_m < 0.2)
    programme = stem_like & (rng.random(n) < frac_programme_cells)
    activity = programme * rng.uniform(*PROGRAMME_ACTIVITY, size=n)
    mito_shift = rng.normal(0.0, 0.2, size=n)
    low_q = rng.random(n) < frac_low_quality
    lib = rng.lognormal(np.log(mean_library_size), 0.35, size=n)
    lib = lib * np.where(malignant, 1.0 + 0.6 * (1.0 - t_m), 1.0)
    lib = lib * np.select([cell_type == "T_cell", cell_type == "myeloid"], [0.45, 0.7], default=0.9)
    lib = lib * depth[sample_of]
    lib[low_q] /= 6.0
    state = np.where(malignant, np.select([t_m < 0.2, t_m < 0.45], ["stem", "progenitor"],
                                          default=np.where(branch == "A", "branch_A", "branch_B")), cell_type)

    ramp = np.clip((t_m - 0.3) / 0.7, 0, 1) * malignant
    breadth = np.where(malignant, -4.0 * np.clip((t_m - 0.1) / 0.6, 0, 1) + 1.0, -2.5)
    modules = [
        (stem_i, 3.0 * np.clip(1 - t_m / 0.4, 0, 1) * malignant),
        (breadth_i, breadth),
        (cyc_i, 2.5 * np.exp(-((t_m - 0.35) ** 2) / 0.01) * malignant),
        (a_i, 3.5 * ramp * (branch == "A")),
        (b_i, 3.5 * ramp * (branch == "B")),
        *[(gi, PLANTED_DIRECTION[k] * PROGRAMME_LOG_EFFECT * activity) for k, gi in prog_i.items()],
        (epi_i, EPITHELIAL_LOG_EFFECT * malignant),
        (mito_i, 2.5 * low_q + mito_shift),
        *[(gi, NORMAL_LOG_EFFECT * (cell_type == k)) for k, gi in type_i.items()],
        *[(gi, LIGAND_LOG_EFFECT * (cell_type == k)) for k, gi in ligand_i.items()],
        (receptor_i, RECEPTOR_LOG_EFFECT * stem_like),
    ]
    arm_values = arm.to_numpy()
    for s, evs in enumerate(events):
        for ev in evs:
            modules.append((np.flatnonzero(arm_values == ev["arm"]),
                            np.log(ev["fold"]) * (malignant & (sample_of == s))))

    block = 2000
    chunks = []
    for s in range(n_samples):
        rows = np.flatnonzero(sample_of == s)
        for s0 in range(rows[0], rows[-1] + 1, block):
            sl = slice(s0, min(rows[-1] + 1, s0 + block))
            chunks.append(_sample_counts(rng, base + gene_shift[s], modules, lib[sl], sl))
    names = np.array([f"{samples[s]}_cell{i:06d}" for i, s in enumerate(sample_of)])
    obs = pd.DataFrame({
        "sample": np.array(samples)[sample_of], "true_sample": np.array(samples)[sample_of],
        "true_malignant": malignant, "true_cell_type": cell_type.astype(str),
        "true_pseudotime": np.where(malignant, t_m, np.nan), "true_stem_like": stem_like, "true_branch": branch,
        "true_state": state, "true_doublet": False, "true_low_quality": low_q, "true_programme": programme,
    }, index=names)

    # Doublets: sums of two healthy cells of the same sample, carrying the first cell's truth.
    n_dbl = int(round(frac_doublets * n))
    if n_dbl:
        healthy = np.flatnonzero(~low_q)
        pa = rng.choice(healthy, size=n_dbl)
        pb = np.empty_like(pa)
        for s in range(n_samples):
            here = sample_of[pa] == s
            pool = healthy[sample_of[healthy] == s]
            pb[here] = rng.choice(pool, size=int(here.sum()))
        chunks.append(_take_rows_at(chunks, pa) + _take_rows_at(chunks, pb))
        dbl = obs.iloc[pa].copy()
        dbl["true_doublet"] = True
        dbl.index = [f"{samples[sample_of[a]]}_doublet{i:05d}" for i, a in enumerate(pa)]
        obs = pd.concat([obs, dbl])
    for col in ("sample", "true_sample", "true_cell_type", "true_branch", "true_state"):
        obs[col] = pd.Categorical(obs[col])
    order = rng.permutation(len(obs))
    X = _assemble_rows(chunks, order, n_g)
    adata = ad.AnnData(X=X, obs=obs.iloc[order], var=pd.DataFrame(index=pd.Index(genes, name="gene_symbols")))
    malignant_obs = adata.obs["true_malignant"].to_numpy() & ~adata.obs["true_doublet"].to_numpy()
    adata.uns["simulation"] = {
        "seed": seed, "n_cells": n_cells, "n_genes": n_g, "n_samples": n_samples, "samples": samples,
        "planted_programmes": {k: list(v) for k, v in PLANTED_PROGRAMMES.items()},
        "planted_truth": _planted_truth(frac_programme_cells),
        "stem_genes": STEM_GENES, "cycling_genes": CYCLING_GENES,
        "normal_types": {k: list(v) for k, v in NORMAL_TYPES.items()},
        "planted_interactions": json.dumps(PLANTED_INTERACTIONS),
        "cnv_events": json.dumps({samples[s]: evs for s, evs in enumerate(events)}),
        # planted share of stem-like cells among each patient's malignant cells (exact, before doublets)
        "stem_fraction": {samples[s]: float(stem_fractions[s]) for s in range(n_samples)},
        "stem_fraction_realised": {
            samples[s]: float(adata.obs.loc[malignant_obs & (adata.obs["sample"] == samples[s]).to_numpy(),
                                            "true_stem_like"].mean()) for s in range(n_samples)},
        "normal_fraction": {samples[s]: float(normal_frac[s]) for s in range(n_samples)},
        "batch_sd": float(batch_sd), "depth_factor": {samples[s]: float(depth[s]) for s in range(n_samples)},
    }
    return adata


def simulate_tumour(n_cells: int = 3000, n_genes: int = 4000, *, seed: int = 0,
                    frac_doublets: float = 0.05, frac_low_quality: float = 0.05,
                    mean_library_size: float = 6000.0, frac_programme_cells: float = 0.7,
                    chunk_size: int = 5000, n_samples: int = 3, frac_normal: float = 0.3,
                    stem_fractions: Sequence[float] = (), n_cnv_arms: int = 6, cnv_gain: float = 1.5,
                    cnv_loss: float = 0.5, batch_sd: float = 0.25) -> ad.AnnData:
    """Simulate raw UMI counts of a tumour with a branching stem-cell hierarchy.

    By default a cohort of ``n_samples`` patients is simulated (why: real tumour data mix patients and normal cells, and the
    pipeline must tell malignant from normal and call stem-like cells within each tumour):

    - every patient has its own batch shift: a per-gene log-scale factor (sd ``batch_sd``) and a depth factor;
    - malignant cells (``1 - frac_normal`` of a patient's cells, varying +-25 % between patients) follow
      the branching hierarchy of the single-sample model and carry ``n_cnv_arms`` planted arm-level
      gains (x ``cnv_gain``) and losses (x ``cnv_loss``) of that patient, at the genes' real GRCh38
      positions (shipped gene table, approximate centromeres), alternating gain/loss;
    - exactly ``stem_fractions[p]`` of patient p's malignant cells are stem-like (t < 0.2); by default the
      shares differ per patient (8 % to 22 %), so that per-patient calls can be checked;
    - normal T cells, myeloid cells, fibroblasts and endothelial cells (``NORMAL_TYPES``), without CNVs,
      with a differentiated (low) breadth of transcription;
    - planted ligand-receptor pairs (``PLANTED_INTERACTIONS``): fibroblasts make CXCL12 and HGF, endothelial
      cells JAG1, myeloid cells SPP1; every stem-like malignant cell raises CXCR4, MET, NOTCH1 and CD44;
      the readout programmes (``PLANTED_PROGRAMMES``, signed by ``PLANTED_DIRECTION``) are planted as in the
      single-sample model.

    ``n_samples=1, frac_normal=0, n_cnv_arms=0`` gives the single-sample simulator (malignant cells of one
    patient only, no CNVs), the model as it was before the cohort existed.

    Returns AnnData (CSR float32 counts) with ground truth in ``obs``: ``true_pseudotime`` (NaN for
    normal cells), ``true_stem_like``, ``true_branch`` ('normal' for normal cells), ``true_state``,
    ``true_doublet``, ``true_low_quality``, ``true_programme``; for a cohort also ``sample`` and
    ``true_sample`` (the patient), ``true_malignant`` and ``true_cell_type``; planted values in
    ``uns['simulation']`` (``cnv_events``, ``planted_interactions`` and ``planted_truth`` as JSON text, read
    the last with :func:`planted_truth`; ``stem_fraction`` per patient).
    """
    if n_samples < 1:
        raise ValueError("n_samples must be at least 1")
    if not 0 <= frac_normal < 1:
        raise ValueError("frac_normal must be in [0, 1)")
    if n_samples == 1 and frac_normal == 0 and n_cnv_arms == 0:
        return _simulate_single(n_cells, n_genes, seed=seed, frac_doublets=frac_doublets,
                                frac_low_quality=frac_low_quality, mean_library_size=mean_library_size,
                                frac_programme_cells=frac_programme_cells, chunk_size=chunk_size)
    return _simulate_cohort(n_cells, n_genes, seed=seed, frac_doublets=frac_doublets,
                            frac_low_quality=frac_low_quality, mean_library_size=mean_library_size,
                            frac_programme_cells=frac_programme_cells, n_samples=n_samples,
                            frac_normal=frac_normal, stem_fractions=stem_fractions, n_cnv_arms=n_cnv_arms,
                            cnv_gain=cnv_gain, cnv_loss=cnv_loss, batch_sd=batch_sd)
