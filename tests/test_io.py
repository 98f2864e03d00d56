"""Readers for every input format, on tiny files written here, and the checks of read_dataset."""
from __future__ import annotations

import gzip
import logging

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from metastem import io
from metastem.errors import MetastemError

N_CELLS, N_GENES = 30, 40


def tiny_counts(seed: int = 0, n_cells: int = N_CELLS, n_genes: int = N_GENES) -> ad.AnnData:
    """Integer counts, human symbols (with MT- genes), ~50% zeros."""
    rng = np.random.default_rng(seed)
    X = rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.float32)
    genes = [f"MT-CO{i}" for i in range(1, 4)] + [f"GENE{i}" for i in range(n_genes - 3)]
    return ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=[f"AAAC{i:04d}-1" for i in range(n_cells)]),
                      var=pd.DataFrame(index=genes))


def row(path, fmt, values="counts", species="human", orientation="", labels="", dataset="ds1", log_base="") -> dict:
    return {"dataset": dataset, "path": str(path), "format": fmt, "orientation": orientation, "species": species,
            "values": values, "log_base": log_base, "labels": labels, "params": ""}


def read(path, fmt, **kw):
    return io.read_dataset(row(path, fmt, **kw), {"seed": 0})


def same_matrix(a: ad.AnnData, ref: ad.AnnData) -> None:
    assert a.n_obs == ref.n_obs and a.n_vars == ref.n_vars
    assert list(a.obs_names) == list(ref.obs_names)
    assert list(a.var_names) == list(ref.var_names)
    assert sp.issparse(a.X) and a.X.format == "csr" and a.X.dtype == np.float32
    np.testing.assert_array_equal(a.X.toarray(), ref.X.toarray())


# ----------------------------------------------------------------------------------------- 10x mtx
def write_10x_mtx(d, adata, *, version=3, gz=True, drop=()):
    from scipy.io import mmwrite

    d.mkdir(parents=True, exist_ok=True)
    op = (lambda p: gzip.open(p, "wt")) if gz else (lambda p: open(p, "w"))
    sfx = ".gz" if gz else ""
    if "matrix.mtx" not in drop:
        mmwrite(str(d / "matrix.mtx"), sp.csr_matrix(adata.X.T).astype(np.int64), field="integer")
        if gz:
            (d / "matrix.mtx.gz").write_bytes(gzip.compress((d / "matrix.mtx").read_bytes()))
            (d / "matrix.mtx").unlink()
    if "barcodes" not in drop:
        with op(d / f"barcodes.tsv{sfx}") as fh:
            fh.write("".join(f"{b}\n" for b in adata.obs_names))
    if "features" not in drop:
        name = "features.tsv" if version == 3 else "genes.tsv"
        with op(d / f"{name}{sfx}") as fh:
            for i, g in enumerate(adata.var_names):
                fh.write(f"ENSG{i:011d}\t{g}" + ("\tGene Expression\n" if version == 3 else "\n"))
    return d


@pytest.mark.parametrize("version, gz", [(3, True), (3, False), (2, False), (2, True)])
def test_10x_mtx(tmp_path, version, gz):
    ref = tiny_counts()
    d = write_10x_mtx(tmp_path / "mtx", ref, version=version, gz=gz)
    a = read(d, "10x_mtx")
    same_matrix(a, ref)
    assert a.var["gene_ids"].iloc[0] == "ENSG00000000000"


def test_10x_mtx_keeps_gene_expression_only(tmp_path):
    ref = tiny_counts()
    d = write_10x_mtx(tmp_path / "mtx", ref)
    lines = gzip.open(d / "features.tsv.gz", "rt").read().splitlines()
    lines[-1] = lines[-1].replace("Gene Expression", "Antibody Capture")
    (d / "features.tsv.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    a = read(d, "10x_mtx")
    assert a.n_vars == ref.n_vars - 1 and ref.var_names[-1] not in a.var_names


@pytest.mark.parametrize("drop, word", [("barcodes", "barcodes.tsv"), ("features", "features.tsv"),
                                        ("matrix.mtx", "matrix.mtx")])
def test_10x_mtx_missing_file(tmp_path, drop, word):
    d = write_10x_mtx(tmp_path / "mtx", tiny_counts(), drop=(drop,))
    with pytest.raises(MetastemError, match=f"missing {word}") as err:
        read(d, "10x_mtx")
    assert "dataset 'ds1'" in str(err.value) and str(d) in str(err.value) and "Fix:" in str(err.value)


def test_10x_mtx_size_disagreement(tmp_path):
    ref = tiny_counts()
    d = write_10x_mtx(tmp_path / "mtx", ref)
    (d / "barcodes.tsv.gz").write_bytes(gzip.compress("".join(f"{b}\n" for b in ref.obs_names[:-2]).encode()))
    with pytest.raises(MetastemError, match="28 barcodes"):
        read(d, "10x_mtx")


# ----------------------------------------------------------------------------------------- 10x h5
def write_10x_h5(path, adata, symbols=True):
    """The Cell Ranger v3 layout: /matrix/{data,indices,indptr,shape,barcodes,features/...} (CSC, genes x cells)."""
    m = sp.csc_matrix(adata.X.T.astype(np.int32))  # genes x cells, CSC = per-cell columns
    ids = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices.astype(np.int64), m.indptr.astype(np.int64)
        g["shape"] = np.array([adata.n_vars, adata.n_obs], dtype=np.int32)
        g["barcodes"] = np.array(list(adata.obs_names), dtype="S")
        fg = g.create_group("features")
        fg["id"] = np.array(ids, dtype="S")
        fg["name"] = np.array(list(adata.var_names) if symbols else ids, dtype="S")
        fg["feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")
        fg["genome"] = np.array(["GRCh38"] * adata.n_vars, dtype="S")
        fg["_all_tag_keys"] = np.array([b"genome"])
    return path


def test_10x_h5(tmp_path):
    ref = tiny_counts()
    a = read(write_10x_h5(tmp_path / "x.h5", ref), "10x_h5")
    same_matrix(a, ref)


def test_10x_h5_ensembl_names_without_symbols_is_an_error(tmp_path):
    ref = tiny_counts()
    with pytest.raises(MetastemError, match="Ensembl IDs and no gene-symbol column") as err:
        read(write_10x_h5(tmp_path / "x.h5", ref, symbols=False), "10x_h5")
    assert "Fix:" in str(err.value)


def test_corrupt_h5_is_one_error(tmp_path):
    p = write_10x_h5(tmp_path / "x.h5", tiny_counts())
    p.write_bytes(p.read_bytes()[:600])
    with pytest.raises(MetastemError, match="not a readable 10x HDF5"):
        read(p, "10x_h5")


# ----------------------------------------------------------------------------------------- h5ad
def test_h5ad_and_dense_x(tmp_path):
    ref = tiny_counts()
    dense = ref.copy()
    dense.X = dense.X.toarray().astype(np.int64)
    dense.obs["cell_type"] = ["a", "b"] * (N_CELLS // 2)
    dense.write_h5ad(tmp_path / "x.h5ad")
    a = read(tmp_path / "x.h5ad", "h5ad", labels="cell_type")
    same_matrix(a, ref)
    assert list(a.obs["cell_type"][:2]) == ["a", "b"]


def test_h5ad_missing_labels_column(tmp_path):
    tiny_counts().write_h5ad(tmp_path / "x.h5ad")
    with pytest.raises(MetastemError, match="labels column 'celltype' is not in obs"):
        read(tmp_path / "x.h5ad", "h5ad", labels="celltype")


def test_truncated_h5ad(tmp_path):
    p = tmp_path / "x.h5ad"
    tiny_counts().write_h5ad(p)
    p.write_bytes(p.read_bytes()[:2000])
    with pytest.raises(MetastemError, match="truncated or corrupt"):
        read(p, "h5ad")


def test_ensembl_var_names_use_the_symbol_column(tmp_path):
    ref = tiny_counts()
    ens = ref.copy()
    ens.var["gene_symbols"] = list(ref.var_names)
    ens.var_names = [f"ENSG{i:011d}.{i % 3}" for i in range(ref.n_vars)]
    ens.write_h5ad(tmp_path / "x.h5ad")
    a = read(tmp_path / "x.h5ad", "h5ad")
    assert list(a.var_names) == list(ref.var_names)
    assert a.var["gene_ids"].iloc[1] == "ENSG00000000001"   # version removed: ids join to gene positions
    assert a.uns["gene_mapping"]["n_versions_stripped"] == N_GENES and a.uns["gene_mapping"]["n_symbols_from_column"] == N_GENES


# ----------------------------------------------------------------------------------------- loom
def write_loom(path, adata):
    """The loom layout (genes x cells in /matrix) with h5py: loompy is not a dependency."""
    with h5py.File(path, "w") as f:
        f["matrix"] = adata.X.T.toarray()
        f.create_group("layers")
        f.create_group("row_attrs")["Gene"] = np.array(list(adata.var_names), dtype="S")
        ca = f.create_group("col_attrs")
        ca["CellID"] = np.array(list(adata.obs_names), dtype="S")
        ca["cluster"] = np.array(["x", "y"] * (adata.n_obs // 2), dtype="S")
        f.create_group("col_graphs"), f.create_group("row_graphs")
        f.attrs["LOOM_SPEC_VERSION"] = "3.0.0"
    return path


def test_loom(tmp_path):
    ref = tiny_counts()
    a = read(write_loom(tmp_path / "x.loom", ref), "loom", labels="cluster")
    same_matrix(a, ref)
    assert a.obs["cluster"].iloc[1] == "y"


def test_loom_without_names(tmp_path):
    p = write_loom(tmp_path / "x.loom", tiny_counts())
    with h5py.File(p, "a") as f:
        del f["row_attrs"]["Gene"]
    with pytest.raises(MetastemError, match="no gene names"):
        read(p, "loom")


# ----------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("sep, fmt, orientation, gz, corner", [
    (",", "csv", "cells_x_genes", False, True),
    (",", "csv", "genes_x_cells", True, True),
    ("\t", "tsv", "genes_x_cells", True, False),    # R write.table: header without the corner cell
    ("\t", "tsv", "cells_x_genes", False, True),
])
def test_text_matrix(tmp_path, sep, fmt, orientation, gz, corner):
    ref = tiny_counts()
    df = ref.to_df().astype(int)
    if orientation == "genes_x_cells":
        df = df.T
    text = df.to_csv(sep=sep)
    if not corner:
        lines = text.splitlines()
        lines[0] = lines[0].split(sep, 1)[1]
        text = "\n".join(lines) + "\n"
    p = tmp_path / f"x.{fmt}{'.gz' if gz else ''}"
    p.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    same_matrix(read(p, fmt, orientation=orientation), ref)


def test_text_header_only(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("gene,c1,c2\n")
    with pytest.raises(MetastemError, match="header but no data") as err:
        read(p, "csv", orientation="genes_x_cells")
    assert "Fix:" in str(err.value)


def test_text_non_numeric(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("gene,c1,c2\nA,1,x\nB,2,3\n")
    with pytest.raises(MetastemError, match="non-numeric"):
        read(p, "csv", orientation="genes_x_cells")


def test_duplicate_barcodes_in_text_header_are_not_renamed(tmp_path):
    """pandas would silently rename a repeated column 'c1' to 'c1.1'; we must see it."""
    df = tiny_counts().to_df().astype(int).T
    cols = list(df.columns)
    cols[1] = cols[0]
    df.columns = cols
    p = tmp_path / "x.csv"
    df.to_csv(p)
    with pytest.raises(MetastemError, match="duplicate cell barcodes"):
        read(p, "csv", orientation="genes_x_cells")


def test_duplicate_gene_symbols_warn_and_are_made_unique(tmp_path, caplog):
    ref = tiny_counts()
    names = list(ref.var_names)
    names[5] = names[4]
    ref.var_names = names
    p = tmp_path / "x.h5ad"
    ref.write_h5ad(p)
    with caplog.at_level(logging.WARNING):
        a = read(p, "h5ad")
    assert a.var_names.is_unique and f"{names[4]}-1" in a.var_names
    assert "duplicate gene symbols made unique" in caplog.text


# ----------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("edit, values, words", [
    (lambda X: X.__setitem__((0, 0), -1), "counts", "negative values"),
    (lambda X: X.__setitem__((0, 0), np.nan), "counts", "NaN or infinite"),
    (lambda X: X.__setitem__((1, 2), np.inf), "log", "NaN or infinite"),
    (lambda X: X.__setitem__((0, 0), 0.5), "counts", "non-integer"),
])
def test_bad_values(tmp_path, edit, values, words):
    a = tiny_counts()
    X = a.X.toarray()
    edit(X)
    a.X = X
    a.write_h5ad(tmp_path / "x.h5ad")
    with pytest.raises(MetastemError, match=words) as err:
        read(tmp_path / "x.h5ad", "h5ad", values=values)
    assert "Fix:" in str(err.value) and "dataset 'ds1'" in str(err.value)


def test_non_integer_values_are_fine_when_declared_normalized(tmp_path):
    a = tiny_counts()
    a.X = a.X * 0.5
    a.write_h5ad(tmp_path / "x.h5ad")
    assert read(tmp_path / "x.h5ad", "h5ad", values="normalized").n_obs == N_CELLS


@pytest.mark.parametrize("shape", [(0, N_GENES), (N_CELLS, 0)])
def test_zero_cells_or_genes(tmp_path, shape):
    a = tiny_counts()[: shape[0], : shape[1]].copy()
    a.write_h5ad(tmp_path / "x.h5ad")
    with pytest.raises(MetastemError, match=f"{shape[0]} cells and {shape[1]} genes"):
        read(tmp_path / "x.h5ad", "h5ad")


def test_species_mismatch(tmp_path):
    a = tiny_counts()
    a.var_names = [f"Gm{i}" if i % 2 else f"Actb{i}" for i in range(N_GENES)]  # mouse-style symbols
    a.write_h5ad(tmp_path / "x.h5ad")
    with pytest.raises(MetastemError, match="declared human but .* look like mouse") as err:
        read(tmp_path / "x.h5ad", "h5ad")
    assert "set species to mouse" in str(err.value)
    assert read(tmp_path / "x.h5ad", "h5ad", species="mouse").n_vars == N_GENES


def test_simulated_row_is_deterministic():
    p = {"seed": 3, "simulate": {"n_cells": 100, "n_genes": 500, "frac_doublets": 0.05,
                                 "frac_low_quality": 0.05, "mean_library_size": 2000}}
    r = {**row("", "simulated"), "path": ""}
    a, b = io.read_dataset(r, p), io.read_dataset(r, p)
    assert (a.X != b.X).nnz == 0 and list(a.obs_names) == list(b.obs_names)


# ----------------------------------------------------------------------------------------- writing
def test_write_table_atomic_gzip_is_real_and_byte_stable(tmp_path):
    df = pd.DataFrame({"a": [1.5, 2.0], "b": ["x", "y"]}, index=["c1", "c2"])
    p = tmp_path / "t.tsv.gz"
    io.write_table_atomic(df, p, index_label="cell")
    first = p.read_bytes()
    assert first[:2] == b"\x1f\x8b"
    assert pd.read_csv(p, sep="\t", index_col=0).equals(df.rename_axis("cell"))
    io.write_table_atomic(df, p, index_label="cell")
    assert p.read_bytes() == first
    assert [q.name for q in tmp_path.iterdir()] == ["t.tsv.gz"]  # no temp files left


def test_write_h5ad_atomic_clears_stale_temps(tmp_path):
    stale = tmp_path / ".x.h5ad.abc123.tmp"
    stale.write_bytes(b"half")
    io.write_h5ad_atomic(tiny_counts(), tmp_path / "x.h5ad")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["x.h5ad"]


# ----------------------------------------------------------------------------------------- real data
def test_real_datasets_read(shared_datasets):
    gin = read(shared_datasets / "ginhoux_dc_progenitors.h5ad", "h5ad", values="log", species="mouse",
               labels="group")
    assert gin.shape == (245, 2000)
    oli = read(shared_datasets / "oligodendroglioma_expression_downsampled.counts.matrix.gz", "tsv",
               values="normalized", orientation="genes_x_cells")
    assert oli.shape == (184, 10338) and oli.obs_names[0] == "MGH54_P16_F12"
    with pytest.raises(MetastemError, match="non-integer"):
        read(shared_datasets / "oligodendroglioma_expression_downsampled.counts.matrix.gz", "tsv",
             values="counts", orientation="genes_x_cells")
    pan = read(shared_datasets / "pancreas_50obs_raw.h5ad", "h5ad", species="mouse")
    assert pan.shape == (50, 27998) and pan.var_names.is_unique


@pytest.mark.parametrize("order", ["same", "shuffled"])
def test_counts_layer_from_the_qc_file(tmp_path, order):
    """layers['counts'] equals the QC file's counts per cell, copied in HDF5 or (other cell order) in memory."""
    counts = tiny_counts()
    io.write_h5ad_atomic(counts, tmp_path / "qc.h5ad")
    final = counts.copy()
    final.X = final.X.multiply(1 / final.X.sum(axis=1)).tocsr().astype(np.float32)  # any other values in X
    if order == "shuffled":
        final = final[np.random.default_rng(1).permutation(final.n_obs)].copy()
    io.write_h5ad_atomic(final, tmp_path / "final.h5ad", counts_from=tmp_path / "qc.h5ad")
    back = ad.read_h5ad(tmp_path / "final.h5ad")
    expected = counts[back.obs_names].X.toarray()
    np.testing.assert_array_equal(back.layers["counts"].toarray(), expected)
    np.testing.assert_allclose(back.X.toarray(), final.X.toarray())
    assert sorted(q.name for q in tmp_path.iterdir()) == ["final.h5ad", "qc.h5ad"]


# ----------------------------------------------------------------------------------------- log base (13.3)
def _log_values(base: str, *, subset: int | None = 300, kind: str = "umi", seed: int = 0, n_cells: int = 60,
                n_genes: int = 400) -> np.ndarray:
    """Cells x genes values as a pipeline would receive them with ``values: log``.

    kind 'umi': Poisson counts, depth-normalised to 1e4, restricted to ``subset`` genes (so per-cell
    totals differ), then log(1 + x); 'tpm': continuous TPM over all genes (totals exactly 1e6); 'smooth':
    continuous values with unequal totals (no count units, no common total)."""
    rng = np.random.default_rng(seed)
    if kind == "umi":
        mu = rng.gamma(0.6, 2.0, size=n_genes)
        depth = rng.uniform(0.5, 2.0, size=(n_cells, 1))
        C = rng.poisson(mu * depth)
        V = C / C.sum(axis=1, keepdims=True) * 1e4
    else:
        V = rng.gamma(0.5, 1.0, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < 0.6)
        V = V / V.sum(axis=1, keepdims=True) * 1e6 if kind == "tpm" else V * rng.uniform(5, 50, (n_cells, 1))
    if subset:
        V = V[:, :subset]
    return (np.log1p(V) / np.log({"e": np.e, "2": 2.0, "10": 10.0}[base])).astype(np.float32), V


def _log_file(tmp_path, X, name="log.h5ad") -> str:
    genes = [f"MT-CO{i}" for i in range(1, 4)] + [f"GENE{i}" for i in range(X.shape[1] - 3)]
    ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])]),
               var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("base", ["e", "2", "10"])
def test_log_base_detected_from_count_units_and_used_to_unlog(tmp_path, base):
    """log(1 + CPM-like) of UMI counts on a gene subset, in each base: found by the count-unit rule; after
    cluster.normalize X is ln(1 + v) whatever the input base, so every expm1 downstream un-logs correctly."""
    from metastem import cluster

    X, V = _log_values(base)
    a = read(_log_file(tmp_path, X), "h5ad", values="log")
    assert a.uns["log1p"].get("base") == io.LOG_BASES[base]
    assert "count units" in a.uns["log_base_rule"] and f"log base {base}" in a.uns["log_base_rule"]
    note = cluster.normalize(a, values="log", target_sum=1e4)
    assert a.uns["log1p"].get("base") is None
    np.testing.assert_allclose(np.expm1(a.X.toarray()), V, rtol=2e-4, atol=1e-3)
    assert ("converted to natural log1p" in note) == (base != "e")


def test_log_base_from_equal_totals_and_from_the_ceiling(tmp_path):
    X, _ = _log_values("2", kind="tpm", subset=None)                        # log2(TPM + 1): totals 1e6 exactly
    a = read(_log_file(tmp_path, X, "tpm.h5ad"), "h5ad", values="log")
    assert a.uns["log1p"]["base"] == 2.0 and "per-cell totals are equal" in a.uns["log_base_rule"]
    X, _ = _log_values("2", kind="tpm", subset=250)                         # a gene subset of it: e gives > 1e6
    found = io.detect_log_base(X)
    assert found["rule"] == "ceiling" and found["base"] == 2.0 and found["plausible"] == ["2"]


def test_ginhoux_is_log2(shared_datasets):
    """The real case of the issue: per-cell sums of e**x - 1 are ~3 M on 2000 genes, of 2**x - 1 ~180 k."""
    from metastem import cluster, stemness

    path = shared_datasets / "ginhoux_dc_progenitors.h5ad"
    a = read(path, "h5ad", values="log", species="mouse", labels="group")
    assert a.uns["log1p"]["base"] == 2.0 and "count units" in a.uns["log_base_rule"]
    raw = ad.read_h5ad(path).X
    raw = raw.toarray() if sp.issparse(raw) else np.asarray(raw)
    cluster.normalize(a, values="log", target_sum=1e4)
    totals = np.expm1(a.X.toarray().astype(np.float64)).sum(axis=1)
    assert 1.5e5 < np.median(totals) < 2.1e5                               # 2**x - 1 of the file, not e**x - 1
    np.testing.assert_allclose(totals, (np.exp2(raw.astype(np.float64)) - 1).sum(axis=1), rtol=1e-4)
    # the stemness census step (expm1 of the pipeline's X) now sees the file's true values
    nd = np.asarray((a.X > 0).sum(axis=1)).ravel()
    census = stemness.census_log(a.X, nd).toarray()
    E = np.exp2(raw.astype(np.float64)) - 1
    expected = np.log2(1 + E * (nd / E.sum(axis=1))[:, None])
    np.testing.assert_allclose(census, expected, rtol=1e-3, atol=1e-4)
    with pytest.raises(MetastemError, match="declared log_base e but the data are log base 2") as err:
        read(path, "h5ad", values="log", species="mouse", log_base="e")
    assert "Fix: set log_base to 2" in str(err.value) and "\n" not in str(err.value)


def test_log_base_that_cannot_be_told_is_refused_in_one_line(tmp_path):
    """Continuous values, unequal totals, all bases under 1e6 per cell: the sheet must say."""
    X, _ = _log_values("e", kind="smooth", subset=None, n_genes=60)
    p = _log_file(tmp_path, X)
    found = io.detect_log_base(X)
    assert found["rule"] == "ambiguous" and found["plausible"] == ["e", "2", "10"]
    with pytest.raises(MetastemError, match="do not tell the log base") as err:
        read(p, "h5ad", values="log")
    msg = str(err.value)
    assert "dataset 'ds1'" in msg and str(p) in msg and "Fix: set the log_base column" in msg and "\n" not in msg
    a = io.read_dataset({**row(p, "h5ad", values="log"), "log_base": "e"}, {"seed": 0})
    assert a.uns["log1p"].get("base") is None and "declared" in a.uns["log_base_rule"]
    # the declaration travels with the file to the cluster stage (qc.h5ad), which does not detect again
    from metastem import cluster

    io.write_h5ad_atomic(a, tmp_path / "qc.h5ad")
    back = ad.read_h5ad(tmp_path / "qc.h5ad")
    assert "log base e (declared" in cluster.normalize(back, values="log", target_sum=1e4)


def test_unlog_helper():
    x = np.array([0.0, 1.0, 3.5], dtype=np.float32)
    assert io.unlog(x, 2.0).dtype == np.float32
    np.testing.assert_allclose(io.unlog(x, 2.0), 2.0 ** x - 1, rtol=1e-6)
    np.testing.assert_allclose(io.unlog(x, None), np.expm1(x), rtol=1e-6)
    m = io.unlog(sp.csr_matrix(x[None, :]), 10.0)
    assert sp.issparse(m) and m.nnz == 2
    np.testing.assert_allclose(m.toarray().ravel(), 10.0 ** x - 1, rtol=1e-5)


# ----------------------------------------------------------------------------------------- orientation (13.5)
def _barcoded(n_cells=30):
    """10x barcodes as cells and real gene symbols as genes."""
    from metastem.genes import gene_positions

    rng = np.random.default_rng(0)
    pos = gene_positions("human")
    symbols = ["MT-CO1", "MT-CO2", "MT-CO3"] + list(pos[pos["biotype"] == "protein_coding"]["symbol"][:37])
    bcs = ["".join(rng.choice(list("ACGT"), 16)) + "-1" for _ in range(n_cells)]
    return ad.AnnData(X=sp.csr_matrix(rng.poisson(1.0, (n_cells, 40)).astype(np.float32)),
                      obs=pd.DataFrame(index=bcs), var=pd.DataFrame(index=symbols))


@pytest.mark.parametrize("written, declared, words", [
    ("cells_x_genes", "genes_x_cells", 'the "genes" look like barcodes'),
    ("genes_x_cells", "cells_x_genes", 'the "genes" look like barcodes'),
])
def test_text_matrix_declared_the_wrong_way_round_is_refused(tmp_path, written, declared, words):
    ref = _barcoded()
    df = ref.to_df().astype(int)
    (df if written == "cells_x_genes" else df.T).to_csv(tmp_path / "x.csv")
    with pytest.raises(MetastemError) as err:
        read(tmp_path / "x.csv", "csv", orientation=declared)
    msg = str(err.value)
    assert words in msg and f"Fix: set orientation to {written}" in msg and "dataset 'ds1'" in msg
    assert "x.csv" in msg and "\n" not in msg
    same_matrix(read(tmp_path / "x.csv", "csv", orientation=written), ref)   # declared right, it reads


def test_transposed_h5ad_is_refused(tmp_path):
    _barcoded().T.write_h5ad(tmp_path / "t.h5ad")
    with pytest.raises(MetastemError, match='"genes" look like barcodes.*Fix: transpose it') as err:
        read(tmp_path / "t.h5ad", "h5ad")
    assert "\n" not in str(err.value)


def test_oligodendroglioma_declared_cells_x_genes_is_refused(shared_datasets):
    with pytest.raises(MetastemError, match='the "cells" look like genes.*Fix: set orientation to genes_x_cells'):
        read(shared_datasets / "oligodendroglioma_expression_downsampled.counts.matrix.gz", "tsv",
             values="normalized", orientation="cells_x_genes")


def test_prefixed_barcodes_and_plain_names():
    assert io.barcode_likeness(["patient1_AAACCTGAGAAACCAT-1", "AAACCTGAGAAACCAT", "s2:TTTGTCATCTTTCCTC-2"]) == 1
    assert io.barcode_likeness(["GENE1", "CD3E", "cell_1", "ACGT"]) == 0


# ----------------------------------------------------------------------------------------- job logs (13.7)
def test_repeated_warnings_are_one_line_each_in_the_job_log(tmp_path, monkeypatch):
    """pandas' PerformanceWarning, raised hundreds of times inside catch_warnings blocks (which reset
    Python's once-per-location registry), is logged once, with a count at the end."""
    import warnings
    from types import SimpleNamespace

    from metastem import smk

    def main(_):
        for i in range(300):
            with warnings.catch_warnings():
                pass
            warnings.warn(f"DataFrame is highly fragmented. Call frame.insert {i} times", pd.errors.PerformanceWarning)
        warnings.warn("something else", UserWarning)

    monkeypatch.setattr(smk, "_set_threads", lambda n: None)
    job = SimpleNamespace(log=[str(tmp_path / "cluster.log")], threads=1, rule="cluster",
                          wildcards=SimpleNamespace(dataset="ds"))
    before = warnings.showwarning
    smk.run(job, main)
    assert warnings.showwarning is before
    text = (tmp_path / "cluster.log").read_text()
    assert text.count("highly fragmented") == 2                         # first occurrence + the summary
    assert "occurred 300 times in all (logged once)" in text and text.count("something else") == 1
    assert len(text.splitlines()) < 15


def test_stage_cells_table_is_joined_or_refused_in_one_line(tmp_path):
    """The one reader of the per-cell tables stages hand each other: every cell and column or a clear line."""
    import anndata as ad

    from metastem.errors import MetastemError
    from metastem.io import add_stage_cells

    adata = ad.AnnData(obs=pd.DataFrame(index=["c1", "c2", "c3"]))
    table = tmp_path / "cells.tsv.gz"
    pd.DataFrame({"stemness": [0.1, 0.9, 0.5, 0.2], "csc_like": [False, True, False, False]},
                 index=pd.Index(["c3", "c2", "c1", "other"], name="cell")).to_csv(table, sep="\t")
    add_stage_cells(adata, table)
    assert adata.obs["stemness"].tolist() == [0.5, 0.9, 0.1]
    with pytest.raises(MetastemError, match="no column 'pseudotime'"):
        add_stage_cells(adata, table, ["pseudotime"])
    short = ad.AnnData(obs=pd.DataFrame(index=["c1", "c9"]))
    with pytest.raises(MetastemError, match="1 cells of the dataset are not in this table.*rerun the stage"):
        add_stage_cells(short, table)
