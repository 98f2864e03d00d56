"""Reading every supported input format into one shape of AnnData, and checking it.

After ``read_dataset`` the AnnData has cells as rows, unique cell barcodes, unique gene symbols as
var_names, X as CSR float32 with finite, non-negative values (integers when declared counts).
Every problem is a ``MetastemError`` that names what to fix; nothing from deep inside a reader leaks.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from metastem.errors import MetastemError

log = logging.getLogger(__name__)

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "gene_name", "gene_names", "symbol", "feature_name",
                  "gene_ids_symbol", "Gene", "gene")


def _find(directory: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in ("", ".gz"):
            p = directory / f"{stem}{suffix}"
            if p.exists():
                return p
    return None


def _read_lines_table(path: Path) -> pd.DataFrame:
    """A header-less TSV (barcodes/features), gzipped or not, as strings."""
    try:
        return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False, quoting=3)
    except pd.errors.EmptyDataError:
        raise MetastemError(f"{path.name} is empty", fix="re-export the Cell Ranger matrix folder") from None
    except Exception as exc:
        raise MetastemError(f"{path.name} does not parse ({type(exc).__name__}: {exc})",
                            fix="re-export the Cell Ranger matrix folder") from None


def read_10x_mtx(path: str) -> ad.AnnData:
    """A Cell Ranger matrix folder: matrix.mtx, barcodes.tsv and features.tsv (v3) or genes.tsv (v2),
    each gzipped or not (any mix). Gene symbols become var_names, IDs go to var['gene_ids'];
    only 'Gene Expression' features are kept when the feature type column exists."""
    from scipy.io import mmread

    d = Path(path)
    files = {"matrix.mtx": _find(d, ("matrix.mtx",)), "barcodes.tsv": _find(d, ("barcodes.tsv",)),
             "features.tsv": _find(d, ("features.tsv", "genes.tsv"))}
    missing = [name for name, f in files.items() if f is None]
    if missing:
        raise MetastemError(f"10x directory is missing {' and '.join(missing)} (.gz or not)",
                            fix="point 'path' at the Cell Ranger filtered_feature_bc_matrix folder with all three files")
    try:
        m = mmread(str(files["matrix.mtx"]))
    except Exception as exc:
        raise MetastemError(f"matrix.mtx does not parse as MatrixMarket ({type(exc).__name__}: {exc})",
                            fix="re-export the matrix; it may be truncated") from None
    barcodes = _read_lines_table(files["barcodes.tsv"])
    feats = _read_lines_table(files["features.tsv"])
    n_genes, n_cells = m.shape
    if len(barcodes) != n_cells or len(feats) != n_genes:
        raise MetastemError(f"matrix.mtx is {n_genes} genes x {n_cells} cells but there are {len(feats)} features "
                            f"and {len(barcodes)} barcodes", fix="re-export the folder; the three files must come from one run")
    X = sp.csr_matrix(m.T, dtype=np.float32)
    ids = feats.iloc[:, 0].to_numpy(str)
    symbols = feats.iloc[:, 1].to_numpy(str) if feats.shape[1] > 1 else ids
    var = pd.DataFrame({"gene_ids": ids}, index=pd.Index(symbols))
    if feats.shape[1] > 2:
        var["feature_types"] = feats.iloc[:, 2].to_numpy(str)
    adata = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(barcodes.iloc[:, 0].to_numpy(str))), var=var)
    if "feature_types" in adata.var and (adata.var["feature_types"] == "Gene Expression").any():
        adata = adata[:, (adata.var["feature_types"] == "Gene Expression").to_numpy()].copy()
    return adata


def read_10x_h5(path: str) -> ad.AnnData:
    import scanpy as sc

    try:
        adata = sc.read_10x_h5(path, gex_only=True)
    except Exception as exc:
        raise MetastemError(f"not a readable 10x HDF5 file ({type(exc).__name__}: {exc})",
                            fix="re-download the Cell Ranger .h5, or declare the right format") from None
    return adata


def read_h5ad(path: str) -> ad.AnnData:
    try:
        return ad.read_h5ad(path)
    except Exception as exc:
        raise MetastemError(f"h5ad file is truncated or corrupt ({type(exc).__name__})",
                            fix="re-export it with anndata's write_h5ad") from None


def _decode(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype.kind in ("S", "O"):
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values.ravel()]).reshape(values.shape)
    return values


_LOOM_GENE_ATTRS = ("Gene", "gene", "gene_symbols", "var_names", "Accession", "gene_ids")
_LOOM_CELL_ATTRS = ("CellID", "cell_id", "obs_names", "cell", "barcode")


def read_loom(path: str) -> ad.AnnData:
    """A loom file (genes x cells in /matrix, names in row_attrs/col_attrs), read with h5py directly:
    loompy is not a dependency. 1-D col_attrs become obs columns (so 'labels' can name one)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f or "row_attrs" not in f or "col_attrs" not in f:
                raise MetastemError("loom file lacks /matrix, /row_attrs or /col_attrs",
                                    fix="re-export it with loompy or anndata's write_loom")
            M = f["matrix"]
            n_genes, n_cells = M.shape
            X = sp.vstack([sp.csr_matrix(M[i:i + 2048, :]) for i in range(0, n_genes, 2048)] or
                          [sp.csr_matrix((0, n_cells))]).T.tocsr().astype(np.float32)
            rows = {k: _decode(f["row_attrs"][k][()]) for k in f["row_attrs"] if f["row_attrs"][k].ndim == 1}
            cols = {k: _decode(f["col_attrs"][k][()]) for k in f["col_attrs"] if f["col_attrs"][k].ndim == 1}
    except MetastemError:
        raise
    except Exception as exc:
        raise MetastemError(f"loom file does not parse ({type(exc).__name__}: {exc})",
                            fix="re-export it with loompy or anndata's write_loom") from None
    gkey = next((k for k in _LOOM_GENE_ATTRS if k in rows), None)
    ckey = next((k for k in _LOOM_CELL_ATTRS if k in cols), None)
    if gkey is None or ckey is None:
        raise MetastemError(f"loom file has no {'gene' if gkey is None else 'cell'} names "
                            f"(row_attrs: {sorted(rows)}, col_attrs: {sorted(cols)})",
                            fix=f"store gene names in row_attrs/{_LOOM_GENE_ATTRS[0]} and barcodes in col_attrs/{_LOOM_CELL_ATTRS[0]}")
    var = pd.DataFrame({k: v for k, v in rows.items() if k != gkey}, index=pd.Index(rows[gkey].astype(str)))
    obs = pd.DataFrame({k: v for k, v in cols.items() if k != ckey}, index=pd.Index(cols[ckey].astype(str)))
    return ad.AnnData(X=X, obs=obs, var=var)


def _header_fields(path: str, sep: str) -> list[str]:
    import gzip

    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rt", newline="") as fh:
        line = fh.readline().rstrip("\r\n")
    return [f.strip().strip('"') for f in line.split(sep)]


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def read_text_matrix(path: str, sep: str, orientation: str) -> ad.AnnData:
    """A dense CSV/TSV: first column holds row names, header holds column names (with or without
    the corner cell, as R's write.table writes it). Duplicate column names are kept as they are
    (pandas would rename them silently), so duplicate barcodes are caught and duplicate genes warned."""
    fix_parse = f"use a {'comma' if sep == ',' else 'tab'}-separated table with names in the first row and column"
    try:
        df = pd.read_csv(path, sep=sep, index_col=0)
    except pd.errors.EmptyDataError:
        raise MetastemError("text matrix is empty", fix="re-export the matrix") from None
    except UnicodeDecodeError:
        raise MetastemError("text matrix is not text (binary content)", fix="declare the right format or re-export") from None
    except Exception as exc:
        raise MetastemError(f"text matrix does not parse ({type(exc).__name__}: {str(exc).strip()})",
                            fix=fix_parse) from None
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise MetastemError(f"text matrix has a header but no data ({df.shape[0]} rows x {df.shape[1]} columns)",
                            fix="export the full matrix, not just its header")
    header = _header_fields(path, sep)
    if len(header) == df.shape[1] + 1:
        df.columns = header[1:]
    elif len(header) == df.shape[1]:
        df.columns = header
    non_numeric = [df.columns[i] for i, dt in enumerate(df.dtypes) if not pd.api.types.is_numeric_dtype(dt)]
    if non_numeric:
        raise MetastemError(f"text matrix has non-numeric columns (e.g. {[str(c) for c in non_numeric[:3]]})",
                            fix="keep only the expression values, with names in the first column and header")
    if orientation == "genes_x_cells":
        df = df.T
    X = sp.csr_matrix(df.to_numpy(dtype=np.float32))
    return ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(df.index.astype(str))),
                      var=pd.DataFrame(index=pd.Index(df.columns.astype(str))))


def file_checksum(path: str, algorithm: str = "sha256") -> str:
    """Checksum of a file, or of every file in a folder (sorted by name), for provenance."""
    h = hashlib.new(algorithm)
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return f"{algorithm}:{h.hexdigest()}"


def _use_symbols(adata: ad.AnnData) -> None:
    """Replace Ensembl IDs by gene symbols when a symbol column exists; otherwise it is an error."""
    names = adata.var_names.astype(str)
    frac_ens = np.mean([bool(_ENSEMBL.match(n)) for n in names[:2000]]) if len(names) else 0
    if frac_ens < 0.5:
        return
    for col in SYMBOL_COLUMNS:
        if col in adata.var.columns and not adata.var[col].astype(str).str.match(_ENSEMBL).mean() > 0.5:
            sym = adata.var[col].astype(str)
            adata.var["gene_ids"] = names
            adata.var_names = pd.Index(np.where(sym.isin(["", "nan", "None"]), names, sym))
            log.info("var names were Ensembl IDs; using symbols from var['%s']", col)
            return
    raise MetastemError("genes are Ensembl IDs and no gene-symbol column was found in var",
                        fix=f"add a var column with symbols (one of {', '.join(SYMBOL_COLUMNS[:4])}) or convert IDs to symbols")


def check_species(adata: ad.AnnData, species: str) -> None:
    """Mouse symbols are capitalised (Actb), human ones upper-case (ACTB): a mismatch ruins every gene set."""
    names = pd.Index(adata.var_names.astype(str))
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


def validate_matrix(adata: ad.AnnData, values: str) -> ad.AnnData:
    """Check shape and values; return AnnData with CSR float32 X and unique names."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise MetastemError(f"matrix has {adata.n_obs} cells and {adata.n_vars} genes",
                            fix="check the export; for csv/tsv check the 'orientation' column")
    X = adata.X
    if X is None:
        raise MetastemError("the file holds no expression matrix X", fix="store expression values in X")
    if not sp.issparse(X):
        X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    X = sp.csr_matrix(X, dtype=np.float32)
    data = X.data
    if not np.isfinite(data).all():
        raise MetastemError(f"matrix has {int((~np.isfinite(data)).sum())} NaN or infinite values",
                            fix="replace missing values by 0 or remove the affected cells/genes")
    if (data < 0).any():
        raise MetastemError(f"matrix has {int((data < 0).sum())} negative values (scaled or batch-corrected data?)",
                            fix="provide counts, normalized or log-normalized values, which are never negative")
    if values == "counts" and data.size and not np.all(data == np.round(data)):
        raise MetastemError("values declared 'counts' but the matrix holds non-integer values",
                            fix="set values to 'normalized' or 'log' in the dataset sheet")
    adata.X = X
    if adata.obs_names.has_duplicates:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()
        raise MetastemError(f"{len(dup)} duplicate cell barcodes (e.g. {', '.join(map(str, dup[:3]))})",
                            fix="make barcodes unique, e.g. prefix them with the sample name")
    _use_symbols(adata)
    if adata.var_names.has_duplicates:
        n = int(adata.var_names.duplicated().sum())
        log.warning("%d duplicate gene symbols made unique (suffixes -1, -2, ...)", n)
        adata.var_names_make_unique()
    adata.obs_names = adata.obs_names.astype(str)
    adata.var_names = adata.var_names.astype(str)
    return adata


def read_dataset(row: dict, params: dict) -> ad.AnnData:
    """Read one sheet row into a validated AnnData, whatever its format."""
    from metastem.simulate import simulate_tumour

    fmt, path = row["format"], row["path"]
    try:
        if fmt == "simulated":
            sim = params["simulate"]
            adata = simulate_tumour(sim["n_cells"], sim["n_genes"], seed=params["seed"],
                                    frac_doublets=sim["frac_doublets"], frac_low_quality=sim["frac_low_quality"],
                                    mean_library_size=sim["mean_library_size"])
        else:
            if not os.path.exists(path):
                raise MetastemError("file not found", fix="correct the 'path' column")
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                raise MetastemError("file is empty", fix="re-export or re-download it")
            reader = {"10x_mtx": read_10x_mtx, "10x_h5": read_10x_h5, "h5ad": read_h5ad, "loom": read_loom,
                      "csv": lambda p: read_text_matrix(p, ",", row["orientation"]),
                      "tsv": lambda p: read_text_matrix(p, "\t", row["orientation"])}[fmt]
            adata = reader(path)
        adata = validate_matrix(adata, row["values"])
        check_species(adata, row["species"])
        if row.get("labels") and row["labels"] not in adata.obs.columns:
            raise MetastemError(f"labels column '{row['labels']}' is not in obs (has: {', '.join(map(str, adata.obs.columns[:10])) or 'none'})",
                                fix="name an existing obs column in 'labels' or leave it empty")
    except MetastemError as err:
        raise err.with_context(dataset=row["dataset"], file=path or "(simulated)")
    return adata


def _clear_stale_temps(path: Path) -> None:
    """Temp files a killed job left beside ``path`` (a SIGKILL skips every cleanup)."""
    for stale in path.parent.glob(f".{path.name}.*tmp"):
        try:
            stale.unlink()
        except OSError:
            pass


def read_h5ad_without_X(path: str | os.PathLike) -> ad.AnnData:
    """obs, var, obsm, obsp and uns of an h5ad, without X or layers: for stages that use only the graph."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        parts = {k: read_elem(f[k]) for k in ("obs", "var", "obsm", "obsp", "uns") if k in f}
    return ad.AnnData(**parts)


def attach_counts(adata: ad.AnnData, qc_h5ad: str | os.PathLike) -> None:
    """layers['counts'] from the QC stage's h5ad (raw counts of the same cells and genes), in memory."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(qc_h5ad, "r") as f:
        X = read_elem(f["X"])
        obs_names = read_elem(f["obs"]).index
    if not obs_names.equals(adata.obs_names) or X.shape != adata.shape:
        pos = obs_names.get_indexer(adata.obs_names)
        X = X[pos]
    adata.layers["counts"] = X


def _same_cells_and_genes(adata: ad.AnnData, h5ad: str | os.PathLike) -> bool:
    import h5py
    from anndata.io import read_elem

    with h5py.File(h5ad, "r") as f:
        return (read_elem(f["obs"]).index.equals(adata.obs_names)
                and read_elem(f["var"]).index.equals(adata.var_names))


def write_h5ad_atomic(adata: ad.AnnData, path: str | os.PathLike, *,
                      counts_from: str | os.PathLike | None = None) -> None:
    """Write to a temporary name in the same folder, then rename: no half-written file ever has the real name.

    ``counts_from`` (the QC stage's h5ad: raw counts of the same cells and genes) becomes
    ``layers['counts']``. When its cells and genes are in the same order, its X is copied inside HDF5,
    so the counts never enter memory (in memory they were as large as X again at the final rule's peak).
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_temps(path)
    copy_in_file = counts_from is not None and _same_cells_and_genes(adata, counts_from)
    if counts_from is not None and not copy_in_file:
        attach_counts(adata, counts_from)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        if copy_in_file:
            with h5py.File(counts_from, "r") as src, h5py.File(tmp, "r+") as dst:
                src.copy(src["X"], dst["layers"], name="counts")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """UTF-8 text under a temporary name, then renamed (JSON summaries, HTML pages)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_table_atomic(df: pd.DataFrame, path: str | os.PathLike, **kwargs) -> None:
    """TSV written under a temporary name, then renamed. A '.gz' target is really gzipped (the
    temporary name would otherwise hide the suffix from pandas) and carries no timestamp, so equal
    tables give byte-identical files. Floats are written with full round-trip precision."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_temps(path)
    kwargs.setdefault("lineterminator", "\n")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if path.name.endswith(".gz") and "compression" not in kwargs:
            import gzip

            text = df.to_csv(None, sep="\t", **kwargs).encode()
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                gz.write(text)
        else:
            df.to_csv(tmp, sep="\t", **kwargs)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
