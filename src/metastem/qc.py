"""Per-cell quality control: metrics, adaptive MAD thresholds, doublets, gene filter.

Defaults follow the single-cell best-practices guide (Heumos et al., Nat Rev Genet 2023): a cell is an
outlier when it lies more than 5 MADs from the median of log1p(total counts) or log1p(genes detected),
or more than 3 MADs above the median % mitochondrial counts, or above a hard % mito ceiling.
"""
from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.linalg import ArpackError

from metastem._timing import step
from metastem.blocks import BLOCK_ROWS, row_block, row_blocks
from metastem.errors import MetastemError

log = logging.getLogger(__name__)

MAX_DOUBLET_FACTOR = 3.0  # doublet calls beyond 3x the expected rate mean scrublet's threshold failed
REASONS = ["low_or_high_counts", "low_or_high_genes", "high_mito", "high_hb", "fixed_threshold", "doublet"]


def gene_flags(var_names: pd.Index, species: str) -> dict[str, np.ndarray]:
    """Mitochondrial, ribosomal and haemoglobin genes by species-specific prefixes."""
    names = pd.Index(var_names.astype(str))
    if species == "mouse":
        return {"mt": names.str.startswith("mt-"), "ribo": names.str.match(r"^Rp[sl]\d"),
                "hb": names.str.match(r"^Hb[ab]-|^Hb[ab]\d?$|^Hb[bg]-")}
    return {"mt": names.str.startswith("MT-"), "ribo": names.str.match(r"^RP[SL]\d"),
            "hb": names.str.match(r"^HB[ABDGEMQZ]\d?$")}


def remove_spike_ins(adata: ad.AnnData, *, key_added: str = "pct_counts_ercc") -> int:
    """Record the ERCC spike-in share of each cell in ``obs[key_added]``, then drop the spike-ins from X.

    ERCC controls (``ERCC-00002``..., added to Smart-seq libraries) are synthetic RNAs, not genes: left
    in, they would count towards genes detected and total counts, could become variable genes, and
    would inflate the gene-count signature of stemness. Their share (percent of each cell's counts, of
    un-logged values for log input, base from ``uns['log1p']``) is kept as a QC metric: a high share
    means little cellular RNA. Filters ``adata`` in place; returns the number of spike-ins removed
    (0: nothing written).
    """
    from metastem.genes import is_spike_in
    from metastem.io import unlog

    spike = is_spike_in(adata.var_names)
    if not spike.any():
        return 0
    X = sp.csr_matrix(adata.X) if sp.issparse(adata.X) else np.asarray(adata.X)
    if "log1p" in adata.uns:
        X = unlog(X, adata.uns["log1p"].get("base"))
    total = np.asarray(X.sum(axis=1)).ravel()
    ercc = np.asarray(X[:, spike].sum(axis=1)).ravel()
    adata.obs[key_added] = np.divide(100 * ercc, total, out=np.zeros_like(total, dtype=float), where=total > 0)
    adata._inplace_subset_var(~spike)
    return int(spike.sum())


def compute_qc_metrics(adata: ad.AnnData, species: str) -> None:
    """Add n_genes_by_counts, total_counts and pct_counts_{mt,ribo,hb} to obs (in place).

    The columns of ``sc.pp.calculate_qc_metrics(qc_vars=[mt, ribo, hb], percent_top=None, log1p=False)``
    (var: n_cells_by_counts, mean_counts, pct_dropout_by_counts, total_counts), computed on CSR without
    its one large copy: scipy's ``getnnz(axis=0)`` casts every column index to int64 (as large as X's
    values and indices together; it set QC's peak at 1M cells). Here the genes' cell counts come from
    row-block bincounts, the flagged-gene totals from mat-vec products in X's dtype (as scanpy sums).
    Measured on 21k cells x 20k genes (X 185 MB): extra memory 188 MB -> 33 MB, 1.42 s -> 0.31 s.
    """
    import scanpy as sc

    flags = gene_flags(adata.var_names, species)
    for key, mask in flags.items():
        adata.var[key] = mask
    X = adata.X
    if not sp.isspmatrix_csr(X) and not isinstance(X, sp.csr_array):
        sc.pp.calculate_qc_metrics(adata, qc_vars=["mt", "ribo", "hb"], percent_top=None, log1p=False, inplace=True)
        return
    X.eliminate_zeros()  # as scanpy does: stored zeros are not detected genes
    n_obs, n_vars = X.shape
    total = np.asarray(X.sum(axis=1)).ravel()
    adata.obs["n_genes_by_counts"] = np.diff(X.indptr).astype(np.int64)
    adata.obs["total_counts"] = total
    for key in ("mt", "ribo", "hb"):
        sub = np.asarray(X @ adata.var[key].to_numpy(bool).astype(X.dtype)).ravel()
        adata.obs[f"total_counts_{key}"] = sub
        adata.obs[f"pct_counts_{key}"] = sub / total * 100
    n_cells = np.zeros(n_vars, dtype=np.int64)
    step = 1 << 22  # bincount casts its input to int64: 32 MB per block
    for start in range(0, X.nnz, step):
        n_cells += np.bincount(X.indices[start:start + step], minlength=n_vars)
    gene_total = np.asarray(X.sum(axis=0)).ravel()
    adata.var["n_cells_by_counts"] = n_cells
    adata.var["mean_counts"] = gene_total / n_obs
    adata.var["pct_dropout_by_counts"] = (1 - n_cells / n_obs) * 100
    adata.var["total_counts"] = gene_total


def mad_bounds(x: np.ndarray, nmads: float) -> tuple[float, float]:
    """median ± nmads * MAD (unscaled MAD, as in the best-practices guide).

    When more than half of the cells share one value the MAD is 0 and the rule would remove every
    cell that differs at all (e.g. one mitochondrial read when most cells have none): then there is
    no adaptive bound (±inf), and only the fixed ceilings apply.
    """
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return -np.inf, np.inf
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med)))
    if mad == 0:
        return -np.inf, np.inf
    return med - nmads * mad, med + nmads * mad


def _expm1(v: float) -> float | None:
    """Back from log1p units; an absent bound (±inf) is None, a low bound is never below 0."""
    if not np.isfinite(v):
        return None
    return float(max(np.expm1(v), 0.0))


def qc_thresholds(obs: pd.DataFrame, qc: dict, values: str) -> dict[str, dict[str, float | None]]:
    """Thresholds actually applied, in the metrics' own units (not logs), for tables and plots."""
    th: dict[str, dict[str, float | None]] = {}
    if values == "counts":
        lo, hi = mad_bounds(np.log1p(obs["total_counts"].to_numpy()), qc["nmads_counts"])
        th["total_counts"] = {"low": _expm1(lo), "high": _expm1(hi)}
    lo, hi = mad_bounds(np.log1p(obs["n_genes_by_counts"].to_numpy()), qc["nmads_genes"])
    th["n_genes_by_counts"] = {"low": _expm1(lo), "high": _expm1(hi)}
    if obs["pct_counts_mt"].max() > 0:
        _, hi = mad_bounds(obs["pct_counts_mt"].fillna(0).to_numpy(), qc["nmads_mito"])
        th["pct_counts_mt"] = {"low": None, "high": float(min(hi, qc["max_pct_mito"]))}
    if qc["max_pct_hb"] is not None:
        th["pct_counts_hb"] = {"low": None, "high": float(qc["max_pct_hb"])}
    return th


# Scrublet runs on random blocks of at most this many cells of a sample: about one 10x channel, the unit
# scrublet is meant for (doublets form within a channel), and its exact kNN search costs block^2, so small
# blocks keep QC linear in cells. Measured on a 30k-cell simulated sample: 50k-cell blocks (one block)
# 56.7 s CPU, doublet AUROC 0.952, 1027 of 1500 doublets called; 10k-cell blocks 19.1 s, 0.940, 938. At 1.05M
# cells the 50k blocks (pynndescent above 60k profiles) made QC 1131 s of the run.
SCRUBLET_MAX_CELLS = 10_000


def call_doublets(adata: ad.AnnData, expected_rate: float, seed: int, sim_ratio: float
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """Scrublet doublet scores and calls on raw counts (:func:`metastem.doublets.scrublet_scores`). Falls
    back to the expected-rate quantile when no threshold separates the simulated doublets' scores."""
    from metastem import doublets

    # Linear in cells: no mean-centring (which densifies cells x HVGs), 30 neighbours (scrublet's default
    # 0.5*sqrt(cells) makes the kNN search superlinear), random blocks of at most SCRUBLET_MAX_CELLS cells.
    n = adata.n_obs
    n_blocks = -(-n // SCRUBLET_MAX_CELLS)
    block = np.random.default_rng(seed).permutation(n) % n_blocks if n_blocks > 1 else np.zeros(n, dtype=int)
    scores = np.empty(n)
    thresholds = []
    for b in range(n_blocks):
        idx = np.flatnonzero(block == b)
        result = doublets.scrublet_scores(adata.X[idx] if n_blocks > 1 else adata.X, expected_rate=expected_rate,
                                          sim_ratio=sim_ratio, n_neighbors=min(30, max(5, idx.size // 10)),
                                          seed=seed)
        scores[idx] = result["scores"]
        thresholds.append(result["threshold"])
    finite = [t for t in thresholds if t is not None and np.isfinite(t)]
    threshold = float(np.median(finite)) if len(finite) == n_blocks else None
    # On a homogeneous population the simulated doublets look like real cells and scrublet's automatic
    # threshold can land below most scores (seen: 114 of 120 cells called). More than
    # MAX_DOUBLET_FACTOR x the expected rate is not a plausible doublet fraction: use the quantile.
    implausible = threshold is not None and np.isfinite(threshold) and \
        (scores > threshold).mean() > min(0.5, MAX_DOUBLET_FACTOR * expected_rate)
    if threshold is None or not np.isfinite(threshold) or implausible:
        why = (f"would call {(scores > threshold).mean():.0%} of cells" if implausible else "found no threshold")
        threshold = float(np.quantile(scores, 1 - expected_rate))
        log.warning("scrublet %s; using the %.0f%% score quantile %.3f as the doublet threshold",
                    why, 100 * (1 - expected_rate), threshold)
    return scores, scores > threshold, float(threshold)


def _outside(x: pd.Series, t: dict) -> np.ndarray:
    x = x.to_numpy(dtype=float)
    out = np.zeros(x.shape, dtype=bool)
    if t.get("low") is not None:
        out |= x < t["low"]
    if t.get("high") is not None:
        out |= x > t["high"]
    return out


def sample_groups(obs: pd.DataFrame, sample_key: str = "sample") -> list[tuple[str, np.ndarray]]:
    """(sample, row positions) of each sample in obs order of first appearance; one group of every
    cell when ``sample_key`` is absent."""
    if sample_key not in obs:
        return [("all", np.arange(len(obs)))]
    codes, names = pd.factorize(obs[sample_key].astype(str), sort=True)
    return [(str(name), np.flatnonzero(codes == i)) for i, name in enumerate(names)]


def run_qc(adata: ad.AnnData, qc: dict, *, values: str, species: str, seed: int = 0, sample_key: str = "sample"
           ) -> tuple[ad.AnnData, pd.DataFrame, dict]:
    """Flag and remove low-quality cells and doublets; remove rarely detected genes.

    With several samples (``obs[sample_key]``), the MAD thresholds and scrublet run per sample: depth and
    quality differ between samples (a shallow patient would otherwise lose its cells to a deep one's
    median), and a doublet is two cells of one sample, never of two. ``info['per_sample']`` holds the
    cells in, out and removed per reason and the thresholds of each sample.

    Filters ``adata`` in place (like ``sc.pp.filter_cells``) and returns it, a per-cell table of metrics
    and reasons (all cells, for plots), and an info dict (thresholds, counts per reason, notes) for the report. Raises ``MetastemError`` naming
    ``qc.min_cells`` when too few cells are left (or were there to begin with), and when the gene
    filter leaves no gene.
    """
    notes: list[str] = []
    if adata.n_obs < qc["min_cells"]:
        raise MetastemError(f"the input has only {adata.n_obs} cells, fewer than qc.min_cells={qc['min_cells']}",
                            fix="provide more cells, or lower qc.min_cells for this dataset in the sheet's params "
                                f"column (e.g. qc.min_cells={max(10, adata.n_obs // 2)}; the minimum is 10)")
    n_ercc = remove_spike_ins(adata)
    if n_ercc:
        notes.append(f"{n_ercc} ERCC spike-ins removed from the matrix before any metric (median "
                     f"{np.median(adata.obs['pct_counts_ercc']):.1f}% of a cell's counts, kept as pct_counts_ercc): "
                     "they are not counted as genes in QC, variable genes, stemness or scores")
    with step("QC metrics"):
        compute_qc_metrics(adata, species)
    obs = adata.obs
    if not gene_flags(adata.var_names, species)["mt"].any():
        notes.append("no mitochondrial genes found (prefix %s): the %% mito filter is off"
                     % ("mt-" if species == "mouse" else "MT-"))
    groups = sample_groups(obs, sample_key)
    multi = len(groups) > 1
    reasons = pd.DataFrame(False, index=obs.index, columns=REASONS)
    th_by: dict[str, dict] = {}
    for name, idx in groups:
        sub = obs.iloc[idx]
        th = th_by[name] = qc_thresholds(sub, qc, values)
        where = f"sample {name}: " if multi else ""
        for metric, t in th.items():
            if metric != "pct_counts_hb" and t["high"] is None:
                notes.append(f"{where}{metric}: more than half of the cells share one value (MAD 0), so the "
                             "adaptive MAD rule is off for it")
        col = reasons.columns.get_loc
        if "total_counts" in th:
            reasons.iloc[idx, col("low_or_high_counts")] = _outside(sub["total_counts"], th["total_counts"])
        # a cell with no detected gene is never kept, whatever the spread of the others
        reasons.iloc[idx, col("low_or_high_genes")] = _outside(sub["n_genes_by_counts"], th["n_genes_by_counts"]) | \
            (sub["n_genes_by_counts"].to_numpy() == 0)
        if "pct_counts_mt" in th:
            reasons.iloc[idx, col("high_mito")] = _outside(sub["pct_counts_mt"].fillna(0), th["pct_counts_mt"])
        if "pct_counts_hb" in th:
            reasons.iloc[idx, col("high_hb")] = _outside(sub["pct_counts_hb"].fillna(0), th["pct_counts_hb"])
    if values != "counts":
        notes.append(f"values are '{values}', not counts: the total-counts filter is off")
    fixed = np.zeros(adata.n_obs, dtype=bool)
    for key, col, op in (("min_genes", "n_genes_by_counts", np.less), ("max_genes", "n_genes_by_counts", np.greater),
                         ("min_counts", "total_counts", np.less), ("max_counts", "total_counts", np.greater)):
        if qc[key] is not None:
            fixed |= op(obs[col].to_numpy(), qc[key])
    reasons["fixed_threshold"] = fixed

    doublet_by: dict[str, float | None] = {name: None for name, _ in groups}
    if qc["doublets"] and values == "counts":
        dbl_scores = np.full(adata.n_obs, np.nan)
        for name, idx in groups:
            where = f"sample {name}: " if multi else ""
            if idx.size < 100:
                notes.append(f"{where}doublet detection skipped: {idx.size} cells are too few for scrublet")
                continue
            try:
                with step(f"{where}doublets (scrublet)"):
                    scores, calls, doublet_by[name] = call_doublets(adata[idx] if multi else adata,
                                                                    qc["doublet_rate"], seed, qc["doublet_sim_ratio"])
            except (ValueError, np.linalg.LinAlgError, ArpackError) as exc:  # degenerate data (e.g. too few genes)
                notes.append(f"{where}doublet detection skipped: scrublet failed on these data "
                             f"({type(exc).__name__}: {exc})")
            else:
                dbl_scores[idx] = scores
                reasons.iloc[idx, reasons.columns.get_loc("doublet")] = calls
        if np.isfinite(dbl_scores).any():
            obs["doublet_score"] = dbl_scores
    elif qc["doublets"]:
        notes.append(f"doublet detection skipped: values are '{values}', scrublet needs raw counts")

    keep = ~reasons.any(axis=1).to_numpy()
    metrics = obs[[c for c in ("n_genes_by_counts", "total_counts", "pct_counts_mt", "pct_counts_ribo",
                                "pct_counts_hb", "pct_counts_ercc", "doublet_score") if c in obs]].copy()
    metrics = metrics.join(reasons).assign(kept=keep)
    if sample_key in obs:
        metrics.insert(0, "sample", obs[sample_key].astype(str).to_numpy())
    n_kept = int(keep.sum())
    if n_kept < qc["min_cells"]:
        removed = ", ".join(f"{r} {int(reasons[r].sum())}" for r in REASONS if reasons[r].any()) or "none"
        raise MetastemError(f"QC kept {n_kept} of {adata.n_obs} cells, fewer than qc.min_cells={qc['min_cells']} "
                            f"(removed: {removed})",
                            fix="check the input, or relax qc.nmads_* / qc.max_pct_mito / fixed thresholds, or lower "
                                "qc.min_cells, for this dataset in the sheet's params column")
    cells_in, genes_in = adata.n_obs, adata.n_vars
    gene_keep = genes_detected_in(adata.X, keep) >= qc["min_cells_per_gene"]
    if not gene_keep.any():
        raise MetastemError(f"no gene is detected in qc.min_cells_per_gene={qc['min_cells_per_gene']} of the "
                            f"{n_kept} cells kept",
                            fix="lower qc.min_cells_per_gene for this dataset, or check the input")
    # In place: X is the largest object of the job, and a filtered copy beside it doubled the peak (the
    # QC job of 1.05M cells x 1.1G non-zeros ran out of a 24 GB node there).
    X = adata.X
    adata.X = None
    adata._inplace_subset_obs(keep)
    adata._inplace_subset_var(gene_keep)
    adata.X = subset_csr_in_place(X, keep, gene_keep) if sp.issparse(X) else np.asarray(X)[keep][:, gene_keep]
    del X
    info = {
        "cells_in": int(cells_in), "genes_in": int(genes_in),
        "cells_out": int(adata.n_obs), "genes_out": int(adata.n_vars),
        "removed": {r: int(reasons[r].sum()) for r in REASONS},
        "removed_total": int((~keep).sum()),
        # one sample: its thresholds; several: see per_sample (each sample has its own)
        "thresholds": th_by[groups[0][0]] if not multi else {},
        "doublet_threshold": doublet_by[groups[0][0]] if not multi else None,
        "notes": notes, "n_spike_ins_removed": n_ercc,
        "per_sample": {name: {"cells_in": int(idx.size), "cells_out": int(keep[idx].sum()),
                              "removed": {r: int(reasons[r].iloc[idx].sum()) for r in REASONS},
                              "removed_total": int((~keep[idx]).sum()),
                              "thresholds": th_by[name], "doublet_threshold": doublet_by[name]}
                       for name, idx in groups},
    }
    if "gene_mapping" in adata.uns:   # how gene names were mapped at read time (metastem.genes), for the report
        info["genes"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in adata.uns["gene_mapping"].items()}
    for note in notes:
        log.info(note)
    return adata, metrics, info


def subset_csr_in_place(X: sp.spmatrix, rows: np.ndarray, cols: np.ndarray, block: int = BLOCK_ROWS
                        ) -> sp.csr_matrix:
    """The ``rows`` x ``cols`` (boolean masks) submatrix of a CSR matrix, built in X's own arrays: kept
    values move forward one block of rows at a time, then the arrays are shrunk, so the matrix is never
    held twice. X must not be used afterwards."""
    X = sp.csr_matrix(X)
    data, indices, indptr = X.data, X.indices, X.indptr
    new_col = (np.cumsum(cols) - 1).astype(indices.dtype)
    new_indptr = np.zeros(int(rows.sum()) + 1, dtype=indptr.dtype)
    written = out_row = 0
    for part in row_blocks(X.shape[0], block):
        lo, hi = indptr[part.start], indptr[part.stop]
        per_row = np.diff(indptr[part.start:part.stop + 1])
        row_of = np.repeat(np.arange(per_row.size), per_row)
        kept = rows[part][row_of] & cols[indices[lo:hi]]
        values, columns = data[lo:hi][kept], new_col[indices[lo:hi][kept]]   # copies: safe to write back
        k = values.size
        data[written:written + k], indices[written:written + k] = values, columns   # written <= lo
        counts = np.bincount(row_of[kept], minlength=per_row.size)[rows[part]]
        new_indptr[out_row + 1:out_row + 1 + counts.size] = written + np.cumsum(counts)
        written += k
        out_row += counts.size
    try:   # shrink in place: the freed tails go back to the system
        data.resize(written, refcheck=False)
        indices.resize(written, refcheck=False)
    except ValueError:   # not the arrays' own buffers (views of something else): trimmed copies instead
        data, indices = data[:written].copy(), indices[:written].copy()
    return sp.csr_matrix((data, indices, new_indptr), shape=(new_indptr.size - 1, int(cols.sum())), copy=False)


def genes_detected_in(X, rows: np.ndarray, block: int = BLOCK_ROWS) -> np.ndarray:
    """Cells in which each gene is non-zero among the ``rows`` (boolean mask), without copying X."""
    counts = np.zeros(X.shape[1], dtype=np.int64)
    for part in row_blocks(X.shape[0], block):
        B = row_block(X, part)
        if sp.issparse(B):
            B = sp.csr_matrix(B)
            kept_entry = np.repeat(rows[part], np.diff(B.indptr)) & (B.data != 0)
            counts += np.bincount(B.indices[kept_entry], minlength=X.shape[1])
        else:
            counts += (np.asarray(B)[rows[part]] != 0).sum(axis=0)
    return counts


def qc_summary_table(info: dict) -> pd.DataFrame:
    """Tidy table: cells in, removed per reason (a cell can have several), cells out, thresholds.

    Column ``sample``: 'all' for the dataset's totals, then, with several samples, the same rows for each
    sample with the thresholds applied to it (MAD thresholds and scrublet run per sample).
    """
    def block(sample: str, part: dict, genes: bool) -> list[tuple]:
        rows = [(sample, "cells_in", part["cells_in"], "")]
        rows += [(sample, f"removed_{r}", n, "") for r, n in part["removed"].items()]
        rows += [(sample, "removed_total", part["removed_total"], ""), (sample, "cells_out", part["cells_out"], "")]
        if genes:
            rows += [(sample, "genes_in", info["genes_in"], ""), (sample, "genes_out", info["genes_out"], "")]
        for metric, t in part["thresholds"].items():
            for side in ("low", "high"):
                if t[side] is not None:
                    rows.append((sample, f"threshold_{metric}_{side}", round(t[side], 4), "adaptive MAD / ceiling"))
        if part.get("doublet_threshold") is not None:
            rows.append((sample, "threshold_doublet_score", round(part["doublet_threshold"], 4), "scrublet"))
        return rows

    per_sample = info.get("per_sample") or {}
    rows = block("all", info, True)
    if len(per_sample) > 1:
        for name, part in per_sample.items():
            rows += block(name, part, False)
    return pd.DataFrame(rows, columns=["sample", "metric", "value", "note"])
