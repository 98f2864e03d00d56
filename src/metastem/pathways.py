"""Migration/metastasis pathways shared by normal stem cells and CSCs (Li, Tiede, Massagué & Kang 2007).

The final analysis stage. For each curated (or user) gene set it produces:

- a per-cell score ``obs['pathway_<SET>']`` (scanpy ``score_genes`` with a fixed seed, or a
  rank-based AUCell-style score) and its coverage in the data, with sets below ``min_genes_found``
  flagged rather than silently trusted;
- a score adjusted for genes detected per cell (``obsm['pathway_scores_resid']``), because
  CSC-like cells detect more genes and a score that merely tracks detection is not a pathway;
- GSEA prerank of CSC-like vs other cells and ssGSEA of per-cluster pseudobulk (gseapy, offline:
  gene sets are always passed as a dict, never as a name that gseapy would look up on Enrichr);
- one tidy summary table relating every set to CSC-like status, stemness and pseudotime.

Per-cell tests treat cells as independent, which overstates the evidence (cells of one sample are
not replicates), so a set is only called significant when the effect size is also at least small.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import mannwhitneyu, spearmanr

from metastem.errors import MetastemError
from metastem.cluster import subsample_per_group
from metastem.genesets import col_sums, gene_set_coverage, read_aliases, read_gmt, score_gene_sets

log = logging.getLogger(__name__)

PREFIX = "pathway_"
ADJUSTED_KEY = "pathway_scores_resid"
# Cliff's delta of 0.147 is the conventional lower bound of a "small" effect (Romano et al. 2006).
MIN_DELTA = 0.147
FLAG_OK, FLAG_FEW, FLAG_ABSENT = "ok", "few_genes", "absent"


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


def load_pathway_sets(gene_sets: list[str], extra_gene_sets: list[str], species: str) -> PathwaySets:
    """Curated GMT files plus the user's (``pathways.extra_gene_sets``); '{species}' is expanded."""
    sets = PathwaySets()
    for paths, user in ((gene_sets, False), (extra_gene_sets, True)):
        for p in paths:
            sets.add_file(re.sub(r"\{species\}", species, str(p)), user=user)
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


def score_pathways(adata: ad.AnnData, sets: PathwaySets, *, scorer: str = "score_genes", ctrl_size: int = 50,
                   seed: int = 0, min_genes_found: int = 3, aliases: dict[str, str] | None = None,
                   species: str = "human") -> pd.DataFrame:
    """Per-cell scores into ``obs['pathway_<SET>']``; returns the coverage table with a ``flag`` column.

    A user set with no gene present, or a GMT file none of whose sets is present, is an error (almost
    always the wrong species or identifier type). A curated set absent from a small panel is only
    flagged ``absent`` and left unscored: the other sets remain meaningful.
    """
    cov = gene_set_coverage(sets.genes, adata.var_names, aliases)
    cov.insert(1, "source", cov["set"].map(sets.source))
    cov["flag"] = np.select([cov["n_found"] == 0, cov["n_found"] < min_genes_found], [FLAG_ABSENT, FLAG_FEW], FLAG_OK)
    for rec in cov[cov["flag"] == FLAG_ABSENT].itertuples():
        if rec.set in sets.user:
            raise _absent_error(rec.set, rec.source, species, rec.n_genes, sets.genes[rec.set])
    for source, grp in cov.groupby("source"):
        if (grp["flag"] == FLAG_ABSENT).all():
            first = grp.iloc[0]
            raise _absent_error(first["set"], source, species, first["n_genes"], sets.genes[first["set"]])
    for rec in cov[cov["flag"] != FLAG_OK].itertuples():
        log.warning("gene set %s: %d of %d genes found (%s)", rec.set, rec.n_found, rec.n_genes, rec.flag)
    present = {k: sets.genes[k] for k in cov.loc[cov["flag"] != FLAG_ABSENT, "set"]}
    stale = [c for c in adata.obs.columns if c.startswith(PREFIX)]  # e.g. rescoring a final.h5ad
    adata.obs.drop(columns=stale, inplace=True)
    score_gene_sets(adata, present, method=scorer, prefix=PREFIX, seed=seed, ctrl_size=ctrl_size, aliases=aliases)
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


def adjust_for_genes_detected(scores: pd.DataFrame, n_genes: np.ndarray) -> pd.DataFrame:
    """Scores with the linear effect of log genes detected removed (the cells' mean kept).

    A confounder guard, not a correction to trust blindly: stemness itself raises genes detected
    (Gulati et al. 2020), so a real stem-linked pathway also loses part of its signal here. A set
    whose CSC contrast vanishes after adjustment is the one to read with care.
    """
    x = np.log1p(np.asarray(n_genes, dtype=float))
    design = np.column_stack([np.ones_like(x), x - x.mean()])
    Y = scores.to_numpy(dtype=float)
    coef, *_ = np.linalg.lstsq(design, Y, rcond=None)
    return pd.DataFrame(Y - np.outer(design[:, 1], coef[1]), index=scores.index, columns=scores.columns)


def bh_adjust(p: np.ndarray | pd.Series) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values; NaN stays NaN and is not counted as a test."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    n = int(ok.sum())
    if n:
        order = np.argsort(p[ok])
        ranked = p[ok][order] * n / np.arange(1, n + 1)
        adj = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
        res = np.empty(n)
        res[order] = adj
        out[ok] = res
    return out


def csc_contrast(score: np.ndarray, is_csc: np.ndarray) -> tuple[float, float, float]:
    """(AUROC, Cliff's delta, two-sided Mann–Whitney p) of CSC-like vs other cells; NaN if a group is empty.

    AUROC = P(score of a CSC-like cell > score of another cell) + ½ P(tie) = U / (n1·n0);
    Cliff's delta = 2·AUROC − 1, in [−1, 1], positive when the pathway is higher in CSC-like cells.
    """
    is_csc = np.asarray(is_csc, dtype=bool)
    ok = np.isfinite(score)
    a, b = score[ok & is_csc], score[ok & ~is_csc]
    if a.size == 0 or b.size == 0:
        return np.nan, np.nan, np.nan
    res = mannwhitneyu(a, b, alternative="two-sided")
    auroc = float(res.statistic) / (a.size * b.size)
    return auroc, 2 * auroc - 1, float(res.pvalue)


def spearman_finite(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    """Spearman rho, p and n over cells where both are finite (NaN pseudotime = unreachable is left out)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return np.nan, np.nan, n
    rho, p = spearmanr(x[ok], y[ok])
    return float(rho), float(p), n


def per_cluster_means(adata: ad.AnnData, groupby: str = "leiden") -> pd.DataFrame:
    """Mean pathway score per cluster (clusters × sets)."""
    cols = [f"{PREFIX}{s}" for s in scored_sets(adata)]
    df = adata.obs[cols + [groupby]].groupby(groupby, observed=True).mean()
    df.columns = [c[len(PREFIX):] for c in df.columns]
    return df


def resolved_sets(coverage: pd.DataFrame) -> dict[str, list[str]]:
    """{set: data names of its genes found} for every set with at least one gene (from the coverage table)."""
    return {r.set: r.genes_found.split(",") for r in coverage.itertuples() if r.genes_found}


def _csc_mask(adata: ad.AnnData, key: str) -> np.ndarray:
    if key not in adata.obs:
        raise MetastemError(f"obs column '{key}' (CSC-like calls) is missing",
                            fix="run the stemness stage first, or pass its cells.tsv.gz to the pathways step")
    return adata.obs[key].astype(bool).to_numpy()


def wilcoxon_z(X: sp.spmatrix | np.ndarray, in_group: np.ndarray, *, genes_per_block: int = 2000) -> np.ndarray:
    """Tie-corrected Mann-Whitney z of each column, group vs the other rows (scanpy's ``wilcoxon``).

    z = (R1 - n1 (N + 1) / 2) / sqrt(T n1 n2 (N + 1) / 12), with R1 the group's rank sum (ties get
    their mean rank) and T = 1 - sum(t^3 - t) / (N^3 - N) over tie blocks; NaN for constant columns.
    The zeros of a column form one tie block whose ranks are known, so only the stored values are
    sorted: the cost follows the non-zeros, where scanpy ranks dense blocks of every cell and gene.
    """
    in_group = np.asarray(in_group, dtype=bool)
    n, n_genes = X.shape
    n1 = int(in_group.sum())
    n2 = n - n1
    z = np.full(n_genes, np.nan)
    X = sp.csc_matrix(X)  # one conversion; column blocks of CSC are cheap slices
    for g0 in range(0, n_genes, genes_per_block):
        C = sp.csc_matrix(X[:, g0:g0 + genes_per_block], dtype=np.float64)
        C.sort_indices()
        g = C.shape[1]
        stored = np.diff(C.indptr)
        n0 = n - stored                                      # zeros per gene: one tie block
        col = np.repeat(np.arange(g), stored)
        lo = float(C.data.min()) if C.nnz else 0.0
        span = np.ceil((float(C.data.max()) if C.nnz else 0.0) - lo) + 1.0
        order = np.argsort(col * span + (C.data - lo))  # exact key: integer + float32 offset; ties are averaged
        v, c, rows = C.data[order], col[order], C.indices[order]
        pos = np.arange(v.size) - C.indptr[c]                # 0-based position among the gene's stored values
        new_run = np.ones(v.size, dtype=bool)
        new_run[1:] = (c[1:] != c[:-1]) | (v[1:] != v[:-1])
        run = np.cumsum(new_run) - 1
        run_start = np.flatnonzero(new_run)
        run_len = np.diff(np.append(run_start, v.size)).astype(np.float64)
        mean_pos = pos[run_start][run] + (run_len[run] - 1.0) / 2.0
        neg = np.bincount(c, weights=(v < 0), minlength=g)   # negatives rank below the zero block
        rank = mean_pos + 1.0 + np.where(v > 0, n0[c], 0)
        r1 = np.bincount(c, weights=rank * in_group[rows], minlength=g)
        zeros_in_group = n1 - np.bincount(c, weights=in_group[rows], minlength=g)
        r1 += zeros_in_group * (neg + (n0 + 1.0) / 2.0)
        ties = np.bincount(c[run_start], weights=run_len ** 3 - run_len, minlength=g) + n0.astype(np.float64) ** 3 - n0
        t = 1.0 - ties / (float(n) ** 3 - n)
        with np.errstate(invalid="ignore", divide="ignore"):
            z[g0:g0 + g] = np.where(t > 0, (r1 - n1 * (n + 1.0) / 2.0) / np.sqrt(t * n1 * n2 * (n + 1.0) / 12.0),
                                    np.nan)
    return z


def wilcoxon_ranking(adata: ad.AnnData, csc_key: str = "csc_like", *, max_cells: int | None = None,
                     seed: int = 0) -> pd.Series:
    """Genes ranked by the Wilcoxon z-statistic of CSC-like vs other cells, highest first.

    With ``max_cells``, each group is subsampled (seeded) to at most that many cells: the gene order
    is stable long before 100k cells, while the test's cost grows with them. Genes constant in both
    groups carry no rank information and are left out.
    """
    is_csc = _csc_mask(adata, csc_key)
    if is_csc.all() or not is_csc.any():
        raise MetastemError(f"obs['{csc_key}'] has a single value, so there is nothing to rank against",
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


def pathways_summary(adata: ad.AnnData, coverage: pd.DataFrame, *, gsea: pd.DataFrame | None = None,
                     fdr: float = 0.05, min_delta: float = MIN_DELTA, csc_key: str = "csc_like",
                     stemness_key: str = "stemness", pseudotime_key: str = "pseudotime",
                     genes_key: str = "n_genes_by_counts") -> pd.DataFrame:
    """One row per set, sortable: coverage, CSC-like contrast, correlations, GSEA, and a call.

    ``significant``: BH-adjusted Mann–Whitney p below ``fdr`` *and* |Cliff's delta| ≥ ``min_delta``
    (small effect or larger) *and* the set flagged ``ok``. A set with one or two genes found is a
    gene, not a pathway readout, and ``score_genes`` scores of such sets are the most exposed to
    the control-gene shift seen when CSC-like cells detect more low-level genes; they keep their
    statistics but are not called. ``confounded_by_genes_detected`` marks significant sets whose
    contrast does not survive regressing out genes detected. Rows are ordered significant first,
    then by |delta|, so the pathways that separate CSC-like cells most come first.
    """
    is_csc = _csc_mask(adata, csc_key)
    ngenes = genes_detected(adata, genes_key)
    names = [s for s in coverage["set"] if f"{PREFIX}{s}" in adata.obs]
    scores = adata.obs[[f"{PREFIX}{s}" for s in names]].set_axis(names, axis=1)
    adjusted = adata.obsm[ADJUSTED_KEY] if ADJUSTED_KEY in adata.obsm else adjust_for_genes_detected(scores, ngenes)
    stem = adata.obs[stemness_key].to_numpy(float) if stemness_key in adata.obs else np.full(adata.n_obs, np.nan)
    ptime = adata.obs[pseudotime_key].to_numpy(float) if pseudotime_key in adata.obs else np.full(adata.n_obs, np.nan)
    rows = []
    for s in names:
        x = scores[s].to_numpy(float)
        auroc, delta, p = csc_contrast(x, is_csc)
        auroc_res, delta_res, p_res = csc_contrast(adjusted[s].to_numpy(float), is_csc)
        rho_s, p_s, _ = spearman_finite(x, stem)
        rho_t, p_t, n_t = spearman_finite(x, ptime)
        rho_g, _, _ = spearman_finite(x, ngenes)
        rows.append({"set": s, "auroc_csc": auroc, "delta_csc": delta, "p_csc": p,
                     "auroc_csc_resid": auroc_res, "delta_csc_resid": delta_res, "p_csc_resid": p_res,
                     "rho_stemness": rho_s, "p_stemness": p_s, "rho_pseudotime": rho_t, "p_pseudotime": p_t,
                     "n_cells_pseudotime": n_t, "rho_genes_detected": rho_g})
    stats = pd.DataFrame(rows, columns=["set", "auroc_csc", "delta_csc", "p_csc", "auroc_csc_resid",
                                        "delta_csc_resid", "p_csc_resid", "rho_stemness", "p_stemness",
                                        "rho_pseudotime", "p_pseudotime", "n_cells_pseudotime", "rho_genes_detected"])
    for col in ("csc", "csc_resid", "stemness", "pseudotime"):
        stats.insert(stats.columns.get_loc(f"p_{col}") + 1, f"padj_{col}", bh_adjust(stats[f"p_{col}"]))
    out = coverage[["set", "source", "n_genes", "n_found", "coverage", "flag"]].merge(stats, on="set", how="left")
    if gsea is not None and len(gsea):
        out = out.merge(gsea[["set", "gsea_nes", "gsea_fdr"]], on="set", how="left")
    else:
        out["gsea_nes"], out["gsea_fdr"] = np.nan, np.nan
    out["direction"] = np.select([out["delta_csc"] > 0, out["delta_csc"] < 0], ["up_in_csc", "down_in_csc"], "none")
    out["significant"] = (out["padj_csc"] < fdr) & (out["delta_csc"].abs() >= min_delta) & (out["flag"] == FLAG_OK)
    out["confounded_by_genes_detected"] = out["significant"] & ~((out["padj_csc_resid"] < fdr)
                                                                 & (out["delta_csc_resid"].abs() >= min_delta))
    order = out.assign(_abs=out["delta_csc"].abs().fillna(-1)).sort_values(["significant", "_abs"], ascending=False)
    return order.drop(columns="_abs").reset_index(drop=True)


@dataclass
class PathwayResult:
    """Everything the final rule writes: tables for the report and the per-cell scores in ``adata``."""

    coverage: pd.DataFrame
    summary: pd.DataFrame
    cluster_means: pd.DataFrame
    gsea: pd.DataFrame
    ranking: pd.Series | None
    ssgsea: pd.DataFrame
    notes: list[str]


def run_pathways(adata: ad.AnnData, params: dict, *, species: str, seed: int = 0,
                 aliases_path: str | Path | None = None, threads: int = 1,
                 groupby: str = "leiden", csc_key: str = "csc_like") -> PathwayResult:
    """The whole pathway stage on a clustered AnnData carrying stemness, csc_like and pseudotime in obs.

    ``params`` is the config's ``pathways`` section. Writes ``obs['pathway_<SET>']`` and
    ``obsm['pathway_scores_resid']``; returns the tables.
    """
    notes = []
    sets = load_pathway_sets(params["gene_sets"], params["extra_gene_sets"], species)
    aliases = read_aliases(aliases_path, species) if aliases_path else None
    cov = score_pathways(adata, sets, scorer=params["scorer"], ctrl_size=params["ctrl_size"], seed=seed,
                         min_genes_found=params["min_genes_found"], aliases=aliases, species=species)
    for flag, what in ((FLAG_ABSENT, "have no gene in the data and were not scored"),
                       (FLAG_FEW, f"have fewer than {params['min_genes_found']} genes in the data (flagged)")):
        bad = cov.loc[cov["flag"] == flag, "set"].tolist()
        if bad:
            notes.append(f"{len(bad)} set(s) {what}: {', '.join(bad)}")
    names = scored_sets(adata)
    scores = adata.obs[[f"{PREFIX}{s}" for s in names]].set_axis(names, axis=1)
    adata.obsm[ADJUSTED_KEY] = adjust_for_genes_detected(scores, genes_detected(adata))
    resolved = {k: v for k, v in resolved_sets(cov).items() if k in names}
    is_csc = _csc_mask(adata, csc_key)
    ranking, gsea = None, pd.DataFrame(columns=["set", "gsea_es", "gsea_nes", "gsea_p", "gsea_fdr", "gsea_lead_genes"])
    if 0 < is_csc.sum() < adata.n_obs:
        ranking = wilcoxon_ranking(adata, csc_key, max_cells=params["ranking_max_cells"], seed=seed)
        gsea = gsea_prerank(ranking, resolved, permutations=params["gsea_permutations"], seed=seed,
                            min_size=min(2, params["min_genes_found"]), threads=threads)
    else:
        notes.append(f"GSEA prerank skipped: obs['{csc_key}'] marks {int(is_csc.sum())} of {adata.n_obs} cells")
    ssg = ssgsea_pseudobulk(adata, resolved, groupby=groupby, min_size=min(2, params["min_genes_found"]),
                            seed=seed, threads=threads)
    summary = pathways_summary(adata, cov, gsea=gsea, fdr=params["fdr"], csc_key=csc_key)
    n_sig = int(summary["significant"].sum())
    notes.append(f"{n_sig} of {len(names)} scored sets differ between CSC-like and other cells "
                 f"(BH FDR < {params['fdr']}, |Cliff's delta| >= {MIN_DELTA}, "
                 f"at least {params['min_genes_found']} genes found)")
    return PathwayResult(coverage=cov, summary=summary, cluster_means=per_cluster_means(adata, groupby), gsea=gsea,
                         ranking=ranking, ssgsea=ssg, notes=notes)
