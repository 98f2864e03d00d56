"""Gene sets: GMT files, alias-aware coverage in a dataset, and fast reproducible per-cell scores.

Shared by the stemness and pathway stages. Matching is exact on symbols, with one escape hatch:
an alias table (old → current symbol) so that data annotated with older names (CTGF, IL8, Cxcr7)
still match current-symbol sets, and the reverse. An alias is only used when the name the set asks
for is absent from the data, so an ambiguous alias can never replace a real gene.
"""
from __future__ import annotations

import logging
import os
import re
from importlib import resources
from pathlib import Path

import anndata as ad
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from metastem.errors import MetastemError

log = logging.getLogger(__name__)

SHIPPED_PREFIX = "metastem:"  # config values naming a file shipped inside the package (data/gene_sets/)
_GMT_FIX = "write one set per line: name<TAB>description<TAB>gene<TAB>gene... (tab-separated, at least one gene)"


def shipped(name: str) -> Path:
    """Path of a file shipped with metastem in ``data/gene_sets/`` (GMT files, provenance, alias and
    ortholog tables), read through :mod:`importlib.resources` so it works from a wheel as from a checkout."""
    path = Path(str(resources.files("metastem") / "data" / "gene_sets" / name))
    if not path.is_file():
        available = sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(("_", ".")))
        raise MetastemError(f"no shipped gene-set file '{name}'", file=f"{SHIPPED_PREFIX}{name}",
                            fix=f"use one of {', '.join(available)}, or give the path of your own file")
    return path


def resolve_path(path: str | os.PathLike, species: str | None = None) -> str:
    """A gene-set path from the config: ``{species}`` filled in, ``metastem:<name>`` resolved to the
    shipped file; any other path is returned as given (relative to the working directory)."""
    text = str(path)
    if species is not None:
        text = text.replace("{species}", species)
    if text.startswith(SHIPPED_PREFIX):
        return str(shipped(text[len(SHIPPED_PREFIX):]))
    return text


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a GMT file (name, description, genes... tab-separated) into {name: genes}.

    Stricter than most readers on purpose: a space-separated line or a symbol with spaces inside
    would otherwise become one long "gene" that silently matches nothing.
    """
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise MetastemError("gene-set file not found", file=path,
                            fix="correct the path in the config (relative to the working directory)")
    sets: dict[str, list[str]] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                line = line.rstrip("\n\r")
                if not line.strip() or line.startswith("#"):
                    continue
                fields = line.split("\t")
                name = fields[0].strip()
                genes = [g.strip() for g in fields[2:] if g.strip()]
                if len(fields) < 3 or not name or not genes:
                    raise MetastemError(f"line {n} is not 'name<TAB>description<TAB>gene...'", file=path, fix=_GMT_FIX)
                spaced = [g for g in genes if re.search(r"\s", g)]
                if spaced:
                    raise MetastemError(f"line {n} (set '{name}'): gene field '{spaced[0]}' contains spaces",
                                        file=path, fix="separate genes with tabs, not spaces")
                if "/" in name:
                    raise MetastemError(f"line {n}: set name '{name}' contains '/'", file=path,
                                        fix="use letters, digits, '_', '-' or '.' in set names "
                                            "(they become obs column names)")
                if name in sets:
                    raise MetastemError(f"line {n}: set '{name}' defined twice", file=path,
                                        fix="give every set a unique name")
                sets[name] = list(dict.fromkeys(genes))
    except (OSError, UnicodeDecodeError) as exc:
        raise MetastemError(f"gene-set file cannot be read as text ({type(exc).__name__})", file=path,
                            fix="point the config at a readable text GMT file") from None
    if not sets:
        raise MetastemError("gene-set file holds no sets", file=path, fix="add at least one set")
    return sets


def read_aliases(path: str | os.PathLike, species: str) -> dict[str, str]:
    """``{alias: current symbol}`` for one species from a TSV with columns species, alias, symbol."""
    path = resolve_path(path)
    try:
        tab = pd.read_csv(path, sep="\t", comment="#", dtype=str)
    except (OSError, pd.errors.ParserError) as exc:
        raise MetastemError(f"alias table cannot be read ({type(exc).__name__})", file=str(path),
                            fix="provide a TSV with columns species, alias, symbol") from None
    missing = {"species", "alias", "symbol"} - set(tab.columns)
    if missing:
        raise MetastemError(f"alias table lacks column(s) {sorted(missing)}", file=str(path),
                            fix="provide a TSV with columns species, alias, symbol")
    tab = tab[tab["species"] == species]
    return dict(zip(tab["alias"], tab["symbol"]))


def resolve_genes(genes: list[str], present: set[str], aliases: dict[str, str] | None = None
                  ) -> tuple[list[str], dict[str, str]]:
    """Data names for ``genes``: the gene itself, else an alias of it (or its current symbol).

    Returns (data names found, {set gene: data name} for the matches made through an alias).
    """
    aliases = aliases or {}
    by_symbol: dict[str, list[str]] = {}
    for old, new in aliases.items():
        by_symbol.setdefault(new, []).append(old)
    found, via = [], {}
    for g in genes:
        if g in present:
            found.append(g)
            continue
        candidates = by_symbol.get(g, []) + ([aliases[g]] if g in aliases else [])
        hit = next((c for c in candidates if c in present), None)
        if hit is not None:
            found.append(hit)
            via[g] = hit
    return list(dict.fromkeys(found)), via


def gene_set_coverage(sets: dict[str, list[str]], var_names: pd.Index,
                      aliases: dict[str, str] | None = None) -> pd.DataFrame:
    """Genes found / genes in set, per set; ``genes_found`` holds the data's names (alias-resolved)."""
    present = set(map(str, var_names))
    rows = []
    for name, genes in sets.items():
        found, via = resolve_genes(genes, present, aliases)
        matched = set(via) | {g for g in genes if g in present}
        rows.append({"set": name, "n_genes": len(genes), "n_found": len(found),
                     "coverage": len(matched) / len(genes) if genes else 0.0,
                     "genes_found": ",".join(found),
                     "genes_missing": ",".join(g for g in genes if g not in matched),
                     "aliases_used": ",".join(f"{k}={v}" for k, v in via.items())})
    return pd.DataFrame(rows)


def _chunk_rows(n_cols: int, max_elements: int = 2**25) -> int:
    """Rows per chunk so that a dense chunk stays under ``max_elements`` (128 MB as float32)."""
    return max(1, max_elements // max(1, n_cols))


def col_sums(X: sp.spmatrix | np.ndarray) -> np.ndarray:
    """Column sums in float64, by row chunks: a float32 matrix is never copied whole to float64."""
    step = _chunk_rows(X.shape[1])
    return sum((np.asarray(X[i:i + step].sum(axis=0, dtype="float64")).ravel()
                for i in range(0, X.shape[0], step)), np.zeros(X.shape[1]))


@numba.njit(cache=True)
def _row_contributions(vals, n_top, contrib):
    """Expected AUCell weight of each stored value of one cell under a random order of tied genes.

    Values are ranked descending; a block of L tied values occupying positions a..a+L-1 gives each of
    its genes the mean of max(n_top - p, 0) over those positions, which is the expectation of the
    score over every order of the tie (what random tie-breaking estimates with one draw). Zeros and
    negatives never enter the top. Returns (order, k): ``contrib[:k]`` holds the weights of the
    values ``vals[order[:k]]``, the only ones inside the top.
    """
    order = np.argsort(-vals)  # any sort: ties are averaged below, so their order does not matter
    pos = 0
    k = 0
    n = order.size
    while k < n and pos < n_top:
        v = vals[order[k]]
        if v <= 0:
            break
        e = k + 1
        while e < n and vals[order[e]] == v:
            e += 1
        length = e - k
        last = min(pos + length, n_top)          # exclusive end of the positions inside the top
        cnt = last - pos
        w = (cnt * n_top - cnt * (pos + last - 1) / 2.0) / length
        for kk in range(k, e):
            contrib[kk] = w
        pos += length
        k = e
    return order, k


@numba.njit(parallel=True, cache=True)
def _aucell_rows(indptr, indices, data, n_top, set_ptr, set_idx, out):
    """Per row: weight the stored positive values by rank (ties: expected weight over their orders)
    and add the weight of each of the first ``n_top`` genes to every set it belongs to."""
    for r in numba.prange(indptr.size - 1):
        lo = indptr[r]
        vals = data[lo:indptr[r + 1]]
        contrib = np.empty(vals.size)
        order, n_pos = _row_contributions(vals, n_top, contrib)
        for k in range(n_pos):
            g = indices[lo + order[k]]
            for m in range(set_ptr[g], set_ptr[g + 1]):
                out[r, set_idx[m]] += contrib[k]


@numba.njit(parallel=True, cache=True)
def _aucell_grouped(indptr, indices, data, n_top, set_ptr, set_idx, set_scale, n_cell_sets, group, n_groups,
                    n_chunks, cells_out, sums, sumsq, nonzero):
    """One pass over the cells for many sets: per-cell scores of the first ``n_cell_sets`` sets into
    ``cells_out`` (every cell), and for every set the per-group sum, sum of squares and count of
    non-zero scores of the cells whose ``group`` is >= 0 (``sums[chunk, group, set]``, one slab per
    parallel chunk so that threads never write the same memory). Scores are scaled by ``set_scale``
    (1 / (n_top * set size)) as they are completed, so the accumulators hold AUCell values."""
    n_rows = indptr.size - 1
    n_sets = set_scale.size
    step = (n_rows + n_chunks - 1) // n_chunks
    for c in numba.prange(n_chunks):
        buf = np.zeros(n_sets)
        touched = np.empty(n_sets, dtype=np.int64)
        seen = np.zeros(n_sets, dtype=np.bool_)
        for r in range(c * step, min(n_rows, (c + 1) * step)):
            grp = group[r]
            if grp < 0 and n_cell_sets == 0:
                continue
            lo = indptr[r]
            vals = data[lo:indptr[r + 1]]
            contrib = np.empty(vals.size)
            order, n_pos = _row_contributions(vals, n_top, contrib)
            n_touched = 0
            for k in range(n_pos):
                g = indices[lo + order[k]]
                for m in range(set_ptr[g], set_ptr[g + 1]):
                    s = set_idx[m]
                    if grp < 0 and s >= n_cell_sets:
                        continue
                    if not seen[s]:
                        seen[s] = True
                        touched[n_touched] = s
                        n_touched += 1
                    buf[s] += contrib[k]
            for t in range(n_touched):
                s = touched[t]
                v = buf[s] * set_scale[s]
                if s < n_cell_sets:
                    cells_out[r, s] = v
                if grp >= 0:
                    sums[c, grp, s] += v
                    sumsq[c, grp, s] += v * v
                    nonzero[c, grp, s] += 1
                buf[s] = 0.0
                seen[s] = False


def _membership(n_genes: int, gene_sets: list[np.ndarray]) -> tuple[sp.csr_matrix, np.ndarray]:
    """Genes x sets membership (CSR: the sets of each gene) and each set's size (duplicates counted
    once), built from (set, gene) pairs so that thousands of null sets never make a dense matrix."""
    lens = np.array([np.asarray(g).size for g in gene_sets], dtype=np.int64)
    genes = np.concatenate([np.asarray(g, dtype=np.int64).ravel() for g in gene_sets]) if gene_sets else \
        np.zeros(0, dtype=np.int64)
    key = np.sort(np.repeat(np.arange(len(gene_sets), dtype=np.int64), lens) * n_genes + genes)
    key = key[np.r_[True, key[1:] != key[:-1]]] if key.size else key  # sort-based: np.unique hashes slowly
    cols, rows = np.divmod(key, n_genes)
    sizes = np.bincount(cols, minlength=len(gene_sets)).astype(np.int64)
    member = sp.csr_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(n_genes, len(gene_sets)))
    member.sort_indices()
    return member, sizes


def _sorted_csr(X: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    Xc = sp.csr_matrix(X)
    if not Xc.has_sorted_indices:
        Xc = Xc.copy()
        Xc.sort_indices()
    return Xc


def aucell_matrix(X: sp.spmatrix | np.ndarray, gene_sets: dict[str, np.ndarray], top_frac: float = 0.05
                  ) -> pd.DataFrame:
    """AUCell-style rank scores of many sets at once: (cells × sets) DataFrame, columns = set names.

    Each cell's genes are ranked once by value (zeros never enter the top) and every set is read off
    that ranking, so the cost is one sort of each cell's stored values regardless of the number of
    sets (a compiled loop over cells, in parallel). Rank-based, hence insensitive to depth
    normalisation (Aibar et al. 2017). Tied values (UMI data tie at counts of 1-2 by the hundred)
    share their positions: each tied gene gets the expected weight over every order of the tie,
    which is what pySCENIC/ctxcore's random shuffle before ranking estimates with one draw. Breaking
    ties by gene index instead made scores depend on where a gene sits in ``var_names``.
    """
    Xc = _sorted_csr(X)
    n_cells, n_genes = Xc.shape
    n_top = max(1, int(round(top_frac * n_genes)))
    names = list(gene_sets)
    member, sizes = _membership(n_genes, [np.asarray(gene_sets[n]) for n in names])
    out = np.zeros((n_cells, len(names)))
    _aucell_rows(Xc.indptr, Xc.indices, Xc.data, n_top, member.indptr, member.indices, out)
    return pd.DataFrame(out / (n_top * np.maximum(sizes, 1.0)), columns=names)


def aucell_grouped(X: sp.spmatrix | np.ndarray, gene_sets: list[np.ndarray], group: np.ndarray, n_groups: int, *,
                   n_cell_sets: int = 0, top_frac: float = 0.05, n_chunks: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """AUCell of many sets in one pass, kept per cell only for the first ``n_cell_sets`` sets.

    For every set (e.g. the tested sets followed by thousands of matched random sets) returns the
    per-group sum, sum of squares and number of cells with a non-zero score, over the cells whose
    ``group`` code is >= 0 (groups x sets each), plus the per-cell scores (cells x ``n_cell_sets``).
    Group means and variances are all that a mean-difference contrast needs, so the null sets cost
    one pass over the cells and memory of groups x sets, never cells x sets.
    """
    Xc = _sorted_csr(X)
    n_cells, n_genes = Xc.shape
    n_top = max(1, int(round(top_frac * n_genes)))
    member, sizes = _membership(n_genes, gene_sets)
    scale = 1.0 / (n_top * np.maximum(sizes, 1.0))
    group = np.asarray(group, dtype=np.int64)
    n_chunks = int(n_chunks or max(1, min(n_cells, 4 * numba.get_num_threads())))
    n_sets = len(gene_sets)
    cells = np.zeros((n_cells, n_cell_sets))
    sums = np.zeros((n_chunks, n_groups, n_sets))
    sumsq = np.zeros((n_chunks, n_groups, n_sets))
    nonzero = np.zeros((n_chunks, n_groups, n_sets), dtype=np.int64)
    _aucell_grouped(Xc.indptr, Xc.indices, Xc.data, n_top, member.indptr, member.indices, scale, n_cell_sets,
                    group, n_groups, n_chunks, cells, sums, sumsq, nonzero)
    return cells, sums.sum(axis=0), sumsq.sum(axis=0), nonzero.sum(axis=0)


def aucell_score(X: sp.spmatrix | np.ndarray, gene_idx: np.ndarray, top_frac: float = 0.05) -> np.ndarray:
    """AUCell-style score of one set: area under the recovery curve within each cell's top genes."""
    return aucell_matrix(X, {"set": np.asarray(gene_idx)}, top_frac)["set"].to_numpy()


def score_genes_matrix(X: sp.spmatrix | np.ndarray, var_names: pd.Index, gene_sets: dict[str, list[str]], *,
                       ctrl_size: int = 50, n_bins: int = 25, seed: int = 0) -> pd.DataFrame:
    """``sc.tl.score_genes`` for many sets at once: (cells × sets) DataFrame, scanpy's values.

    The Tirosh et al. (2016) score: mean of the set's genes minus the mean of control genes drawn
    from the same expression bins. scanpy recomputes every gene's mean (two copies of X) per set;
    here gene means and bins are computed once, control genes are drawn exactly as scanpy 1.11 draws
    them (defaults ``ctrl_as_ref=True``, all genes as the pool, a ``RandomState(seed)`` per set, as
    ``random_state=seed`` seeds it), and all scores come from one sparse product, X @ weights, taken
    by row chunks so that X is never copied whole.
    """
    names = pd.Index(var_names.astype(str), dtype="string")
    n_cells = X.shape[0]
    avg = pd.Series(col_sums(X) / n_cells, index=names)
    avg = avg[np.isfinite(avg)]
    n_items = int(np.round(len(avg) / (n_bins - 1)))
    cut = avg.rank(method="min") // n_items
    col = pd.Series(np.arange(len(names)), index=names)
    weights = np.zeros((len(names), len(gene_sets)))
    for j, (name, genes) in enumerate(gene_sets.items()):
        gene_list = pd.Index(genes, dtype="string").intersection(names)
        rs = np.random.RandomState(seed)
        control = pd.Index([], dtype="string")
        for c in np.unique(cut.loc[gene_list]):
            r_genes = cut[cut == c].index
            if ctrl_size < len(r_genes):
                r_genes = r_genes.to_series().sample(ctrl_size, random_state=rs).index
            control = control.union(r_genes.difference(gene_list))
        if len(control) == 0:
            raise MetastemError(f"no control genes in the expression bins of set '{name}'",
                                fix="score with the 'aucell' scorer, or check that the data hold more than a few genes")
        weights[col[gene_list].to_numpy(), j] += 1.0 / len(gene_list)
        weights[col[control].to_numpy(), j] -= 1.0 / len(control)
    step = _chunk_rows(X.shape[1])
    scores = np.vstack([np.asarray(X[i:i + step] @ weights) for i in range(0, n_cells, step)])
    return pd.DataFrame(scores, columns=list(gene_sets))


def score_gene_sets(adata: ad.AnnData, sets: dict[str, list[str]], *, method: str = "score_genes",
                    prefix: str = "score_", seed: int = 0, ctrl_size: int = 50, layer: str | None = None,
                    aliases: dict[str, str] | None = None) -> pd.DataFrame:
    """Score every set per cell into ``obs[prefix + name]``; return the coverage table.

    Sets with no gene present are skipped here (coverage 0) and left to the caller to judge.
    ``score_genes`` uses a fixed seed so control genes, hence scores, are reproducible.
    """
    cov = gene_set_coverage(sets, adata.var_names, aliases)
    found = {rec.set: [g for g in rec.genes_found.split(",") if g] for rec in cov.itertuples()}
    found = {k: v for k, v in found.items() if v}
    X = adata.layers[layer] if layer else adata.X
    if not found:
        return cov
    if method == "score_genes":
        scores = score_genes_matrix(X, adata.var_names, found, ctrl_size=ctrl_size, seed=seed)
    elif method == "aucell":
        var_index = {g: i for i, g in enumerate(map(str, adata.var_names))}
        scores = aucell_matrix(X, {k: np.array([var_index[g] for g in v]) for k, v in found.items()})
    else:
        raise ValueError(f"unknown scorer {method!r}")
    for name in found:
        adata.obs[f"{prefix}{name}"] = scores[name].to_numpy()
    return cov
