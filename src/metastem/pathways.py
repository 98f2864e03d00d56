"""Migration/metastasis pathways shared by normal stem cells and CSCs (Li, Tiede, Massagué & Kang 2007).

The final analysis stage asks one question per curated (or user) gene set: is the set's programme
higher (or lower) in CSC-like malignant cells than in the other malignant cells of the same tumour,
by more than gene sets of the same size and expression would be? It is built so that the answer
cannot come from the way it is computed:

- **scores** (``obs['pathway_<SET>']``): AUCell ranks per cell, ties sharing their positions, so a
  score never depends on gene order (or scanpy ``score_genes`` with a fixed seed);
- **no circularity**: genes of the stemness score (the gene-count signature and the stemness sets)
  are left out of every pathway set before scoring (listed per set in the coverage table), and the
  marker sets that define CSC-like cells are scored as a *positive control*, never a finding;
- **matched null**: for every set, ``n_null`` random sets of the same size, drawn gene by gene from
  the same bin of mean expression x detection among the analysed cells, scored in the same pass
  over the cells; a set is called only on its empirical p (BH across sets);
- **the sample is the unit**: the effect (Cohen's d of CSC-like vs other malignant cells) is taken
  within each sample with a bootstrap 95 % CI over that sample's cells; the overall effect is the
  mean over samples; "replicated" needs a call, >= 3 samples, the same sign in >= 80 % of them and a
  BH q < ``fdr`` of a one-sample t-test of the per-sample effects beyond their matched null (a paired
  test of CSC-like vs other cells across samples). With fewer samples every result is labelled
  "descriptive (n = k samples)";
- GSEA prerank of CSC-like vs other malignant cells (Wilcoxon z) and ssGSEA of cluster pseudobulks
  (gseapy, offline), descriptive.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import anndata as ad
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats as ss

from metastem._keys import Obs
from metastem.cluster import subsample_per_group
from metastem.errors import MetastemError
from metastem.genesets import (aucell_grouped, col_sums, gene_set_coverage, read_aliases, read_gmt,
                               score_genes_matrix)
from metastem.multitest import bh_adjust

log = logging.getLogger(__name__)

PREFIX = Obs.PATHWAY_PREFIX  # "pathway_"
FLAG_OK, FLAG_FEW, FLAG_ABSENT, FLAG_NO_SIGNAL = "ok", "few_genes", "absent", "no_signal"
ROLE_PATHWAY, ROLE_CONTROL, ROLE_NICHE = "pathway", "positive_control", "niche"
# Sets named <NAME>_NICHE list what niche cells express (ligands, niche-cell receptors; metastasis_provenance.tsv,
# column 'side'): CXCL12 is made by stroma, SELE/VCAM1 by endothelium, S100A8/A9 by myeloid cells. They are scored
# per cell and read per cell type and in the niche ligand-receptor table, never as a CSC-like vs other-malignant
# contrast (the review's model is a conversation between CSCs and their niche, not a programme of the tumour cell).
NICHE_SUFFIX = "_NICHE"
CALL_NICHE = "niche side: read per cell type and in the niche table"
MIN_GROUP_CELLS = 3          # a sample enters the contrast with at least this many cells in each group
MIN_REPLICATION_SAMPLES = 3  # 'replicated' needs at least this many samples ...
MIN_SIGN_FRACTION = 0.8      # ... with the same sign in at least this fraction of them
# A sample's bootstrap CI needs at least this many CSC-like cells with a non-zero score. With fewer, every resample
# holds the same few (often none) and the interval is far too narrow; a zero count says least in the smaller group.
# Measured on the demo tumour (true groups, every shipped set, seeds 0-2, against a 10x larger draw of the same
# patients): 78 % of all intervals covered the population effect, 13 % with no such cell, 92 % of those with >= 5
# CSC-like cells with signal; requiring 5 in the other group as well withheld more and covered no better
# (benchmarks/pathway_ci_coverage.py).
MIN_SIGNAL_CELLS = 5
SUMMARY_COLUMNS = ["set", "effect", "ci_low", "ci_high", "q_null", "replicated", "call"]


@dataclass
class PathwaySets:
    """Gene sets with where each came from, so that errors can name the file to fix."""

    genes: dict[str, list[str]] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    user: set[str] = field(default_factory=set)

    def add_file(self, path: str, *, user: bool) -> None:
        for name, genes in read_gmt(path).items():
            if name in self.genes:
                raise MetastemError(f"set '{name}' is defined in both {self.source[name]} and {path}",
                                    file=path, fix="rename one of the two sets")
            self.genes[name] = genes
            self.source[name] = path
            if user:
                self.user.add(name)


def load_pathway_sets(gene_sets: Sequence[str], extra_gene_sets: Sequence[str], species: str) -> PathwaySets:
    """Curated GMT files plus the user's (``pathways.extra_gene_sets``); '{species}' is expanded and
    ``metastem:<file>`` names a file shipped with the package."""
    sets = PathwaySets()
    for paths, user in ((gene_sets, False), (extra_gene_sets, True)):
        for p in paths:
            sets.add_file(str(p).replace("{species}", species), user=user)
    return sets


def _absent_error(name: str, source: str, species: str, n_genes: int, example: list[str]) -> MetastemError:
    case_hint = ("the set's symbols look human (upper-case) but the data are mouse"
                 if species == "mouse" and all(g.isupper() for g in example) else
                 "the set's symbols look mouse (capitalised) but the data are human"
                 if species == "human" and all(g[:1].isupper() and g[1:] != g[1:].upper() for g in example) else
                 "none of its symbols is in the data")
    return MetastemError(f"gene set '{name}' has none of its {n_genes} genes (e.g. {', '.join(example[:3])}) "
                         f"in the data; {case_hint}", file=source,
                         fix=f"use {species} gene symbols in this GMT (or check the dataset's species), "
                             "or remove the set")


def set_role(name: str, positive_controls: Sequence[str] = ()) -> str:
    """``positive_control`` (defines CSC-like cells), ``niche`` (a name ending in ``_NICHE``: what niche cells
    express) or ``pathway`` (read out in malignant cells, the tested family)."""
    if name in set(positive_controls):
        return ROLE_CONTROL
    return ROLE_NICHE if str(name).endswith(NICHE_SUFFIX) else ROLE_PATHWAY


def pathway_coverage(adata: ad.AnnData, sets: PathwaySets, *, min_genes_found: int = 3,
                     aliases: dict[str, str] | None = None, species: str = "human",
                     exclude_genes: Sequence[str] = (), positive_controls: Sequence[str] = ()) -> pd.DataFrame:
    """Coverage table with the genes each set is scored on, its ``role`` and ``flag``.

    Pathway sets lose the genes in ``exclude_genes`` (the stemness score's genes: testing a set that
    contains them against CSC-like cells, the top of that score, would test the score against
    itself); ``genes_excluded_stemness`` lists them and ``n_used`` counts what is left. Positive
    controls keep all their genes. A user set with no gene present, or a GMT file none of whose sets
    is present, is an error (almost always the wrong species or identifier type); a curated set
    absent from a small panel is flagged ``absent`` and not scored.
    """
    cov = gene_set_coverage(sets.genes, adata.var_names, aliases)
    cov.insert(1, "source", cov["set"].map(sets.source))
    cov.insert(2, "role", [set_role(name, positive_controls) for name in cov["set"]])
    excluded = set(map(str, exclude_genes))
    used, dropped = [], []
    for rec in cov.itertuples():
        found = [g for g in rec.genes_found.split(",") if g]
        drop = [g for g in found if g in excluded] if rec.role == ROLE_PATHWAY else []
        used.append(",".join(g for g in found if g not in drop))
        dropped.append(",".join(drop))
    cov["genes_excluded_stemness"] = dropped
    cov["n_excluded_stemness"] = [len([g for g in d.split(",") if g]) for d in dropped]
    cov["genes_used"] = used
    cov["n_used"] = [len([g for g in u.split(",") if g]) for u in used]
    cov["flag"] = np.select([cov["n_found"] == 0, cov["n_used"] < min_genes_found], [FLAG_ABSENT, FLAG_FEW], FLAG_OK)
    for rec in cov[cov["n_found"] == 0].itertuples():
        if rec.set in sets.user:
            raise _absent_error(rec.set, rec.source, species, rec.n_genes, sets.genes[rec.set])
    for source, grp in cov.groupby("source"):
        if (grp["n_found"] == 0).all():
            first = grp.iloc[0]
            raise _absent_error(first["set"], source, species, first["n_genes"], sets.genes[first["set"]])
    for rec in cov[cov["flag"] != FLAG_OK].itertuples():
        log.warning("gene set %s: %d of %d genes used (%s)", rec.set, rec.n_used, rec.n_genes, rec.flag)
    return cov


def scored_sets(adata: ad.AnnData) -> list[str]:
    """Names of the sets scored in ``obs`` (order of the columns)."""
    return [c[len(PREFIX):] for c in adata.obs.columns if c.startswith(PREFIX)]


def genes_detected(adata: ad.AnnData, key: str = "n_genes_by_counts") -> np.ndarray:
    """Genes detected per cell: from QC's ``obs`` column when present, else counted from X."""
    if key in adata.obs:
        return adata.obs[key].to_numpy(dtype=float)
    X = adata.X if sp.issparse(adata.X) else np.asarray(adata.X)
    return np.asarray((X > 0).sum(axis=1), dtype=float).ravel()


def csc_contrast(score: np.ndarray, is_csc: np.ndarray) -> tuple[float, float]:
    """(AUROC, Cliff's delta) of CSC-like vs other cells, descriptive; NaN if a group is empty.

    AUROC = P(score of a CSC-like cell > score of another cell) + ½ P(tie); delta = 2·AUROC − 1.
    """
    is_csc = np.asarray(is_csc, dtype=bool)
    ok = np.isfinite(score)
    a, b = score[ok & is_csc], score[ok & ~is_csc]
    if a.size == 0 or b.size == 0:
        return np.nan, np.nan
    r = ss.rankdata(np.concatenate([a, b]))
    auroc = (r[:a.size].sum() - a.size * (a.size + 1) / 2) / (a.size * b.size)
    return float(auroc), float(2 * auroc - 1)


def spearman_finite(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Spearman rho and n over cells where both are finite (NaN pseudotime = unreachable is left out)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return np.nan, n
    return float(ss.spearmanr(x[ok], y[ok])[0]), n


def per_cluster_means(adata: ad.AnnData, groupby: str = "leiden") -> pd.DataFrame:
    """Mean pathway score per cluster (clusters × sets)."""
    cols = [f"{PREFIX}{s}" for s in scored_sets(adata)]
    df = adata.obs[cols + [groupby]].groupby(groupby, observed=True).mean()
    df.columns = [c[len(PREFIX):] for c in df.columns]
    return df


def resolved_sets(coverage: pd.DataFrame, column: str = "genes_used") -> dict[str, list[str]]:
    """{set: data names of the genes it is scored on} for every set with at least one (coverage table)."""
    col = column if column in coverage else "genes_found"
    return {r["set"]: r[col].split(",") for _, r in coverage.iterrows() if isinstance(r[col], str) and r[col]}


def _csc_mask(adata: ad.AnnData, key: str) -> np.ndarray:
    if key not in adata.obs:
        raise MetastemError(f"obs column '{key}' (CSC-like calls) is missing",
                            fix="run the stemness stage first, or pass its cells.tsv.gz to the pathways step")
    return adata.obs[key].astype(bool).to_numpy()


@dataclass
class Design:
    """Which cells enter the contrast, their group and sample: the experimental design of the test."""

    cells: np.ndarray        # bool, analysed cells (malignant when known)
    is_csc: np.ndarray       # bool, CSC-like among the analysed cells
    sample_codes: np.ndarray  # int, sample of every cell (codes of ``samples``)
    samples: list[str]
    notes: list[str]

    @property
    def n_samples(self) -> int:
        return len(self.samples)

    def group_codes(self, kept: np.ndarray) -> np.ndarray:
        """2 * sample + (1 if CSC-like) for analysed cells of kept samples, -1 for every other cell."""
        g = 2 * self.sample_codes + self.is_csc.astype(np.int64)
        return np.where(self.cells & kept[self.sample_codes], g, -1).astype(np.int64)


def design(adata: ad.AnnData, *, csc_key: str = "csc_like", malignant_key: str = "malignant",
           sample_key: str = "sample") -> Design:
    """The contrast's cells, groups and samples from obs.

    Analysed cells are the malignant ones when ``obs[malignant_key]`` exists (CSC-like is a call
    among malignant cells; with normal cells in the comparison it would become tumour vs stroma),
    else all cells, with a note. One sample when ``obs[sample_key]`` is absent, with a note.
    """
    notes = []
    is_csc = _csc_mask(adata, csc_key)
    if malignant_key in adata.obs:
        cells = adata.obs[malignant_key].astype(bool).to_numpy()
        if is_csc[~cells].any():
            notes.append(f"{int(is_csc[~cells].sum())} CSC-like cells are not malignant: left out of the contrast")
    else:
        cells = np.ones(adata.n_obs, dtype=bool)
        notes.append(f"no obs['{malignant_key}']: every cell is treated as a tumour cell")
    if sample_key in adata.obs:
        cat = pd.Categorical(adata.obs[sample_key].astype(str))
    else:
        cat = pd.Categorical(np.repeat("all cells", adata.n_obs))
        notes.append(f"no obs['{sample_key}']: the cells are treated as one sample")
    return Design(cells=cells, is_csc=is_csc & cells, sample_codes=np.asarray(cat.codes, dtype=np.int64),
                  samples=[str(c) for c in cat.categories], notes=notes)


# ----------------------------------------------------------------------------- GSEA (descriptive)

def wilcoxon_z(X: sp.spmatrix | np.ndarray, in_group: np.ndarray) -> np.ndarray:
    """Tie-corrected Mann-Whitney z of each column, group vs the other rows (scanpy's ``wilcoxon``
    with ``tie_correct=True``): :func:`metastem.markers.wilcoxon_z`, the rank sums computed from the
    stored values only (zeros are one tie block whose ranks are known); NaN for constant columns."""
    from metastem.markers import wilcoxon_z as z

    return z(X, in_group)


def wilcoxon_ranking(adata: ad.AnnData, is_csc: np.ndarray | str = "csc_like", *, max_cells: int | None = None,
                     seed: int = 0) -> pd.Series:
    """Genes ranked by the Wilcoxon z-statistic of CSC-like vs other cells, highest first.

    ``is_csc``: a boolean mask over ``adata``'s cells, or the obs column holding it. With
    ``max_cells``, each group is subsampled (seeded) to at most that many cells: the gene order is
    stable long before 100k cells, while the test's cost grows with them. Genes constant in both
    groups carry no rank information and are left out.
    """
    is_csc = _csc_mask(adata, is_csc) if isinstance(is_csc, str) else np.asarray(is_csc, dtype=bool)
    if is_csc.all() or not is_csc.any():
        raise MetastemError("CSC-like calls have a single value, so there is nothing to rank against",
                            fix="check the stemness stage's CSC-like calls (stemness.csc_quantile)")
    keep = subsample_per_group(is_csc, max_cells, seed)
    z = pd.Series(wilcoxon_z(adata.X[keep], is_csc[keep]), index=adata.var_names.astype(str))
    return z.dropna().sort_values(ascending=False, kind="stable")


def gsea_prerank(ranking: pd.Series, sets: dict[str, list[str]], *, permutations: int = 1000, seed: int = 0,
                 min_size: int = 2, threads: int = 1) -> pd.DataFrame:
    """GSEA prerank (gseapy) of ``ranking`` against ``sets``: one row per set with ES, NES, p, FDR.

    gseapy's default ``min_size=15`` would drop every curated set, and a gene-set argument that is
    not a dict or a ``.gmt`` path is looked up on Enrichr over the network: both are avoided here.
    """
    import gseapy as gp

    sets = {k: v for k, v in sets.items() if len(set(v) & set(ranking.index)) >= min_size}
    cols = ["set", "gsea_es", "gsea_nes", "gsea_p", "gsea_fdr", "gsea_lead_genes"]
    if not sets:
        return pd.DataFrame(columns=cols)
    res = gp.prerank(rnk=ranking, gene_sets=dict(sets), min_size=min_size, max_size=max(len(v) for v in sets.values()),
                     permutation_num=permutations, seed=seed, threads=threads, outdir=None, no_plot=True,
                     verbose=False)
    df = res.res2d.rename(columns={"Term": "set", "ES": "gsea_es", "NES": "gsea_nes", "NOM p-val": "gsea_p",
                                   "FDR q-val": "gsea_fdr", "Lead_genes": "gsea_lead_genes"})
    df = df.reindex(columns=cols)  # with permutations=0 gseapy reports no p-values: they stay NaN
    for c in ("gsea_es", "gsea_nes", "gsea_p", "gsea_fdr"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df.sort_values("gsea_nes", ascending=False).reset_index(drop=True)


def pseudobulk(adata: ad.AnnData, groupby: str = "leiden") -> pd.DataFrame:
    """Mean log-normalised expression per group as genes × groups (the input ssGSEA expects)."""
    groups = adata.obs[groupby].astype("category")
    codes = groups.cat.codes.to_numpy()
    means = np.vstack([col_sums(adata.X[codes == k]) / max(1, int((codes == k).sum()))
                       for k in range(len(groups.cat.categories))])
    return pd.DataFrame(means.T, index=adata.var_names.astype(str), columns=groups.cat.categories.astype(str))


def ssgsea_pseudobulk(adata: ad.AnnData, sets: dict[str, list[str]], *, groupby: str = "leiden", min_size: int = 2,
                      seed: int = 0, threads: int = 1) -> pd.DataFrame:
    """ssGSEA (gseapy) of every cluster's pseudobulk profile: tidy table cluster, set, ES, NES.

    Pseudobulk rather than per cell: ssGSEA ranks thousands of genes per sample, which is costly
    per cell and noisy on sparse single-cell profiles; cluster means are stable and few.
    """
    import gseapy as gp

    data = pseudobulk(adata, groupby)
    sets = {k: v for k, v in sets.items() if len(set(v) & set(data.index)) >= min_size}
    if not sets:
        return pd.DataFrame(columns=["cluster", "set", "ssgsea_es", "ssgsea_nes"])
    res = gp.ssgsea(data=data, gene_sets=dict(sets), min_size=min_size, max_size=max(len(v) for v in sets.values()),
                    sample_norm_method="rank", permutation_num=0, seed=seed, threads=threads, outdir=None,
                    no_plot=True, verbose=False)
    df = res.res2d.rename(columns={"Name": "cluster", "Term": "set", "ES": "ssgsea_es", "NES": "ssgsea_nes"})
    for c in ("ssgsea_es", "ssgsea_nes"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df[["cluster", "set", "ssgsea_es", "ssgsea_nes"]].sort_values(["set", "cluster"]).reset_index(drop=True)




# ----------------------------------------------------------------------------- the matched null

@numba.njit(cache=True)
def _col_stats(indptr, indices, data, rows, n_genes):
    """Column sums and non-zero counts over the rows where ``rows`` is True (no copy of X)."""
    sums = np.zeros(n_genes)
    nnz = np.zeros(n_genes)
    for r in range(indptr.size - 1):
        if rows[r]:
            for k in range(indptr[r], indptr[r + 1]):
                if data[k] != 0:
                    sums[indices[k]] += data[k]
                    nnz[indices[k]] += 1.0
    return sums, nnz


def expression_bins(X: sp.spmatrix | np.ndarray, cells: np.ndarray, *, n_mean_bins: int = 10,
                    n_detection_bins: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(bin, mean bin) of every gene: equal-count bins of mean expression over ``cells``, each split
    into equal-count bins of detection (fraction of those cells with the gene). Mean and detection
    are correlated but not the same (high in few cells vs low in many), and both shape an AUCell score."""
    Xc = sp.csr_matrix(X)
    n = max(1, int(np.asarray(cells).sum()))
    sums, nnz = _col_stats(Xc.indptr, Xc.indices, Xc.data, np.asarray(cells, dtype=np.bool_), Xc.shape[1])
    mean_rank = ss.rankdata(sums / n, method="ordinal") - 1
    mean_bin = (mean_rank * n_mean_bins // max(1, mean_rank.size)).astype(np.int64)
    bins = np.empty(mean_bin.size, dtype=np.int64)
    for b in range(n_mean_bins):
        idx = np.flatnonzero(mean_bin == b)
        if idx.size:
            r = ss.rankdata(nnz[idx] / n, method="ordinal") - 1
            bins[idx] = b * n_detection_bins + (r * n_detection_bins // idx.size)
    return bins, mean_bin


def matched_null_sets(genes: np.ndarray, bins: np.ndarray, mean_bin: np.ndarray, eligible: np.ndarray,
                      n_null: int, rng: np.random.Generator) -> np.ndarray:
    """``n_null`` random sets (rows of gene indices) matched to ``genes`` bin by bin: in every bin a
    null set has as many genes as the tested set, drawn without replacement from the eligible genes
    of that bin outside the set. A bin with too few genes borrows from its whole mean-expression bin."""
    genes = np.asarray(genes, dtype=np.int64)
    out = np.empty((n_null, genes.size), dtype=np.int64)
    in_set = np.zeros(bins.size, dtype=bool)
    in_set[genes] = True
    col = 0
    for b, c in zip(*np.unique(bins[genes], return_counts=True)):
        pool = np.flatnonzero((bins == b) & eligible & ~in_set)
        if pool.size < 2 * c:
            mb = mean_bin[genes[bins[genes] == b][0]]
            pool = np.flatnonzero((mean_bin == mb) & eligible & ~in_set)
        if pool.size == 0:
            pool = np.flatnonzero(eligible & ~in_set)
        if pool.size >= c:
            pick = np.argpartition(rng.random((n_null, pool.size)), c - 1, axis=1)[:, :c]
        else:
            pick = rng.integers(0, pool.size, size=(n_null, c))
        out[:, col:col + c] = pool[pick]
        col += c
    return out


def _cohen_d(s1, q1, n1, s0, q0, n0):
    """Cohen's d (pooled SD) of group 1 vs group 0 from sums, sums of squares and counts; NaN when
    both groups are constant or too small."""
    with np.errstate(invalid="ignore", divide="ignore"):
        m1, m0 = s1 / n1, s0 / n0
        ss1, ss0 = np.maximum(q1 - n1 * m1 ** 2, 0.0), np.maximum(q0 - n0 * m0 ** 2, 0.0)
        sd = np.sqrt((ss1 + ss0) / (n1 + n0 - 2))
        d = (m1 - m0) / sd
    return np.where(sd > 1e-12, d, np.nan)


def bootstrap_effects(scores: np.ndarray, groups: np.ndarray, n_samples: int, *, n_boot: int = 1000,
                      seed: int = 0, chunk: int = 4096) -> np.ndarray:
    """Bootstrap Cohen's d per sample: (samples, n_boot, sets), CSC-like vs other cells resampled
    within each sample (Poisson weights: each cell appears Poisson(1) times, the large-n
    equivalent of resampling with replacement, computed as matrix products over cell chunks)."""
    rng = np.random.default_rng(seed)
    n_sets = scores.shape[1]
    out = np.full((n_samples, n_boot, n_sets), np.nan)
    for s in range(n_samples):
        acc = []
        for g in (2 * s + 1, 2 * s):
            idx = np.flatnonzero(groups == g)
            S, Q, N = np.zeros((n_boot, n_sets)), np.zeros((n_boot, n_sets)), np.zeros((n_boot, 1))
            for i in range(0, idx.size, chunk):
                x = scores[idx[i:i + chunk]]
                W = rng.poisson(1.0, size=(n_boot, x.shape[0])).astype(np.float64)
                S += W @ x
                Q += W @ (x * x)
                N += W.sum(axis=1, keepdims=True)
            acc.append((S, Q, N))
        (s1, q1, n1), (s0, q0, n0) = acc
        if n1.max() > 0 and n0.max() > 0:   # a replicate with < 2 cells in a group gives NaN, not the sample
            with np.errstate(invalid="ignore", divide="ignore"):
                out[s] = np.where((n1 > 1) & (n0 > 1), _cohen_d(s1, q1, n1, s0, q0, n0), np.nan)
    return out


def _residual_effect(scores: np.ndarray, ngenes: np.ndarray, groups: np.ndarray, kept: list[int]) -> np.ndarray:
    """Sensitivity: mean over samples of Cohen's d after regressing log genes detected out of the
    scores *within each sample's analysed cells* (never across cell types or samples)."""
    eff = []
    x = np.log1p(np.asarray(ngenes, dtype=float))
    for s in kept:
        rows = np.flatnonzero((groups == 2 * s) | (groups == 2 * s + 1))
        xs = x[rows] - x[rows].mean()
        Y = scores[rows]
        beta = (xs @ (Y - Y.mean(axis=0))) / max(float(xs @ xs), 1e-12)
        R = Y - np.outer(xs, beta)
        csc = groups[rows] == 2 * s + 1
        eff.append(_cohen_d(R[csc].sum(0), (R[csc] ** 2).sum(0), csc.sum(), R[~csc].sum(0), (R[~csc] ** 2).sum(0),
                            (~csc).sum()))
    return _nanmean(np.vstack(eff), 0) if eff else np.full(scores.shape[1], np.nan)


# ----------------------------------------------------------------------------- scoring and testing

@dataclass
class PathwayStats:
    """What :func:`score_pathways` computed: coverage, one row per set, one row per set and sample."""

    coverage: pd.DataFrame
    details: pd.DataFrame
    per_sample: pd.DataFrame
    notes: list[str]
    n_samples: int
    unit: str
    skipped: str | None = None  # why the CSC-like contrast was not computed (no CSC-like cells), else None


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        return np.nanmean(a, axis=axis)


def descriptive_label(n_samples: int) -> str:
    return f"descriptive (n = {n_samples} sample{'s' if n_samples != 1 else ''})"


def score_pathways(adata: ad.AnnData, *,
                   gene_sets: Sequence[str] | Mapping[str, Sequence[str]] = ("metastem:metastasis_{species}.gmt",),
                   extra_gene_sets: Sequence[str] = (),
                   species: str | None = None, scorer: str = "aucell", n_null: int = 1000, n_boot: int = 1000,
                   min_genes_found: int = 3, min_signal_frac: float = 0.01,
                   min_signal_cells: int = MIN_SIGNAL_CELLS, fdr: float = 0.05,
                   positive_controls: Sequence[str] = ("CSC_MARKERS",), exclude_genes: Sequence[str] | None = None,
                   aliases: str | dict[str, str] | None = "metastem:aliases_human.tsv", ctrl_size: int = 50,
                   top_frac: float = 0.05, null_mean_bins: int = 10, null_detection_bins: int = 5,
                   csc_key: str = "csc_like", malignant_key: str = "malignant", sample_key: str = "sample",
                   genes_key: str = "n_genes_by_counts", pseudotime_key: str = "pseudotime", seed: int = 0,
                   key_added: str = "pathways", copy: bool = False) -> PathwayStats | tuple[ad.AnnData, PathwayStats]:
    """Score migration/metastasis gene sets per cell and test CSC-like vs other malignant cells
    against matched random gene sets, sample by sample.

    Parameters
    ----------
    adata
        Log-normalised expression in X; ``obs[csc_key]`` (bool), optionally ``obs[malignant_key]``
        (bool; only malignant cells are compared) and ``obs[sample_key]`` (the unit of replication).
    gene_sets, extra_gene_sets
        GMT files (``{species}`` expanded, ``metastem:<file>`` = shipped, the default), or
        ``{name: genes}``.
    scorer
        What ``obs['pathway_<SET>']`` holds: 'aucell' (default) or scanpy's 'score_genes'. The tests
        always use AUCell, scored in one pass with the null sets.
    n_null
        Random gene sets per tested set, matched gene by gene on bins of mean expression x detection
        (``null_mean_bins`` x ``null_detection_bins``) among the analysed cells, drawn outside the
        excluded genes. Empirical p = (1 + #null at least as far from the null mean) / (1 + n_null).
    n_boot
        Bootstrap replicates of each sample's cells for the per-sample 95 % CI. An interval is given only
        when the sample holds at least ``min_signal_cells`` CSC-like cells with a non-zero score
        (``n_signal_csc_like``; ``n_signal_other`` for the other group, in the per-sample table): with fewer,
        the bootstrap resamples the same few cells and its interval misses the population effect far more
        often than 5 %. The set's own CI from the bootstrap (fewer than 3 samples) needs it in every sample.
    min_genes_found, min_signal_frac
        Sets with fewer genes left (after exclusion) are ``few_genes``; sets non-zero in fewer than
        this fraction of analysed cells are ``no_signal``. Neither is called.
    fdr
        BH level for calls (on the empirical p) and for replication (on the across-sample test).
    positive_controls
        Sets that define CSC-like cells (e.g. CSC_MARKERS): scored and shown, never called.
    exclude_genes
        Genes of the stemness score, left out of every pathway set. None: the gene-count signature
        recorded by the stemness stage in ``uns['stemness_cytotrace']['signature_genes']``, if any.
    seed
        Seeds the null sets and the bootstrap (scores themselves are deterministic).

    Writes ``obs['pathway_<SET>']`` and ``uns[key_added]`` (parameters as JSON text, number of
    samples, unit of replication, notes, ``skipped``). Returns a :class:`PathwayStats` (with ``copy``:
    the copy and the stats).

    With no CSC-like cell among the analysed cells (e.g. ``stemness.required: false`` on a panel where
    no stemness score was possible) there is no contrast: the per-cell scores are still written, but no
    matched null sets are drawn or scored and no bootstrap is run (they exist only for the contrast);
    every set's effect columns are NaN, ``call`` and ``replicated`` say "not tested" and
    ``PathwayStats.skipped`` holds the sentence saying so.
    """
    if copy:
        adata = adata.copy()
    if scorer not in ("aucell", "score_genes"):
        raise MetastemError(f"unknown pathway scorer '{scorer}'", fix="use pathways.scorer 'aucell' or 'score_genes'")
    species = species or str(adata.uns.get("metastem", {}).get("species", "human"))
    if not isinstance(gene_sets, Mapping):
        gene_sets = list(gene_sets)
    if isinstance(gene_sets, Mapping):  # sets given in memory: judged like a user's GMT file
        sets = PathwaySets()
        for name, genes in gene_sets.items():
            sets.genes[str(name)], sets.source[str(name)] = list(dict.fromkeys(map(str, genes))), "(given)"
            sets.user.add(str(name))
        gene_sets = ["(given)"]
    else:
        sets = load_pathway_sets(gene_sets, list(extra_gene_sets), species)
    alias_map = read_aliases(aliases, species) if isinstance(aliases, (str, Path)) else aliases
    if exclude_genes is None:
        exclude_genes = list(adata.uns.get("stemness_cytotrace", {}).get("signature_genes", []))
    cov = pathway_coverage(adata, sets, min_genes_found=min_genes_found, aliases=alias_map, species=species,
                           exclude_genes=exclude_genes, positive_controls=positive_controls)
    dsg = design(adata, csc_key=csc_key, malignant_key=malignant_key, sample_key=sample_key)
    notes = list(dsg.notes)
    var_index = {g: i for i, g in enumerate(map(str, adata.var_names))}
    scored = cov[cov["n_used"] > 0].reset_index(drop=True)
    names = list(scored["set"])
    set_idx = [np.array([var_index[g] for g in u.split(",")], dtype=np.int64) for u in scored["genes_used"]]
    niche = (scored["role"] == ROLE_NICHE).to_numpy()  # scored per cell, never contrasted (NICHE_SUFFIX)
    contrasted = np.flatnonzero(~niche)

    # Samples with enough CSC-like and other malignant cells enter the contrast.
    n_csc = np.bincount(dsg.sample_codes[dsg.is_csc], minlength=dsg.n_samples)
    n_other = np.bincount(dsg.sample_codes[dsg.cells & ~dsg.is_csc], minlength=dsg.n_samples)
    kept = (n_csc >= MIN_GROUP_CELLS) & (n_other >= MIN_GROUP_CELLS)
    skipped = None
    if not dsg.is_csc.any():
        # no CSC-like cell at all (stemness not computed): no contrast, so no null sets or bootstrap either
        what = "malignant cells" if malignant_key in adata.obs else "cells"
        skipped = (f"none of the {int(dsg.cells.sum())} analysed {what} is CSC-like, and every sample is left out of "
                   "the contrast (effects against matched null sets, their replication across samples and GSEA "
                   "prerank need CSC-like and other malignant cells)")
        notes.append(f"CSC-like contrast skipped: {skipped}; the per-cell pathway scores are computed as usual")
    else:
        for s in np.flatnonzero(~kept):
            notes.append(f"sample {dsg.samples[s]} left out of the contrast: {n_csc[s]} CSC-like and {n_other[s]} "
                         f"other malignant cells (at least {MIN_GROUP_CELLS} of each needed)")
    k = int(kept.sum())
    groups = dsg.group_codes(kept)
    n_drawn = 0 if skipped else n_null  # null sets exist only for the contrast

    # Null sets, drawn from genes outside every excluded gene (as the tested sets are).
    rng = np.random.default_rng(seed)
    null = []
    if n_drawn:
        bins, mean_bin = expression_bins(adata.X, groups >= 0, n_mean_bins=null_mean_bins,
                                         n_detection_bins=null_detection_bins)
        eligible = ~np.isin(np.asarray(adata.var_names.astype(str)), list(map(str, exclude_genes)))
        null = [matched_null_sets(set_idx[j], bins, mean_bin, eligible, n_drawn, rng) for j in contrasted]
    all_sets = set_idx + [row for block in null for row in block]
    cells_scores, S, Q, NZ = aucell_grouped(adata.X, all_sets, groups, 2 * dsg.n_samples,
                                            n_cell_sets=len(set_idx), top_frac=top_frac)

    stale = [c for c in adata.obs.columns if c.startswith(PREFIX)]  # e.g. rescoring a final.h5ad
    adata.obs.drop(columns=stale, inplace=True)
    shown = cells_scores
    if scorer == "score_genes" and names:
        shown = score_genes_matrix(adata.X, adata.var_names, dict(zip(names, [u.split(",") for u in scored["genes_used"]])),
                                   ctrl_size=ctrl_size, seed=seed).to_numpy()
    adata.obs = pd.concat([adata.obs, pd.DataFrame(shown, index=adata.obs_names,
                                                   columns=[f"{PREFIX}{n}" for n in names])], axis=1)

    # Effects per sample: real sets (columns 0..n-1) and null sets (n + i * n_drawn + j).
    n = len(names)
    gsize = np.bincount(groups[groups >= 0], minlength=2 * dsg.n_samples).astype(float)
    ks = np.flatnonzero(kept)
    d = np.vstack([_cohen_d(S[2 * s + 1], Q[2 * s + 1], gsize[2 * s + 1], S[2 * s], Q[2 * s], gsize[2 * s])
                   for s in ks]) if k else np.zeros((0, len(all_sets)))          # kept samples x all sets
    d_real = d[:, :n]
    d_null = np.full((k, n, n_drawn), np.nan)                                    # samples x sets x null
    if n_drawn:
        d_null[:, contrasted, :] = d[:, n:].reshape(k, contrasted.size, n_drawn)
    boot = np.full((k, n_boot, n), np.nan)                                       # samples x replicates x sets
    if contrasted.size and k:
        boot[:, :, contrasted] = bootstrap_effects(cells_scores[:, contrasted], groups, dsg.n_samples,
                                                   n_boot=n_boot, seed=seed)[ks]
    # cells with a non-zero score per kept sample and group; a sample's interval needs min_signal_cells CSC-like ones
    nz_csc = NZ[2 * ks + 1, :n] if k else np.zeros((0, n))
    nz_other = NZ[2 * ks, :n] if k else np.zeros((0, n))
    signal = nz_csc >= min_signal_cells
    analysed = groups >= 0
    nz_frac = NZ[:, :n].sum(axis=0) / analysed.sum() if analysed.any() else np.full(n, np.nan)
    trend_cells = dsg.cells if skipped else analysed  # no contrast: pseudotime trends over every analysed cell
    ngenes = genes_detected(adata, genes_key)
    adj = _residual_effect(cells_scores, ngenes, groups, list(ks)) if n and k else np.full(n, np.nan)
    ptime = adata.obs[pseudotime_key].to_numpy(float) if pseudotime_key in adata.obs else np.full(adata.n_obs, np.nan)

    rows, sample_rows = [], []
    for j, name in enumerate(names):
        if niche[j]:  # what niche cells express: read per cell type (cluster means) and in the niche table
            rows.append({"set": name, "ci_kind": "none: niche side", "n_samples": 0,
                         "frac_cells_nonzero": nz_frac[j]})
            continue
        eff_s = d_real[:, j]
        eff = float(_nanmean(eff_s, 0)) if k else np.nan
        null_all = _nanmean(d_null[:, j, :], 0) if k and n_drawn else np.zeros(0)
        null_all = null_all[np.isfinite(null_all)]
        if null_all.size and np.isfinite(eff):
            c = null_all.mean()
            p_null = (1 + int((np.abs(null_all - c) >= abs(eff - c) - 1e-12).sum())) / (1 + null_all.size)
            sd = null_all.std(ddof=1) if null_all.size > 1 else np.nan
            z_null = (eff - c) / sd if sd > 0 else np.nan
            null_lo, null_hi = np.quantile(null_all, [0.025, 0.975])
        else:
            c = p_null = z_null = null_lo = null_hi = np.nan
        null_mean_s = _nanmean(d_null[:, j, :], 1) if n_drawn else np.full(k, np.nan)
        calib = eff_s - null_mean_s
        fin = np.isfinite(calib)
        k_eff = int(fin.sum())
        mean_calib = float(calib[fin].mean()) if k_eff else np.nan
        same = float(np.mean(np.sign(calib[fin]) == np.sign(mean_calib))) if k_eff else np.nan
        if k_eff >= MIN_REPLICATION_SAMPLES and np.ptp(calib[fin]) > 0:
            p_rep = float(ss.ttest_1samp(calib[fin], 0.0).pvalue)
        else:
            p_rep = np.nan
        if k_eff >= MIN_REPLICATION_SAMPLES:
            fine = eff_s[np.isfinite(eff_s)]
            half = ss.t.ppf(0.975, fine.size - 1) * fine.std(ddof=1) / np.sqrt(fine.size)
            ci_lo, ci_hi, ci_kind = eff - half, eff + half, f"t over {fine.size} samples"
        elif k and signal[:, j].all():
            bmean = _nanmean(boot[:, :, j], 0)
            bmean = bmean[np.isfinite(bmean)]
            ci_lo, ci_hi = np.quantile(bmean, [0.025, 0.975]) if bmean.size else (np.nan, np.nan)
            ci_kind = "bootstrap over cells within sample"
        else:
            ci_lo = ci_hi = np.nan
            ci_kind = "none: too few cells with signal" if k else "none"
        auroc, delta = csc_contrast(cells_scores[analysed, j], dsg.is_csc[analysed])
        rho_t, n_t = spearman_finite(cells_scores[trend_cells, j], ptime[trend_cells])
        rows.append({"set": name, "effect": eff, "ci_low": ci_lo, "ci_high": ci_hi, "ci_kind": ci_kind,
                     "null_mean": c, "null_low": null_lo, "null_high": null_hi, "effect_vs_null": eff - c,
                     "z_null": z_null, "p_null": p_null, "n_samples": k_eff,
                     "frac_same_sign": same, "p_replication": p_rep,
                     "effect_adj_genes_detected": adj[j], "auroc_pooled": auroc, "delta_pooled": delta,
                     "frac_cells_nonzero": nz_frac[j], "rho_pseudotime": rho_t, "n_cells_pseudotime": n_t})
        for i, s in enumerate(ks):
            b = boot[i, :, j]
            b = b[np.isfinite(b)] if signal[i, j] else b[:0]
            nd = d_null[i, j, :]
            nd = nd[np.isfinite(nd)]
            sample_rows.append({
                "set": name, "sample": dsg.samples[s], "n_csc_like": int(n_csc[s]), "n_other": int(n_other[s]),
                "n_signal_csc_like": int(nz_csc[i, j]), "n_signal_other": int(nz_other[i, j]),
                "effect": eff_s[i], "ci_low": np.quantile(b, 0.025) if b.size else np.nan,
                "ci_high": np.quantile(b, 0.975) if b.size else np.nan,
                "null_mean": nd.mean() if nd.size else np.nan,
                "null_low": np.quantile(nd, 0.025) if nd.size else np.nan,
                "null_high": np.quantile(nd, 0.975) if nd.size else np.nan,
                "p_null": ((1 + int((np.abs(nd - nd.mean()) >= abs(eff_s[i] - nd.mean()) - 1e-12).sum()))
                           / (1 + nd.size)) if nd.size and np.isfinite(eff_s[i]) else np.nan})
    withheld = ~signal[:, contrasted]  # niche sets have no interval, so none of theirs is withheld
    if withheld.any():
        notes.append(f"{int(withheld.sum())} of {withheld.size} per-sample intervals not given: fewer than "
                     f"{min_signal_cells} CSC-like cells with a non-zero score, where resampling the same few cells "
                     "gives an interval far narrower than the truth")
    stats_cols = ["set", "effect", "ci_low", "ci_high", "ci_kind", "null_mean", "null_low", "null_high",
                  "effect_vs_null", "z_null", "p_null", "n_samples", "frac_same_sign", "p_replication",
                  "effect_adj_genes_detected", "auroc_pooled", "delta_pooled", "frac_cells_nonzero",
                  "rho_pseudotime", "n_cells_pseudotime"]
    st = pd.DataFrame(rows, columns=stats_cols)

    out = cov.merge(st, on="set", how="left")
    no_signal = (out["flag"] == FLAG_OK) & ~(out["frac_cells_nonzero"] >= min_signal_frac) & (k > 0)
    out.loc[no_signal, "flag"] = FLAG_NO_SIGNAL
    cov.loc[cov["set"].isin(out.loc[no_signal, "set"]), "flag"] = FLAG_NO_SIGNAL
    family = (out["role"] == ROLE_PATHWAY) & (out["flag"] == FLAG_OK)
    out["q_null"] = np.nan
    out.loc[family, "q_null"] = bh_adjust(out.loc[family, "p_null"])
    out["q_replication"] = np.nan
    out.loc[family, "q_replication"] = bh_adjust(out.loc[family, "p_replication"])
    up = np.sign(out["effect_vs_null"]) > 0
    called = family & (out["q_null"] < fdr)
    out["called"] = called
    out["call"] = np.select(
        [out["role"] == ROLE_CONTROL, out["flag"] != FLAG_OK, out["role"] == ROLE_NICHE, called & up, called & ~up],
        ["positive control (defines CSC-like)", out["flag"].astype(str), CALL_NICHE, "up in CSC-like",
         "down in CSC-like"],
        "not called" if k else "not tested: no CSC-like cells" if skipped else
        "not tested: no sample has CSC-like and other malignant cells")
    if skipped:
        out["replicated"] = "not tested"
    elif k < MIN_REPLICATION_SAMPLES:
        out["replicated"] = descriptive_label(k)
    else:
        # replication is a property of a call: a set not called against the matched null is not
        # 'replicated' however consistent its small per-sample deviations are
        rep = called & (out["n_samples"] >= MIN_REPLICATION_SAMPLES) & (out["frac_same_sign"] >= MIN_SIGN_FRACTION) \
            & (out["q_replication"] < fdr)
        out["replicated"] = np.where(rep, "yes", "no")
        out.loc[~family, "replicated"] = "not tested"
    sens = called & np.isfinite(out["effect_adj_genes_detected"]) & \
        (np.sign(out["effect_adj_genes_detected"]) != np.sign(out["effect"]))
    out["sensitivity_note"] = np.where(sens, "sign flips within samples after regressing out genes detected", "")
    unit = ("none (no CSC-like cells)" if skipped else "sample" if k >= MIN_REPLICATION_SAMPLES else
            f"cells within {k} sample{'s' if k != 1 else ''} (descriptive)")
    order = out.assign(_c=out["called"].astype(int), _r=out["role"].map({ROLE_PATHWAY: 2, ROLE_NICHE: 1}).fillna(0),
                       _a=out["effect_vs_null"].abs().fillna(-1))
    out = order.sort_values(["_r", "_c", "_a"], ascending=False, kind="stable").drop(columns=["_c", "_r", "_a"])
    out = out.reset_index(drop=True)
    if not skipped:
        notes.append(f"{int(called.sum())} of {int(family.sum())} tested sets called against {n_null} matched random "
                     f"sets each (BH q < {fdr} on the empirical p); unit of replication: {unit}")
    params = {"gene_sets": gene_sets, "extra_gene_sets": list(extra_gene_sets), "species": species, "scorer": scorer,
              "n_null": n_null, "n_boot": n_boot, "min_genes_found": min_genes_found,
              "min_signal_frac": min_signal_frac, "min_signal_cells": min_signal_cells, "fdr": fdr,
              "positive_controls": list(positive_controls),
              "n_excluded_genes": len(exclude_genes), "top_frac": top_frac, "null_mean_bins": null_mean_bins,
              "null_detection_bins": null_detection_bins, "seed": seed, "csc_key": csc_key,
              "malignant_key": malignant_key, "sample_key": sample_key}
    adata.uns[key_added] = {"params_json": json.dumps(params), "n_samples": k, "unit": unit,
                            "samples": [dsg.samples[s] for s in ks] or ["none"], "notes_json": json.dumps(notes),
                            "skipped": skipped or ""}
    res = PathwayStats(coverage=cov, details=out, per_sample=pd.DataFrame(sample_rows, columns=[
        "set", "sample", "n_csc_like", "n_other", "n_signal_csc_like", "n_signal_other", "effect", "ci_low", "ci_high",
        "null_mean", "null_low", "null_high", "p_null"]), notes=notes, n_samples=k, unit=unit, skipped=skipped)
    return (adata, res) if copy else res


# ----------------------------------------------------------------------------- the stage

def stemness_genes(info_json: str | Path | None = None, gene_sets_table: str | Path | None = None) -> list[str]:
    """Genes the stemness score is built from, as the stemness stage recorded them: the gene-count
    signature (``signature_genes`` in stemness/info.json) and the genes found of every stemness set
    (``genes_found`` of tables/stemness_gene_sets.tsv). These are left out of the pathway sets.

    None when the stage computed no stemness (``status`` 'not_computed', ``stemness.required: false``):
    with no score there is nothing a pathway set could restate, and on a panel the gene-count signature
    alone would take most of the measured genes out of every set."""
    genes: list[str] = []
    if info_json and Path(info_json).is_file():
        info = json.loads(Path(info_json).read_text())
        if info.get("status") == "not_computed":
            return []
        genes += [str(g) for g in info.get("signature_genes", []) or []]
    if gene_sets_table and Path(gene_sets_table).is_file() and Path(gene_sets_table).stat().st_size:
        tab = pd.read_csv(gene_sets_table, sep="\t")
        for col in ("genes_found", "genes_used"):
            if col in tab:
                genes += [g for v in tab[col].dropna().astype(str) for g in v.split(",") if g]
                break
    return list(dict.fromkeys(genes))


@dataclass
class PathwayResult:
    """Everything the final rule writes: tables for the report and the per-cell scores in ``adata``."""

    coverage: pd.DataFrame
    summary: pd.DataFrame       # the deciding columns, for the report
    details: pd.DataFrame       # every column
    per_sample: pd.DataFrame
    cluster_means: pd.DataFrame
    gsea: pd.DataFrame
    ranking: pd.Series | None
    ssgsea: pd.DataFrame
    notes: list[str]
    n_samples: int
    unit: str
    skipped: str | None = None  # why the CSC-like contrast was not computed (PathwayStats.skipped)


def fdr_text(q: float, permutations: int) -> str:
    """A permutation FDR for display: never 'FDR 0', which only means 'below the resolution'."""
    if not np.isfinite(q):
        return "–"
    if q <= 0 and permutations > 0:
        return f"< {1.0 / permutations:.2g}"
    return f"{q:.2g}"


def run_pathways(adata: ad.AnnData, params: dict, *, species: str, seed: int = 0,
                 aliases_path: str | Path | None = None, threads: int = 1, groupby: str = "leiden",
                 csc_key: str = "csc_like", exclude_genes: Sequence[str] | None = None) -> PathwayResult:
    """The whole pathway stage: :func:`score_pathways` with the config's ``pathways`` section, then
    GSEA prerank of CSC-like vs other malignant cells on sets with >= ``gsea_min_genes`` genes and
    ssGSEA of cluster pseudobulks (both descriptive), and the per-cluster means. Without CSC-like
    cells the contrast and GSEA prerank are skipped (``PathwayResult.skipped`` says why); the scores,
    cluster means and ssGSEA are computed as usual."""
    st = score_pathways(adata, gene_sets=params["gene_sets"], extra_gene_sets=params["extra_gene_sets"],
                        species=species, scorer=params["scorer"], n_null=params["n_null"], n_boot=params["n_boot"],
                        min_genes_found=params["min_genes_found"], min_signal_frac=params["min_signal_frac"],
                        min_signal_cells=params["min_signal_cells"], fdr=params["fdr"],
                        positive_controls=params["positive_controls"],
                        exclude_genes=exclude_genes, aliases=aliases_path if aliases_path else params["aliases"],
                        ctrl_size=params["ctrl_size"], csc_key=csc_key, seed=seed)
    notes = list(st.notes)
    cov = st.coverage
    for flag, what in ((FLAG_ABSENT, "have no gene in the data and were not scored"),
                       (FLAG_FEW, f"have fewer than {params['min_genes_found']} genes left (flagged, not called)"),
                       (FLAG_NO_SIGNAL, "score zero in nearly every analysed cell (no_signal, not called)")):
        bad = cov.loc[cov["flag"] == flag, "set"].tolist()
        if bad:
            notes.insert(0, f"{len(bad)} set(s) {what}: {', '.join(bad)}")
    dsg = design(adata, csc_key=csc_key)
    sub = adata[dsg.cells] if not dsg.cells.all() else adata
    is_csc = dsg.is_csc[dsg.cells]
    min_gsea = params["gsea_min_genes"]
    tested = cov[(cov["role"] == ROLE_PATHWAY) & (cov["n_used"] >= min_gsea)]
    gsea_sets = {k: v for k, v in resolved_sets(tested).items()}
    cols = ["set", "gsea_es", "gsea_nes", "gsea_p", "gsea_fdr", "gsea_lead_genes"]
    ranking, gsea = None, pd.DataFrame(columns=cols)
    if 0 < is_csc.sum() < is_csc.size and gsea_sets:
        ranking = wilcoxon_ranking(sub, is_csc, max_cells=params["ranking_max_cells"], seed=seed)
        gsea = gsea_prerank(ranking, gsea_sets, permutations=params["gsea_permutations"], seed=seed,
                            min_size=min_gsea, threads=threads)
    elif st.skipped:
        pass  # the contrast's note already says GSEA prerank was not computed
    elif not gsea_sets:
        notes.append(f"GSEA prerank skipped: no pathway set has {min_gsea} genes left")
    else:
        notes.append(f"GSEA prerank skipped: {int(is_csc.sum())} of {is_csc.size} analysed cells are CSC-like")
    perms = params["gsea_permutations"]
    for col in ("gsea_p", "gsea_fdr"):  # as text: a permutation p or FDR of 0 is '< 1/permutations'
        gsea[col] = [fdr_text(q, perms) for q in pd.to_numeric(gsea[col], errors="coerce")]
    resolved = {k: v for k, v in resolved_sets(cov).items() if k in scored_sets(adata)}
    ssg = ssgsea_pseudobulk(adata, resolved, groupby=groupby, min_size=min(2, params["min_genes_found"]),
                            seed=seed, threads=threads)
    details = st.details.merge(gsea[["set", "gsea_nes", "gsea_fdr"]], on="set", how="left")
    summary = details[SUMMARY_COLUMNS].copy()
    return PathwayResult(coverage=cov, summary=summary, details=details, per_sample=st.per_sample,
                         cluster_means=per_cluster_means(adata, groupby), gsea=gsea, ranking=ranking, ssgsea=ssg,
                         notes=notes, n_samples=st.n_samples, unit=st.unit, skipped=st.skipped)


def methods_text(params: dict, seed: int, n_samples: int, unit: str, n_excluded: int,
                 skipped: str | None = None) -> str:
    """The methods paragraph of the pathway stage, stating the unit of replication (or, with
    ``skipped``, that there was no CSC-like contrast and why)."""
    if skipped:
        return (f"Gene sets were scored per cell with AUCell (Aibar et al. 2017; top 5 % of each cell's genes; tied "
                "values share their ranks, so scores do not depend on gene order), averaged per cluster, and ssGSEA "
                f"(gseapy) was run on per-cluster pseudobulk, descriptive. No CSC-like contrast: {skipped}. Seed {seed}.")
    rep = (f"the sample is the unit of replication ({n_samples} samples): the overall effect is the mean of per-sample "
           "effects with a t interval over samples, and a called set is 'replicated' when at least 3 samples "
           f"agree in sign in at least 80 % of them and a one-sample t-test of the per-sample effects beyond their matched null has "
           f"BH q < {params['fdr']}" if n_samples >= MIN_REPLICATION_SAMPLES else
           f"with {n_samples} sample(s) the cells of one tumour are not independent replicates, so every result is "
           f"descriptive (n = {n_samples} samples) and its interval is a bootstrap over cells within the sample")
    return (f"Gene sets were scored per cell with AUCell (Aibar et al. 2017; top 5 % of each cell's genes; tied values "
            f"share their ranks, so scores do not depend on gene order). The {n_excluded} genes of the stemness score "
            "(gene-count signature and stemness sets) were removed from every pathway set before scoring; the sets that "
            f"define CSC-like cells ({', '.join(params['positive_controls']) or 'none'}) were scored as positive "
            "controls and never called. Sets of what niche cells express (names ending in _NICHE: ligands and "
            "niche-cell receptors) were scored per cell and read per cell type and in the ligand-receptor analysis, "
            "never contrasted within malignant cells. Only malignant cells were compared (CSC-like vs other "
            f"malignant cells, Cohen's d within each sample, {params['n_boot']} bootstrap replicates for its 95 % CI, "
            f"given when at least {params['min_signal_cells']} CSC-like cells of the sample score above zero). "
            "Each set was "
            f"compared with {params['n_null']} random gene sets of the same size matched gene by gene on bins of mean "
            "expression x detection and scored in the same pass; a set is called when the BH-adjusted empirical p is "
            f"below {params['fdr']}. {rep[0].upper() + rep[1:]}. Unit of replication: {unit}. GSEA prerank (gseapy; Wilcoxon "
            f"z ranking of malignant cells, {params['gsea_permutations']} permutations, sets with at least "
            f"{params['gsea_min_genes']} genes) and ssGSEA of per-cluster pseudobulk are descriptive. Seed {seed}.")


# ----------------------------------------------------------------------------- final.h5ad

def prepare_final(adata: ad.AnnData, *, annotations: ad.AnnData | str | Path | None = None,
                  max_color_categories: int = 100) -> list[str]:
    """Make ``adata`` the final.h5ad that cellxgene and scanpy's plots open as written; returns notes.

    - ``obsm`` holds numpy arrays only (cellxgene resets obs' index and then fails on any DataFrame
      there: "value.index does not match parent's obs names"); a DataFrame becomes its values;
    - the pseudotime stage's ``annotations`` (no X; same cells) give ``obsm['X_diffmap']`` and
      ``uns['paga']``, ``uns['iroot']``, ``uns['diffmap_evals']`` (``sc.pl.paga``, ``sc.tl.dpt``);
    - ``uns['rank_genes_groups']`` (the cluster stage's markers) is kept for
      ``sc.pl.rank_genes_groups_dotplot``; object columns of obs become categories (strings), and
      every categorical column gets ``uns['<col>_colors']`` of the report's palette (same colours
      as the report's figures), so ``sc.pl.umap(color=...)`` and cellxgene agree with the report.
    """
    from metastem._keys import Obsm, Uns
    from metastem.plots import category_colors

    notes = []
    for key in list(adata.obsm.keys()):
        val = adata.obsm[key]
        if isinstance(val, pd.DataFrame):
            adata.obsm[key] = val.to_numpy(dtype=float)
            notes.append(f"obsm['{key}'] written as an array (columns: {', '.join(map(str, val.columns))})")
        elif sp.issparse(val):
            adata.obsm[key] = val.toarray()
        elif not isinstance(val, np.ndarray):
            adata.obsm[key] = np.asarray(val)
    if annotations is not None:
        ann = ad.read_h5ad(annotations) if isinstance(annotations, (str, Path)) else annotations
        if set(ann.obs_names) != set(adata.obs_names) or ann.n_obs != adata.n_obs:
            raise MetastemError("pseudotime/annotations.h5ad does not hold the same cells as clustered.h5ad",
                                file=str(annotations) if isinstance(annotations, (str, Path)) else None,
                                fix="rerun the pseudotime stage (delete its outputs and run again)")
        pos = pd.Index(ann.obs_names).get_indexer(adata.obs_names)
        for key in ann.obsm.keys():
            adata.obsm[key] = np.asarray(ann.obsm[key])[pos]
        for key in (Uns.PAGA, Uns.IROOT, Uns.DIFFMAP_EVALS):
            if key in ann.uns:
                adata.uns[key] = ann.uns[key]
        if Uns.IROOT in adata.uns:  # iroot indexes cells: re-map when the order differs
            adata.uns[Uns.IROOT] = int(np.flatnonzero(pos == int(adata.uns[Uns.IROOT]))[0]) \
                if not np.array_equal(pos, np.arange(adata.n_obs)) else int(adata.uns[Uns.IROOT])
    elif Obsm.DIFFMAP not in adata.obsm:
        notes.append("no pseudotime annotations: final.h5ad has no X_diffmap, paga or iroot")
    for col in adata.obs.columns:
        s = adata.obs[col]
        if s.dtype == object or pd.api.types.is_string_dtype(s.dtype) and not isinstance(s.dtype, pd.CategoricalDtype):
            adata.obs[col] = pd.Categorical(s.astype(str).where(s.notna(), "NA"))
    for col in adata.obs.columns:
        s = adata.obs[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            n = len(s.cat.categories)
            have = adata.uns.get(f"{col}_colors")
            if n <= max_color_categories and (have is None or len(have) != n):
                adata.uns[f"{col}_colors"] = np.array(category_colors(n), dtype=object)
    return notes
