"""Malignant vs normal cells: from known labels, or from copy-number profiles inferred with infercnvpy.

Why: a tumour sample mixes malignant cells with immune cells, fibroblasts and endothelium; stem-like
calls and pathway contrasts are only meaningful among the malignant cells (issue 15). Normal cells have
a diploid genome; malignant cells carry arm-level gains and losses that shift the average expression of
hundreds of neighbouring genes together. infercnvpy (Tirosh et al. 2016's inferCNV, in Python) smooths
each cell's expression, relative to reference normal cells, along the genome: a cell's CNV profile.

Evidence, in this order (recorded per cell in ``obs['malignant_evidence']``):

1. ``'labels'``: the user names an obs column and which of its values are malignant (or normal);
2. ``'cnv'``: CNV profiles against reference normal cells -- the cells of user-declared normal labels
   (``reference_key`` / ``reference_values``), or, when none are given, the clusters that the marker rules
   of :data:`REFERENCE_MARKERS` call immune, stromal or endothelial (rule in :func:`reference_clusters`);
3. ``'none'``: no reference (no cluster passes the rules) or no gene positions: every cell is kept as
   malignant, with a note that says so; nothing is guessed silently.

The CNV score of a cell is the mean absolute value of its CNV profile, averaged with its neighbours in the
expression kNN graph (why: a single cell's profile is noisy; its neighbours share its genome). A cell is
called malignant when its score exceeds both a robust upper bound of the reference cells' scores and the
Otsu cut of all scores -- see :func:`call_from_scores`.
"""
from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from metastem._keys import Obs, Uns
from metastem.errors import MetastemError

log = logging.getLogger(__name__)

# Documented marker rules for automatic reference cells: compartment -> marker genes (human symbols;
# mouse symbols are matched case-insensitively). PTPRC (CD45) marks every leukocyte.
REFERENCE_MARKERS: dict[str, list[str]] = {
    "immune": ["PTPRC"],
    "T_cell": ["CD3E", "CD3D", "CD2"],
    "B_cell": ["MS4A1", "CD79A", "CD19"],
    "myeloid": ["CD68", "LYZ", "CD14", "AIF1", "CSF1R", "TYROBP", "C1QA", "C1QB"],
    "fibroblast": ["COL1A1", "COL1A2", "DCN", "LUM", "PDGFRB"],
    "endothelial": ["PECAM1", "VWF", "CDH5", "KDR", "CLDN5"],
}
EVIDENCE = ("labels", "cnv", "none")
_SHARED_GENOME = Path(__file__).resolve().parents[3] / "shared" / "reference" / "genome"


@functools.lru_cache(maxsize=2)
def _position_table(species: str) -> pd.DataFrame:
    try:
        from metastem.genes import gene_positions
    except ImportError:  # before the package table existed: the shared build of the same files
        path = _SHARED_GENOME / f"{species}_gene_positions.tsv.gz"
        if not path.is_file():
            raise MetastemError(f"no gene-position table for species '{species}'", fix="use species human or mouse")
        return pd.read_csv(path, sep="\t", keep_default_na=False)
    return gene_positions(species)


def gene_position_table(species: str = "human") -> pd.DataFrame:
    """The shipped gene positions (columns symbol, chromosome, start, end, strand, gene_id, biotype)."""
    return _position_table(species).copy()


def annotate_positions(adata: ad.AnnData, species: str = "human") -> int:
    """Add ``var['chromosome', 'start', 'end']`` (infercnvpy's names) from the shipped table.

    Joined on the Ensembl id in ``var['gene_ids']`` where the data carry one (symbols of older
    references match less well), else on the symbol. Genes without a position get NaN (infercnvpy skips
    them). Returns the number of genes placed.
    """
    tab = _position_table(species)
    by_symbol = tab.set_index("symbol")[["chromosome", "start", "end"]]
    pos = by_symbol.reindex(adata.var_names.astype(str))
    if "gene_ids" in adata.var:
        by_id = tab.drop_duplicates("gene_id").set_index("gene_id")[["chromosome", "start", "end"]]
        ids = adata.var["gene_ids"].astype(str).str.replace(r"\.\d+$", "", regex=True)
        pos_id = by_id.reindex(ids.to_numpy())
        pos_id.index = pos.index
        pos = pos_id.where(pos_id["chromosome"].notna(), pos)
    adata.var["chromosome"] = pos["chromosome"].to_numpy()
    adata.var["start"] = pos["start"].to_numpy(dtype=float)
    adata.var["end"] = pos["end"].to_numpy(dtype=float)
    return int(pd.notna(adata.var["chromosome"]).sum())


def reference_clusters(adata: ad.AnnData, *, groupby: str = Obs.LEIDEN, min_detection: float = 0.3,
                       min_enrichment: float = 3.0) -> pd.DataFrame:
    """Clusters that the marker rules call normal (immune, stromal, endothelial): the automatic reference.

    Rule, per cluster and compartment of :data:`REFERENCE_MARKERS`: the compartment's detection is the
    mean, over its marker genes present in the data, of the fraction of the cluster's cells with a
    non-zero value. A cluster is a reference cluster of that compartment when its detection is at least
    ``min_detection`` AND at least ``min_enrichment`` times the median detection of all clusters (so a
    marker that every cell expresses selects nothing). A cluster passing several compartments takes the
    one with the highest enrichment. Returns one row per cluster: ``cluster, n_cells, compartment``
    ('' = not reference), ``detection``, ``enrichment`` and the detection of every compartment.
    """
    if groupby not in adata.obs:
        raise MetastemError(f"obs has no '{groupby}' column to choose reference clusters from",
                            fix="cluster the data first or name normal labels (malignant.reference_values)")
    upper = {str(g).upper(): i for i, g in enumerate(adata.var_names)}
    groups = adata.obs[groupby].astype(str).to_numpy()
    clusters = pd.unique(groups)
    X = adata.X.tocsr() if sp.issparse(adata.X) else sp.csr_matrix(adata.X)
    rows = []
    det = {}
    for comp, markers in REFERENCE_MARKERS.items():
        cols = [upper[m] for m in markers if m in upper]
        if not cols:
            continue
        nz = (X[:, cols] > 0).astype(np.float32)
        frac = pd.DataFrame(nz.toarray(), columns=range(len(cols))).groupby(groups).mean().mean(axis=1)
        det[comp] = frac.reindex(clusters)
    det = pd.DataFrame(det, index=clusters)
    for c in clusters:
        best, best_enr = "", 0.0
        for comp in det.columns:
            d = det.loc[c, comp]
            med = max(float(det[comp].median()), 1e-3)
            enr = d / med
            if d >= min_detection and enr >= min_enrichment and enr > best_enr:
                best, best_enr = comp, enr
        rows.append({"cluster": c, "n_cells": int((groups == c).sum()), "compartment": best,
                     "detection": float(det.loc[c, best]) if best else np.nan,
                     "enrichment": float(best_enr) if best else np.nan,
                     **{f"detection_{k}": float(det.loc[c, k]) for k in det.columns}})
    return pd.DataFrame(rows)


def otsu_threshold(values: np.ndarray) -> float:
    """The cut of a 1-D sample that maximises the between-group variance of the two sides (Otsu 1979)."""
    v = np.sort(np.asarray(values, dtype=float)[np.isfinite(values)])
    if v.size < 2 or v[0] == v[-1]:
        return float(v[-1]) if v.size else np.nan
    k = np.arange(1, v.size)
    cs = np.cumsum(v)[:-1]
    m0, m1 = cs / k, (v.sum() - cs) / (v.size - k)
    between = k * (v.size - k) * (m0 - m1) ** 2
    between[v[1:] == v[:-1]] = -1.0  # cut only between distinct values
    i = int(np.argmax(between))
    return float((v[i] + v[i + 1]) / 2)


def call_from_scores(scores: np.ndarray, reference: np.ndarray, *, threshold_mads: float = 5.0
                     ) -> tuple[np.ndarray, float, dict]:
    """Malignant = not a reference cell AND score above both cuts:

    - ``median + threshold_mads x MAD`` of the reference cells' scores (MAD scaled to a standard
      deviation): what declared-normal cells reach. It is biased low -- the reference defines the zero
      of the CNV profile -- so it alone would call every normal cell type outside the reference;
    - the Otsu cut of all cells' scores: the split of the score distribution into a low and a high group
      (normal cell types outside the reference still score far below malignant cells: on the
      oligodendroglioma data, microglia 0.002, normal oligodendrocytes 0.028, tumours 0.05-0.08).

    Returns (calls, threshold, diagnostics) with the separation of the two groups (Ashman's D; > 2 is a
    clean split) in the diagnostics.
    """
    ref = scores[reference]
    med = float(np.median(ref))
    mad = 1.4826 * float(np.median(np.abs(ref - med)))
    mad = max(mad, 1e-3 * max(med, 1e-6))
    tau_ref = med + threshold_mads * mad
    tau_otsu = otsu_threshold(scores)
    tau = max(tau_ref, tau_otsu)
    calls = (scores > tau) & ~reference
    hi, lo = scores[calls], scores[~calls]
    d = (abs(hi.mean() - lo.mean()) / np.sqrt((hi.var() + lo.var()) / 2)) if hi.size > 1 and lo.size > 1 else np.nan
    return calls, float(tau), {"threshold_reference": float(tau_ref), "threshold_otsu": float(tau_otsu),
                               "ashman_d": float(d) if np.isfinite(d) else -1.0}


def _smooth(values: np.ndarray, conn) -> np.ndarray:
    """Average of each cell's value and its kNN neighbours' (row-normalised connectivities + self)."""
    if conn is None:
        return values
    w = conn.tocsr().astype(np.float64) + sp.identity(conn.shape[0], format="csr")
    deg = np.asarray(w.sum(axis=1)).ravel()
    return np.asarray(w @ values).ravel() / deg


def _natural_sort(names) -> list[str]:
    """infercnvpy's chromosome order (chr1, chr2, ..., chr10, ...)."""
    import re

    return sorted(names, key=lambda k: [int(t) if t.isdigit() else t.lower() for t in re.split("([0-9]+)", k)])


def window_matrix(var: pd.DataFrame, *, window_size: int = 100, step: int = 10) -> tuple[sp.csr_matrix, dict]:
    """infercnvpy's running windows as a sparse (genes x windows) weight matrix.

    Per chromosome (natural order, chrM left out), genes sorted by start as infercnvpy sorts them; a
    pyramid-weighted window of ``window_size`` genes every ``step`` genes (a chromosome with fewer genes
    than the window: one flat window). ``X @ W`` is infercnvpy's running mean of X (np.convolve 'valid'
    with the same pyramid, every step-th column) in one sparse product instead of one convolution per cell
    and chromosome. Returns (W, chr_pos: chromosome -> first window).
    """
    chromosomes = _natural_sort([c for c in var["chromosome"].unique() if str(c).startswith("chr") and c != "chrM"])
    position = {g: i for i, g in enumerate(var.index)}
    rows, cols, vals, chr_pos = [], [], [], {}
    n_win = 0
    for ch in chromosomes:
        genes = var.loc[var["chromosome"] == ch].sort_values("start").index.values
        idx = np.array([position[g] for g in genes])
        g = idx.size
        chr_pos[ch] = n_win
        if window_size < g:
            r = np.arange(1, window_size + 1)
            pyramid = np.minimum(r, r[::-1]).astype(np.float64)
            pyramid /= pyramid.sum()
            starts = np.arange(0, g - window_size + 1, step)
            rows.append(idx[(starts[:, None] + np.arange(window_size)[None, :]).ravel()])
            cols.append(np.repeat(n_win + np.arange(starts.size), window_size))
            vals.append(np.tile(pyramid, starts.size))
            n_win += starts.size
        else:
            rows.append(idx)
            cols.append(np.full(g, n_win))
            vals.append(np.full(g, 1.0 / g))
            n_win += 1
    W = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(var), n_win))
    return W, chr_pos


def infercnv_matrix(adata: ad.AnnData, *, reference_key: str | None = None, reference_cat: Sequence[str] = (),
                    lfc_clip: float = 3.0, window_size: int = 100, step: int = 10, dynamic_threshold: float = 1.5,
                    exclude_chromosomes: Sequence[str] = ("chrX", "chrY"), chunksize: int = 5000,
                    key_added: str = "cnv") -> None:
    """``infercnvpy.tl.infercnv`` (0.6.1) computed with :func:`window_matrix`: same steps, same chunks.

    Log fold change against the reference (the min/max envelope of several reference categories, or the
    mean of all cells), clipped at ``lfc_clip``; running mean along each chromosome; centred on each cell's
    median; values below ``dynamic_threshold`` x the chunk's standard deviation set to 0. Why: infercnvpy
    convolves every cell and chromosome separately at every gene and then keeps every ``step``-th window
    (a Python call per cell and chromosome, ten times the arithmetic) on a densified chunk; here a zero of
    X gives the same fold change in every cell, so each chunk is a row vector plus a sparse matrix and the
    running mean is one sparse product: the same matrix (tests: equal to infercnvpy up to float32 rounding)
    in a fraction of the time and memory, in-process.
    Writes ``obsm['X_<key_added>']`` (CSR) and ``uns[key_added]['chr_pos']`` as infercnvpy does.
    """
    var = adata.var
    mask = var["chromosome"].isnull().to_numpy()
    if exclude_chromosomes:
        mask |= var["chromosome"].isin(list(exclude_chromosomes)).to_numpy()
    keep = np.flatnonzero(~mask)
    X = adata.X
    if reference_key and len(reference_cat):
        col = adata.obs[reference_key].to_numpy()
        reference = np.vstack([np.asarray(X[col == c].mean(axis=0)).ravel() for c in reference_cat])
    else:
        reference = np.asarray(X.mean(axis=0)).reshape(1, -1)
    reference = reference[:, keep].astype(np.float32)
    W, chr_pos = window_matrix(var.iloc[keep], window_size=window_size, step=step)
    W = W.astype(np.float32)
    ref_min, ref_max = reference.min(axis=0), reference.max(axis=0)

    def centred(v: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Clipped log fold change of values v of genes j (infercnvpy's steps 1-2)."""
        if reference.shape[0] == 1:
            out = v - reference[0, j]
        else:
            out = np.where(v > ref_max[j], v - ref_max[j], np.where(v < ref_min[j], v - ref_min[j], 0.0))
        return np.clip(out, -lfc_clip, lfc_clip)

    # A zero of X becomes the same value in every cell (the gene's fold change at 0), so the centred chunk
    # is that row vector c plus a sparse part at X's stored values: running mean = D @ W + c @ W, without
    # densifying the chunk (cells x genes) -- only its result (cells x windows).
    all_genes = np.arange(keep.size)
    c = centred(np.zeros(keep.size, dtype=np.float32), all_genes).astype(np.float32)
    c_w = np.asarray(c @ W).ravel()
    blocks = []
    for i in range(0, adata.n_obs, chunksize):
        x = X[i:i + chunksize]
        x = sp.csr_matrix(x) if sp.issparse(x) else sp.csr_matrix(np.asarray(x))
        x = x[:, keep]
        d = x.astype(np.float32, copy=True)
        d.data = (centred(d.data, d.indices) - c[d.indices]).astype(np.float32)
        sm = (d @ W).toarray()
        sm += c_w[None, :]
        sm -= np.median(sm, axis=1)[:, None]
        if dynamic_threshold is not None:
            sm[np.abs(sm) < dynamic_threshold * np.std(sm)] = 0
        blocks.append(sp.csr_matrix(sm))
        del x, d, sm
    adata.obsm[f"X_{key_added}"] = sp.vstack(blocks, format="csr")
    adata.uns[key_added] = {"chr_pos": {k: int(v) for k, v in chr_pos.items()}}


#: Below this many genes with an autosomal position the calls are unreliable on the simulated tumour (3
#: patients, 6 planted arm-level events each; ``benchmarks/cnv_gene_floor.py``, window 100, genes drawn at
#: random): sensitivity 0.11-0.60 at 300-800 genes (seed 0, two draws), worst 0.40 at 1,200, 0.25 at 1,600 and
#: 0.66 at 2,000 (seeds 0-2), 0.93 at 3,000 and 0.99 at 4,000; specificity fell to 0.68 on one 500-gene draw and
#: was >= 0.94 from 800 genes. Windows of 10-40 genes did not rescue 300-1,200. Inference still runs, with a note.
RELIABLE_GENES_WITH_POSITION = 3000


def infer_malignant(adata: ad.AnnData, *, labels_key: str = "",
                    malignant_values: Sequence[str] = (), normal_values: Sequence[str] = (),
                    reference_key: str = "", reference_values: Sequence[str] = (),
                    species: str = "human", groupby: str = Obs.LEIDEN, min_detection: float = 0.3,
                    min_enrichment: float = 3.0, threshold_mads: float = 5.0, window_size: int = 100,
                    step: int = 10, min_genes_with_position: int = 300, n_jobs: int = 1,
                    chunksize: int = 5000, implementation: str = "matrix", key_added: str = Obs.MALIGNANT,
                    copy: bool = False) -> ad.AnnData | None:
    """Call malignant vs normal cells, with the evidence, in place.

    Parameters
    ----------
    adata
        Log-normalised expression in X (the clustered AnnData), with ``obs[groupby]`` clusters and,
        for the smoothing of scores, ``obsp['connectivities']``.
    labels_key, malignant_values, normal_values
        Known labels: cells whose ``obs[labels_key]`` is in ``malignant_values`` are malignant, in
        ``normal_values`` normal (with only one of the lists, every other value is the other kind).
        Evidence ``'labels'``; the normal-labelled cells are also the CNV reference for the score.
    reference_key, reference_values
        Declared normal cells for the CNV reference (e.g. a cell-type column and its normal types).
    species
        Gene positions of the shipped GENCODE table (human GRCh38, mouse GRCm39).
    groupby, min_detection, min_enrichment
        Clusters and the marker rule of :func:`reference_clusters` for the automatic reference.
    threshold_mads
        Call rule of :func:`call_from_scores`.
    window_size, step
        infercnvpy's running window (genes) and step along each chromosome (its defaults).
    min_genes_with_position
        Fewer genes with a known position than this: no CNV inference (a note says so).
    n_jobs, chunksize
        Cells per chunk (the result, chunksize x windows, is dense per chunk); worker processes of the
        ``'infercnvpy'`` implementation (which also densifies chunksize x genes).
    implementation
        ``'matrix'``: :func:`infercnv_matrix`, infercnvpy's computation as one sparse product per chunk
        (equal results, tested; much faster); ``'infercnvpy'``: ``infercnvpy.tl.infercnv`` itself.
    key_added
        obs column of the call.
    copy
        Return a copy instead of writing into ``adata``.

    Writes
    ------
    ``obs[key_added]`` (bool), ``obs['cnv_score']`` (float; NaN without positions),
    ``obs['malignant_evidence']`` ('labels' | 'cnv' | 'none'), ``obs['cnv_reference']`` (compartment or
    label of reference cells, '' otherwise), ``obsm['X_cnv']`` and ``uns['cnv']`` (infercnvpy's CNV
    matrix and chromosome positions), ``uns[key_added]``: params, notes, the rule used, reference cells per
    compartment, the threshold, the reference-cluster table as JSON text (h5ad-writable).
    """
    adata = adata.copy() if copy else adata
    params = {k: v for k, v in dict(labels_key=labels_key, malignant_values=list(malignant_values),
                                    normal_values=list(normal_values), reference_key=reference_key,
                                    reference_values=list(reference_values), species=species, groupby=groupby,
                                    min_detection=min_detection, min_enrichment=min_enrichment,
                                    threshold_mads=threshold_mads, window_size=window_size, step=step,
                                    min_genes_with_position=min_genes_with_position,
                                    implementation=implementation).items() if v is not None}
    notes: list[str] = []
    n = adata.n_obs
    reference = np.zeros(n, dtype=bool)
    ref_label = np.full(n, "", dtype=object)
    calls = None
    evidence = "cnv"
    rule = ""
    ref_table = pd.DataFrame()

    # 1. Known labels.
    if labels_key and (malignant_values or normal_values):
        if labels_key not in adata.obs:
            raise MetastemError(f"labels column '{labels_key}' is not in obs",
                                fix="name an existing obs column or leave malignant labels empty")
        lab = adata.obs[labels_key].astype(str).to_numpy()
        unknown = sorted(set(map(str, malignant_values)) | set(map(str, normal_values)) - set(lab))
        if unknown:
            raise MetastemError(f"label values {unknown} are not in obs['{labels_key}'] "
                                f"(has: {', '.join(sorted(set(lab))[:10])})", fix="correct the malignant/normal label values")
        if malignant_values:
            calls = np.isin(lab, list(map(str, malignant_values)))
        else:
            calls = ~np.isin(lab, list(map(str, normal_values)))
        if malignant_values and normal_values:
            other = ~np.isin(lab, list(map(str, malignant_values)) + list(map(str, normal_values)))
            if other.any():
                notes.append(f"{int(other.sum())} cells have labels named neither malignant nor normal; "
                             "they are counted as normal")
        evidence, rule = "labels", f"labels: obs['{labels_key}']"
        reference = ~calls
        ref_label[reference] = lab[reference]
    # 2. Declared normal reference.
    elif reference_key and reference_values:
        if reference_key not in adata.obs:
            raise MetastemError(f"reference column '{reference_key}' is not in obs",
                                fix="name an existing obs column in malignant.reference_key")
        lab = adata.obs[reference_key].astype(str).to_numpy()
        missing = sorted(set(map(str, reference_values)) - set(lab))
        if missing:
            raise MetastemError(f"reference values {missing} are not in obs['{reference_key}']",
                                fix="correct malignant.reference_values")
        reference = np.isin(lab, list(map(str, reference_values)))
        ref_label[reference] = lab[reference]
        rule = f"declared normal reference: obs['{reference_key}'] in {list(map(str, reference_values))}"
    # 3. Automatic reference from marker rules.
    else:
        ref_table = reference_clusters(adata, groupby=groupby, min_detection=min_detection,
                                       min_enrichment=min_enrichment)
        picked = ref_table[ref_table["compartment"] != ""]
        groups = adata.obs[groupby].astype(str).to_numpy()
        for _, r in picked.iterrows():
            m = groups == r["cluster"]
            reference |= m
            ref_label[m] = r["compartment"]
        rule = ("automatic reference: clusters whose marker detection (mean fraction of cells detecting the "
                f"markers) is >= {min_detection} and >= {min_enrichment}x the median cluster's, per compartment "
                + "; ".join(f"{k}: {', '.join(v)}" for k, v in REFERENCE_MARKERS.items()))
        if len(picked):
            notes.append(f"reference normal cells chosen automatically: {len(picked)} clusters "
                         + ", ".join(f"{r.cluster} ({r.compartment}, {r.n_cells} cells)" for r in picked.itertuples()))
        if len(picked) and len(picked) == len(ref_table):
            notes.append("every cluster passed the normal-marker rules: no malignant cells can be told apart")
        if reference.all():
            reference[:] = False

    # CNV profiles.
    work = ad.AnnData(X=adata.X, obs=pd.DataFrame({"ref": pd.Categorical(ref_label)}, index=adata.obs_names),
                      var=pd.DataFrame(index=adata.var_names.copy()))
    if "gene_ids" in adata.var:
        work.var["gene_ids"] = adata.var["gene_ids"].to_numpy()
    try:
        n_placed = annotate_positions(work, species)
    except MetastemError as err:
        n_placed = 0
        notes.append(f"no gene positions ({err.problem})")
    autosomal = int(pd.Series(work.var["chromosome"]).isin([f"chr{i}" for i in range(1, 23)]).sum()) if n_placed else 0
    scores = np.full(n, np.nan)
    tau = np.nan
    diag: dict = {}
    if implementation not in ("matrix", "infercnvpy"):
        raise MetastemError(f"unknown CNV implementation '{implementation}'", fix="use 'matrix' or 'infercnvpy'")
    if autosomal < min_genes_with_position:
        notes.append(f"only {autosomal} genes have an autosomal position (need {min_genes_with_position}): "
                     "no copy-number inference")
        if calls is None:
            evidence = "none"
    else:
        if autosomal < RELIABLE_GENES_WITH_POSITION:
            notes.append(f"only {autosomal} genes have an autosomal position: copy-number calls are unreliable "
                         f"below ~{RELIABLE_GENES_WITH_POSITION} (measured on simulated tumours: worst sensitivity "
                         "0.25-0.66 at 1,600-2,000 genes, >= 0.93 from 3,000; specificity down to 0.68 at 500); "
                         "treat the calls as uncertain, or name the malignant cells with the sheet's labels column")
        ref_cats = sorted(set(ref_label[reference]))
        kw = dict(reference_key="ref", reference_cat=ref_cats) if ref_cats else {}
        if not ref_cats:
            notes.append("no reference normal cells: CNV profiles are relative to the average of all cells")
        logging.getLogger("infercnvpy").setLevel(logging.ERROR)
        if implementation == "infercnvpy":
            import infercnvpy as cnv  # imports scanpy (~3 s): only when asked for

            cnv.tl.infercnv(work, window_size=window_size, step=step, n_jobs=n_jobs, chunksize=chunksize, **kw)
        else:
            infercnv_matrix(work, window_size=window_size, step=step, chunksize=chunksize, **kw)
        X_cnv = work.obsm["X_cnv"]
        raw = np.asarray(abs(X_cnv).mean(axis=1)).ravel()
        scores = _smooth(raw, adata.obsp.get("connectivities"))
        adata.obsm["X_cnv"] = X_cnv
        adata.uns[Uns.CNV] = {"chr_pos": {k: int(v) for k, v in work.uns["cnv"]["chr_pos"].items()}}
        if calls is None:
            if ref_cats:
                calls, tau, diag = call_from_scores(scores, reference, threshold_mads=threshold_mads)
                rule += (f"; malignant = CNV score above both the reference cells' median + {threshold_mads} MAD "
                         f"({diag['threshold_reference']:.4g}) and the Otsu cut of all scores "
                         f"({diag['threshold_otsu']:.4g})")
                if 0 <= diag["ashman_d"] < 2:
                    notes.append(f"the CNV scores of malignant and normal calls overlap (Ashman's D "
                                 f"{diag['ashman_d']:.2f} < 2): treat the calls as uncertain")
            else:
                evidence = "none"
    if calls is None:
        calls = np.ones(n, dtype=bool)
        notes.append("without copy-number inference every cell is kept as malignant; malignant calls are not "
                     "available for this dataset (name them with the sheet's labels column if they are known)"
                     if autosomal < min_genes_with_position else
                     "no normal reference (no labels, no declared normal cells, no cluster passing the "
                     "immune/stromal/endothelial marker rules): every cell is kept as malignant; "
                     "malignant calls are not available for this dataset")
        rule = rule + "; no call made" if rule else "no call made"
    adata.obs[key_added] = np.asarray(calls, dtype=bool)
    adata.obs[Obs.CNV_SCORE] = scores
    adata.obs[Obs.MALIGNANT_EVIDENCE] = pd.Categorical([evidence] * n, categories=list(EVIDENCE))
    adata.obs[Obs.CNV_REFERENCE] = pd.Categorical(ref_label.astype(str))
    if calls.all() and evidence != "none":
        notes.append("every cell is called malignant: the data hold no normal cells by this evidence")
    if evidence == "cnv" and not calls.any():
        notes.append(f"no cell is called malignant: no CNV score is above the reference cells' range "
                     f"({diag.get('threshold_reference', np.nan):.4g}). Either the data hold no malignant cells, or "
                     f"the copy-number signal is too weak to call ({autosomal} genes with an autosomal position; a "
                     "targeted panel rarely has enough); if the malignant cells are known, name them with the sheet's "
                     "labels column")
    counts = pd.Series(ref_label[reference]).value_counts()
    adata.uns[key_added] = {
        "params_json": json.dumps(params), "evidence": evidence, "rule": rule, "notes": notes,
        "n_malignant": int(calls.sum()), "n_normal": int((~calls).sum()), "n_reference": int(reference.sum()),
        "reference_cells_json": json.dumps({str(k): int(v) for k, v in counts.items()}),
        "threshold": float(tau) if np.isfinite(tau) else -1.0, **diag,
        "genes_with_position": int(n_placed), "reference_clusters_json": ref_table.to_json(orient="records"),
    }
    return adata if copy else None


def malignant_summary(adata: ad.AnnData, *, sample_key: str = Obs.SAMPLE, key: str = Obs.MALIGNANT) -> pd.DataFrame:
    """Per sample (and 'all'): cells, malignant cells and fraction, reference cells, median CNV score of
    malignant and normal cells, evidence."""
    obs = adata.obs
    samples = obs[sample_key].astype(str) if sample_key in obs else pd.Series("all", index=obs.index)
    rows = []
    for s, idx in list(samples.groupby(samples).groups.items()) + ([("all", obs.index)] if samples.nunique() > 1 else []):
        o = obs.loc[idx]
        mal = o[key].astype(bool)
        rows.append({"sample": s, "n_cells": len(o), "n_malignant": int(mal.sum()),
                     "frac_malignant": float(mal.mean()) if len(o) else np.nan,
                     "n_reference": int((o[Obs.CNV_REFERENCE].astype(str) != "").sum()) if Obs.CNV_REFERENCE in o else 0,
                     "median_cnv_score_malignant": float(o.loc[mal, Obs.CNV_SCORE].median()) if mal.any() else np.nan,
                     "median_cnv_score_normal": float(o.loc[~mal, Obs.CNV_SCORE].median()) if (~mal).any() else np.nan,
                     "evidence": str(o[Obs.MALIGNANT_EVIDENCE].iloc[0]) if len(o) else ""})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- figures

def plot_cnv_heatmap(adata: ad.AnnData, *, sample_key: str = Obs.SAMPLE, key: str = Obs.MALIGNANT,
                     max_cells: int = 3000, seed: int = 0, ax=None, return_fig: bool = False, save=None):
    """CNV profiles: cells (rows, grouped by sample and call) x genomic windows (columns, chromosomes
    marked). Subsampled to ``max_cells`` rows (stratified by group) for readability."""
    import matplotlib.pyplot as plt

    from metastem import plots

    if "X_cnv" not in adata.obsm:
        raise MetastemError("no CNV profiles (obsm['X_cnv']) to draw", fix="run metastem.cnv.infer_malignant first")
    plots.apply_style()
    obs = adata.obs
    samples = obs[sample_key].astype(str).to_numpy() if sample_key in obs else np.full(adata.n_obs, "all")
    call = np.where(obs[key].astype(bool), "malignant", "normal")
    group = pd.Series([f"{s} | {c}" for s, c in zip(samples, call)], index=obs.index)
    rng = np.random.default_rng(seed)
    frac = min(1.0, max_cells / adata.n_obs)
    take = []
    for g in sorted(group.unique(), key=lambda x: (x.split(" | ")[1] == "malignant", x)):
        idx = np.flatnonzero(group.to_numpy() == g)
        k = max(1, int(round(idx.size * frac)))
        take.append(np.sort(rng.choice(idx, size=min(k, idx.size), replace=False)))
    order = np.concatenate(take)
    M = adata.obsm["X_cnv"][order]
    M = M.toarray() if sp.issparse(M) else np.asarray(M)
    chr_pos = adata.uns[Uns.CNV]["chr_pos"]
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(11, 5.5))
    else:
        fig = ax.figure
    vmax = float(np.quantile(np.abs(M), 0.995)) or 0.1
    im = ax.imshow(M, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    starts = sorted(chr_pos.items(), key=lambda kv: kv[1])
    for i, (ch, s0) in enumerate(starts):
        if s0 > 0:
            ax.axvline(s0 - 0.5, color="black", lw=0.4)
        end = starts[i + 1][1] if i + 1 < len(starts) else M.shape[1]
        ax.text((s0 + end) / 2, -0.01 * M.shape[0], ch.removeprefix("chr"), ha="center", va="bottom", fontsize=6)
    labels = group.to_numpy()[order]
    bounds = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    for b in bounds:
        ax.axhline(b - 0.5, color="black", lw=0.6)
    edges = np.concatenate([[0], bounds, [len(labels)]])
    ax.set_yticks((edges[:-1] + edges[1:]) / 2 - 0.5)
    ax.set_yticklabels([labels[e] for e in edges[:-1]], fontsize=7)
    ax.set_xticks([])
    ax.set_xlabel("genomic position (chromosomes 1-22, running windows)")
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label="inferred CNV (log ratio vs reference)")
    ax.set_title(f"Inferred copy-number profiles ({len(order)} of {adata.n_obs} cells)", pad=14)
    return plots.finish(fig, save, return_fig)


def plot_cnv_score_umap(adata: ad.AnnData, *, key: str = Obs.MALIGNANT, basis: str = "X_umap", ax=None,
                        return_fig: bool = False, save=None):
    """CNV score per cell on the UMAP, beside the malignant call."""
    import matplotlib.pyplot as plt

    from metastem import plots

    if basis not in adata.obsm:
        raise MetastemError(f"no embedding obsm['{basis}'] to draw on", fix="run the clustering stage first")
    plots.apply_style()
    xy = np.asarray(adata.obsm[basis])[:, :2]
    if ax is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    else:
        fig, axes = ax.figure, [ax]
    plots.scatter_embedding(axes[0], xy, adata.obs[Obs.CNV_SCORE].astype(float), "CNV score")
    if len(axes) > 1:
        plots.scatter_embedding(axes[1], xy, adata.obs[key].map({True: "malignant", False: "normal"}).astype(str),
                                f"call ({adata.obs[Obs.MALIGNANT_EVIDENCE].iloc[0]})")
    return plots.finish(fig, save, return_fig)
