"""Content of the curated migration/metastasis sets: tumour side vs niche side, signed arms, provenance,
the themes the review's model needs, and the mouse file generated from the human one."""
from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from metastem.genesets import read_gmt

GENE_SETS = "src/metastem/data/gene_sets"
# Made by niche cells (stroma, endothelium, leukocytes), never by the tumour cell in the review's model, or
# markers of a non-malignant lineage: they must not sit in a tumour-side receptor or readout set.
NICHE_ONLY = {"CXCL12", "CCL19", "CCL21", "HGF", "KITLG", "S100A8", "S100A9", "ITGAM", "SELE", "SELP",
              "TCF7", "LEF1", "ANGPT1", "PTH1R", "ELANE", "CTSG", "JAG1", "DLL1", "DLL4", "SHH", "IHH"}
# The review's pathway axes: target genes (activity) that a tumour-side set must read out.
READOUTS = {"WNT_BETACATENIN": {"AXIN2", "NKD1", "NOTUM", "SP5", "LGR5"},
            "NOTCH": {"HES1", "HEY1", "HEYL", "NRARP"},
            "HEDGEHOG": {"GLI1", "PTCH1", "HHIP"},
            "BMP_TARGETS": {"ID1", "ID2", "ID3", "SMAD6", "SMAD7"},
            "TGFB_TARGETS": {"SERPINE1", "SKIL", "SMAD7"}}
# Themes of the review that were missing or thin before: every gene must be in some set.
THEMES = {"CD44-hyaluronan": {"CD44", "HAS1", "HAS2", "HAS3", "HMMR"}, "KIT/KITLG": {"KIT", "KITLG"},
          "osteopontin": {"SPP1"}, "ID": {"ID1", "ID3"}, "VEGFR": {"FLT1", "KDR"}, "S100A8/A9": {"S100A8", "S100A9"},
          "LOX family": {"LOX", "LOXL1", "LOXL2", "LOXL3", "LOXL4"}, "ABC transporters": {"ABCG2", "ABCB1", "ABCC1"},
          "CXCL12/CXCR4": {"CXCL12", "CXCR4"}, "HGF/MET": {"HGF", "MET"}}


@pytest.fixture(scope="module")
def human(repo):
    return read_gmt(repo / GENE_SETS / "metastasis_human.gmt")


@pytest.fixture(scope="module")
def prov(repo):
    return pd.read_csv(repo / GENE_SETS / "metastasis_provenance.tsv", sep="\t", comment="#").set_index("set")


def test_every_set_has_its_provenance_and_evidence_tag(human, prov):
    assert list(prov.index) == list(human)
    assert set(prov["side"]) == {"tumour", "niche"}
    assert set(prov["evidence"]) <= {"V", "M", "V+M"} and set(prov["review_link_verified"]) == {"no"}
    named = prov[prov["primary_papers"] != "no single primary paper chosen (pathway ligand list)"]
    assert named["primary_papers"].str.contains(r"\d{4};\d+").all()   # journal year;volume
    assert named["doi"].str.split("; ").apply(lambda ds: all(d.startswith("10.") for d in ds)).all()
    # a recalled DOI is never presented as checked, and a verified finding has a source in NOTES.md
    assert not prov.loc[prov["evidence"] == "M", "doi_checked"].str.startswith("yes").any()
    assert prov.loc[prov["evidence"] != "M", "primary_papers"].str.contains("Kaplan|Lapidot|Muller|Erler|Hiratsuka|Kang Y et al. Cancer Cell 2003").all()
    # Erler 2006 (LOX) was retracted in 2020: every set citing it says so
    erler = prov[prov["primary_papers"].str.contains("Erler JT et al. Nature 2006")]
    assert len(erler) and erler["notes"].str.contains("RETRACTED on 18 March 2020").all()


def test_niche_sets_are_named_as_such_and_tumour_sets_hold_no_niche_ligand(human, prov):
    assert {s for s in human if s.endswith("_NICHE")} == set(prov.index[prov["side"] == "niche"])
    tumour = prov.index[(prov["side"] == "tumour")
                        & ~prov["notes"].str.contains("published tumour-cell programme")]
    for s in tumour:
        assert not NICHE_ONLY & set(human[s]), (s, NICHE_ONLY & set(human[s]))
    # ligands and niche-cell receptors, not readouts; one documented exception: Id3 of the VEGFR1+ bone-marrow
    # progenitors (Kaplan 2005 needs Id3 in the recruited cells, not in the tumour)
    for s in prov.index[prov["side"] == "niche"]:
        allowed = {"ID3"} if s == "PREMETASTATIC_VEGFR1_NICHE" else set()
        assert not (set().union(*READOUTS.values()) & set(human[s])) - allowed, s
    for s, genes in READOUTS.items():
        assert genes <= set(human[s]) and prov.loc[s, "kind"] == "target-gene readout", s


def test_signed_sets_pair_up_and_do_not_overlap(human, prov):
    down = [s for s in human if s.endswith("_DN")]
    assert down == ["EMT_CORE_DN"]
    for s in down:
        up = s[:-3]
        assert up in human and prov.loc[s, "sign"] == f"down arm of {up}" and prov.loc[up, "sign"].startswith("up")
        assert not set(human[up]) & set(human[s])
    assert {"CDH1", "CLDN4", "OCLN"} <= set(human["EMT_CORE_DN"]) and {"SNAI1", "VIM"} <= set(human["EMT_CORE"])


def test_the_review_themes_are_covered_and_tumour_sets_are_scoreable(human, prov):
    genes = set().union(*human.values())
    for theme, members in THEMES.items():
        assert members <= genes, (theme, members - genes)
    for s in prov.index[prov["side"] == "tumour"]:
        assert len(human[s]) >= 4, s   # at least 3 found after losing one gene to coverage


def test_every_gene_is_a_current_hgnc_symbol_with_a_mouse_ortholog(repo, human):
    """The ortholog table is HCOP (HGNC) subset to the GMT: a gene absent from it is a typo or an old name."""
    orth = pd.read_csv(repo / GENE_SETS / "orthologs_human_mouse.tsv", sep="\t", comment="#", dtype=str)
    kept = orth[orth["used"].str.lower() == "true"]
    genes = set().union(*human.values())
    assert genes <= set(kept["human_symbol"]), genes - set(kept["human_symbol"])
    assert kept.set_index("human_symbol").loc["KITLG", "mouse_symbol"] == "Kitl"


def test_mouse_gmt_is_regenerated_from_the_human_one(repo, human):
    spec = importlib.util.spec_from_file_location("build_mouse_sets", repo / GENE_SETS / "build_mouse_sets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = pd.read_csv(mod.ORTHOLOGS, sep="\t", comment="#", dtype=str)
    built = {n: g for n, _, g in mod.mouse_sets(mod.read_gmt_lines(mod.HUMAN_GMT), table)}
    mouse = read_gmt(repo / GENE_SETS / "metastasis_mouse.gmt")
    assert built == mouse and list(mouse) == list(human)
    assert {"Kitl", "Ccl21a", "S100a8", "Car9", "Abcb1a", "Abcb1b"} <= set().union(*mouse.values())
