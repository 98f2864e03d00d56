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


@numba.njit(parallel=True, cache=True)
def _aucell_rows(indptr, indices, data, n_top, set_ptr, set_idx, out):
    """Per row: rank the stored positive values (descending, ties by gene index, as CSR holds them
    sorted) and add ``n_top - rank`` to every set of each of the first ``n_top`` genes."""
    for r in numba.prange(indptr.size - 1):
        lo = indptr[r]
        order = np.argsort(-data[lo:indptr[r + 1]], kind="mergesort")   # stable
        rank = 0
        for k in range(order.size):
            j = lo + order[k]
            if rank >= n_top or data[j] <= 0:
                break
            g = indices[j]
            for m in range(set_ptr[g], set_ptr[g + 1]):
                out[r, set_idx[m]] += n_top - rank
            rank += 1


def aucell_matrix(X: sp.spmatrix | np.ndarray, gene_sets: dict[str, np.ndarray], top_frac: float = 0.05
                  ) -> pd.DataFrame:
    """AUCell-style rank scores of many sets at once: (cells × sets) DataFrame, columns = set names.

    Each cell's genes are ranked once (by value, ties by gene index; zeros never enter the top) and
    every set is read off that ranking, so the cost is one sort of each cell's stored values
    regardless of the number of sets (a compiled loop over cells, in parallel). Rank-based, hence
    insensitive to depth normalisation (Aibar et al. 2017).
    """
    Xc = sp.csr_matrix(X)
    if not Xc.has_sorted_indices:
        Xc = Xc.copy()
        Xc.sort_indices()
    n_cells, n_genes = Xc.shape
    n_top = max(1, int(round(top_frac * n_genes)))
    names = list(gene_sets)
    member = np.zeros((n_genes, len(names)), dtype=bool)
    for j, name in enumerate(names):
        member[np.asarray(gene_sets[name], dtype=int), j] = True
    sets_of_gene = sp.csr_matrix(member)
    out = np.zeros((n_cells, len(names)))
    _aucell_rows(Xc.indptr, Xc.indices, Xc.data, n_top, sets_of_gene.indptr, sets_of_gene.indices, out)
    max_auc = n_top * np.maximum(member.sum(axis=0), 1.0)
    return pd.DataFrame(out / max_auc, columns=names)


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
