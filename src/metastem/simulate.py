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

Counts are negative binomial (gamma-Poisson). Cells are generated in chunks so that 250k cells x 20k
genes fits in memory as CSR.
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


def simulate_tumour(n_cells: int = 3000, n_genes: int = 4000, *, seed: int = 0,
                    frac_doublets: float = 0.05, frac_low_quality: float = 0.05,
                    mean_library_size: float = 6000.0, frac_programme_cells: float = 0.6,
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
    low_q = rng.random(n) < frac_low_quality
    lib = rng.lognormal(np.log(mean_library_size), 0.35, size=n)
    lib = lib * (1.0 + 0.6 * (1.0 - t))          # stem-like cells are larger and richer in mRNA
    lib[low_q] /= 6.0
    state = np.select([t < 0.2, t < 0.45], ["stem", "progenitor"],
                      default=np.where(branch == "A", "branch_A", "branch_B"))

    chunks = []
    for start in range(0, n, chunk_size):
        sl = slice(start, min(n, start + chunk_size))
        tt = t[sl][:, None]
        logmu = np.broadcast_to(base, (tt.shape[0], n_g)).astype(np.float32).copy()
        logmu[:, stem_i] += (3.0 * np.clip(1 - tt / 0.4, 0, 1))
        logmu[:, breadth_i] += (-4.0 * np.clip((tt - 0.1) / 0.6, 0, 1)) + 1.0
        cyc = np.exp(-((tt - 0.35) ** 2) / 0.01)
        logmu[:, cyc_i] += 2.5 * cyc
        ramp = np.clip((tt - 0.3) / 0.7, 0, 1)
        br = branch[sl][:, None]
        logmu[:, a_i] += 3.5 * ramp * (br == "A")
        logmu[:, b_i] += 3.5 * ramp * (br == "B")
        prog = programme[sl]
        for gi in prog_i.values():
            logmu[np.ix_(prog, gi)] += 2.5
        lq = low_q[sl]
        logmu[np.ix_(lq, mito_i)] += 2.5
        mu = np.exp(logmu, dtype=np.float32)
        mu *= (lib[sl] / mu.sum(axis=1))[:, None]
        shape = 2.0  # NB dispersion: gamma-Poisson with shape 2
        lam = rng.gamma(shape, mu / shape).astype(np.float32)
        counts = rng.poisson(lam).astype(np.float32)
        chunks.append(sp.csr_matrix(counts))
    X = sp.vstack(chunks, format="csr")

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
        X = sp.vstack([X, X[pa] + X[pb]], format="csr")
        dbl = obs.iloc[pa].copy()
        dbl["true_doublet"] = True
        dbl.index = [f"doublet{i:05d}" for i in range(n_dbl)]
        obs = pd.concat([obs, dbl])
    obs["true_branch"] = pd.Categorical(obs["true_branch"])
    order = rng.permutation(X.shape[0])  # doublets must not sit at the end of the matrix
    adata = ad.AnnData(X=X[order].astype(np.float32), obs=obs.iloc[order],
                       var=pd.DataFrame(index=pd.Index(genes, name="gene_symbols")))
    adata.uns["simulation"] = {
        "seed": seed, "n_cells": n_cells, "n_genes": n_g,
        "planted_programmes": {k: list(v) for k, v in PLANTED_PROGRAMMES.items()},
        "stem_genes": STEM_GENES, "cycling_genes": CYCLING_GENES,
    }
    return adata
