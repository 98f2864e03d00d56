"""The niche as cell-cell signalling: ligand-receptor interactions between CSC-like cells and every other group.

Why this exists: the review this pipeline follows (Li, Tiede, Massague & Kang, Cell Res 2007) models
metastasis as a conversation between cancer stem cells and their niche (CXCL12->CXCR4, HGF->MET,
KITLG->KIT, SPP1/hyaluronan->CD44, VEGF-A->VEGFR1, the S100A8/A9 pre-metastatic niche, Notch, Wnt,
Hedgehog, BMP/TGF-beta). The ligand usually sits in one cell type and the receptor in another, so a
per-cell gene-set score of a mixed ligand+receptor list cannot show it. Here each sender/receiver pair of
cell groups is scored with LIANA+ (Dimitrov et al., Nat Cell Biol 2024): its rank aggregate of
CellPhoneDB, Connectome, log2FC, NATMI and SingleCellSignalR, with the CellPhoneDB label permutation
giving a p-value.

Offline by construction: the resource is LIANA's consensus table read from the CSV inside the installed
wheel (``liana/resource/omni_resource.csv``) and handed to LIANA as a DataFrame, so no LIANA code path
that could download (ortholog translation, metalinks) is reached.

Cost does not grow with the dataset: each group is subsampled to ``max_cells_per_group`` cells (seeded)
and the matrix is restricted to the resource's genes detected in at least ``expr_prop`` of some group's
cells before LIANA sees it (a gene below that everywhere can pass none of LIANA's filters). Group means and detection
rates from a few hundred cells are precise enough to rank interactions; the permutation cost of LIANA
is linear in the cells it permutes.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from importlib import resources as _resources
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from metastem._keys import Obs, Uns
from metastem.errors import MetastemError
from metastem.multitest import bh_adjust

log = logging.getLogger(__name__)

CSC_GROUP = "CSC-like"
MALIGNANT_GROUP = "other malignant"
REPLICATION_COLUMNS = ["n_samples_tested", "n_samples_present", "replication"]
COLUMNS = ["sender", "receiver", "ligand", "receptor", "magnitude", "specificity", "p", "q", "lr_mean",
           "ligand_mean", "ligand_prop", "receptor_mean", "receptor_prop", "review_axis", "rank",
           *REPLICATION_COLUMNS]
BY_SAMPLE_COLUMNS = ["sample", "sender", "receiver", "ligand", "receptor", "magnitude", "specificity", "p", "present"]
MIN_REPLICATION_SAMPLES = 3   # as the pathway stage: 'replicated' needs at least this many samples tested ...
MIN_PRESENT_FRACTION = 0.8    # ... with the interaction present (p < alpha in that sample) in this share of them

# The review's axes: (ligands, receptors). A name ending in '*' is a family prefix. An interaction belongs
# to an axis when one ligand subunit and one receptor subunit match (complexes are written A_B by LIANA).
REVIEW_AXES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "CXCL12->CXCR4": (("CXCL12",), ("CXCR4", "ACKR3")),
    "CCL19/21->CCR7": (("CCL19", "CCL21"), ("CCR7",)),
    "HGF->MET": (("HGF",), ("MET",)),
    "KITLG->KIT": (("KITLG",), ("KIT",)),
    "SPP1/HA->CD44": (("SPP1", "HAS1", "HAS2", "HAS3"), ("CD44", "HMMR")),
    "VEGFA/PGF->FLT1/KDR": (("VEGFA", "VEGFB", "PGF"), ("FLT1", "KDR")),
    "S100A8/A9->TLR4/AGER": (("S100A8", "S100A9"), ("TLR4", "AGER")),
    "VCAM1/FN1->VLA-4": (("VCAM1", "FN1"), ("ITGA4",)),
    "ANGPT1->TEK": (("ANGPT1",), ("TEK",)),
    "Notch": (("JAG1", "JAG2", "DLL1", "DLL3", "DLL4"), ("NOTCH1", "NOTCH2", "NOTCH3", "NOTCH4")),
    "Wnt": (("WNT*", "RSPO*"), ("FZD*", "LRP5", "LRP6", "LGR4", "LGR5", "LGR6")),
    "Hedgehog": (("SHH", "IHH", "DHH"), ("PTCH1", "PTCH2", "SMO", "HHIP", "CDON", "BOC")),
    "BMP": (("BMP2", "BMP4", "BMP6", "BMP7"), ("BMPR1A", "BMPR1B", "BMPR2", "ACVR1", "ACVR2A", "ACVR2B")),
    "TGF-beta": (("TGFB1", "TGFB2", "TGFB3"), ("TGFBR1", "TGFBR2", "TGFBR3")),
}
_LIANA_RESOURCE = {"human": "consensus", "mouse": "mouseconsensus"}


# ----------------------------------------------------------------------------- resource and axes

def load_resource(resource: str = "liana_consensus", species: str = "human") -> pd.DataFrame:
    """Ligand-receptor pairs (columns ``ligand``, ``receptor``; complexes as ``A_B``), read offline.

    ``"liana_consensus"`` is LIANA's consensus resource for the species (human, or its mouse translation
    ``mouseconsensus``), read from the CSV shipped in the liana wheel; any other value is a path to a
    tab-separated file with columns ligand and receptor (your own curated pairs).
    """
    if resource == "liana_consensus":
        if species not in _LIANA_RESOURCE:
            raise MetastemError(f"no LIANA consensus resource for species '{species}'",
                                fix="use species human or mouse, or give niche.resource a TSV of ligand/receptor pairs")
        path = _resources.files("liana") / "resource" / "omni_resource.csv"
        tab = pd.read_csv(str(path), index_col=0)
        tab = tab[tab["resource"] == _LIANA_RESOURCE[species]]
        tab = tab.rename(columns={"source_genesymbol": "ligand", "target_genesymbol": "receptor"})
    else:
        if not os.path.isfile(resource):
            raise MetastemError("ligand-receptor resource not found", file=resource,
                                fix="set niche.resource to liana_consensus or to a TSV with columns ligand, receptor")
        tab = pd.read_csv(resource, sep="\t", comment="#", dtype=str)
        if not {"ligand", "receptor"} <= set(tab.columns):
            raise MetastemError("ligand-receptor resource lacks columns ligand and receptor", file=resource,
                                fix="write a tab-separated file with a header line 'ligand<TAB>receptor'")
    tab = tab[["ligand", "receptor"]].dropna().drop_duplicates().reset_index(drop=True)
    if tab.empty:
        raise MetastemError("ligand-receptor resource holds no pairs", file=None if resource == "liana_consensus"
                            else resource, fix="give at least one ligand/receptor pair")
    return tab


def _axis_names(species: str) -> dict[str, tuple[set[str], set[str]]]:
    """The axes with gene names upper-cased; for mouse also the HCOP orthologs shipped with the gene sets
    (Kitl for KITLG, Ccl21a/b/d for CCL21), so that both species match case-insensitively."""
    orth: dict[str, list[str]] = {}
    if species == "mouse":
        path = _resources.files("metastem") / "data" / "gene_sets" / "orthologs_human_mouse.tsv"
        tab = pd.read_csv(str(path), sep="\t", comment="#", dtype=str)
        tab = tab[tab["used"].str.lower() == "true"]
        orth = tab.groupby("human_symbol")["mouse_symbol"].apply(lambda s: [m.upper() for m in s]).to_dict()
    out = {}
    for axis, (lig, rec) in REVIEW_AXES.items():
        out[axis] = tuple({n for g in side for n in [g, *orth.get(g, [])]} for side in (lig, rec))
    return out


def _matches(subunits: Sequence[str], names: set[str]) -> bool:
    for s in subunits:
        s = s.upper()
        if s in names or any(n.endswith("*") and s.startswith(n[:-1]) for n in names):
            return True
    return False


def review_axis(ligand: str, receptor: str, species: str = "human") -> str:
    """The review axis an interaction belongs to ('' when none); complexes are split on '_'."""
    for axis, (lig, rec) in _axis_names(species).items():
        if _matches(ligand.split("_"), lig) and _matches(receptor.split("_"), rec):
            return axis
    return ""


# ----------------------------------------------------------------------------- groups

def niche_groups(adata: ad.AnnData, *, groupby: str = Obs.LEIDEN, csc_key: str = Obs.CSC_LIKE,
                 malignant_key: str = Obs.MALIGNANT) -> tuple[pd.Series, list[str], bool]:
    """Cell group of every cell: CSC-like malignant cells, other malignant cells, and each non-malignant
    ``groupby`` group. Returns (labels, notes, whether a CSC-like group exists).

    Falls back, with a note, to ``groupby`` groups for all non-CSC cells when malignancy is unknown
    (no ``malignant_key``, or every cell malignant with evidence 'none': no normal reference), and to
    ``groupby`` groups alone when there is no CSC-like call.
    """
    obs = adata.obs
    if groupby not in obs:
        raise MetastemError(f"obs has no column '{groupby}' to group the niche cells by",
                            fix="run clustering first or set niche.groupby to an obs column of cell types")
    notes: list[str] = []
    base = obs[groupby].astype(str)
    if base.str.fullmatch(r"\d+").all():
        base = f"{groupby} " + base
    if malignant_key in obs:
        malignant = obs[malignant_key].astype(bool).to_numpy()
        evidence = obs.get(Obs.MALIGNANT_EVIDENCE)
        unknown = malignant.all() and evidence is not None and (evidence.astype(str) == "none").all()
    else:
        malignant, unknown = np.zeros(adata.n_obs, bool), True
    if unknown:
        notes.append(f"Malignant cells were not identified (no '{malignant_key}' call against a normal reference), "
                     f"so every non-CSC cell is grouped by '{groupby}'; groups may mix malignant and normal cells.")
    csc = obs[csc_key].astype(bool).to_numpy() if csc_key in obs else np.zeros(adata.n_obs, bool)
    if not unknown:
        if (csc & ~malignant).any():
            notes.append(f"{int((csc & ~malignant).sum())} CSC-like cells are not malignant; they were grouped "
                         f"with their '{groupby}' group, not as CSC-like.")
            csc = csc & malignant
        if malignant.all():
            notes.append("Every cell is malignant: there is no non-malignant niche in this dataset, so only "
                         "CSC-like vs other malignant cells are compared.")
    labels = np.where(csc, CSC_GROUP, np.where(malignant & ~unknown, MALIGNANT_GROUP, base.to_numpy()))
    has_csc = bool(csc.any())
    if not has_csc:
        notes.append(f"No CSC-like cells ('{csc_key}' absent or all False): interactions between all "
                     f"'{groupby}' groups are reported, without a CSC-like focus.")
        labels = np.where(malignant & ~unknown, MALIGNANT_GROUP, base.to_numpy())
    return pd.Series(labels, index=obs.index, name="niche_group"), notes, has_csc


def _subsample(labels: pd.Series, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices with at most ``max_cells`` cells of each group (all cells of smaller groups)."""
    codes = labels.to_numpy()
    keep = [rng.permutation(np.flatnonzero(codes == g))[:max_cells] for g in pd.unique(codes)]
    return np.sort(np.concatenate(keep))


def _group_stats(X: sp.spmatrix | np.ndarray, labels: np.ndarray, groups: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and fraction of cells with a value > 0, per group (rows) and gene (columns)."""
    onehot = sp.csr_matrix((np.ones(labels.size), (np.searchsorted(groups, labels), np.arange(labels.size))),
                           shape=(len(groups), labels.size))
    n = np.asarray(onehot.sum(axis=1)).ravel()[:, None]
    Xs = sp.csr_matrix(X)
    mean = np.asarray((onehot @ Xs).todense()) / n
    det = Xs.copy()
    det.data = (det.data > 0).astype(np.float64)
    return mean, np.asarray((onehot @ det).todense()) / n


def _complex_stat(stat: np.ndarray, gene_pos: Mapping[str, int], names: pd.Series) -> np.ndarray:
    """A complex's statistic per group = its weakest subunit's (as LIANA and CellPhoneDB do)."""
    out = np.full((stat.shape[0], len(names)), np.nan)
    for j, name in enumerate(names):
        idx = [gene_pos[s] for s in name.split("_") if s in gene_pos]
        if idx:
            out[:, j] = stat[:, idx].min(axis=1)
    return out


# ----------------------------------------------------------------------------- the analysis

def niche_interactions(adata: ad.AnnData, *, groupby: str = Obs.LEIDEN, csc_key: str = Obs.CSC_LIKE,
                       malignant_key: str = Obs.MALIGNANT, resource: str = "liana_consensus",
                       species: str = "human", n_perms: int = 1000, expr_prop: float = 0.1, min_cells: int = 10,
                       max_cells_per_group: int = 300, alpha: float = 0.05, per_sample: bool = True,
                       sample_key: str = Obs.SAMPLE, layer: str | None = None, seed: int = 0, n_jobs: int = 1,
                       key_added: str = Uns.NICHE, copy: bool = False) -> ad.AnnData | None:
    """Ligand-receptor interactions between CSC-like malignant cells and every other cell group (LIANA+).

    Cells are grouped by :func:`niche_groups`: CSC-like malignant cells, the other malignant cells, and
    each non-malignant ``groupby`` group. Every group pair with CSC-like cells as sender or receiver
    (autocrine included) is scored with LIANA's rank aggregate, offline (see the module docstring).

    Parameters
    ----------
    adata
        Log-normalised expression in ``X`` (or ``layer``); obs ``groupby`` and, when present,
        ``malignant_key`` (bool), ``malignant_evidence`` and ``csc_key`` (bool).
    groupby
        obs column that groups the non-malignant cells (clusters or known cell types).
    csc_key, malignant_key
        obs columns of the CSC-like call and of the malignant call.
    resource
        ``"liana_consensus"`` (LIANA's consensus of 16 resources, shipped in the wheel) or a TSV path with
        columns ligand, receptor.
    species
        ``"human"`` or ``"mouse"``: which LIANA consensus table, and how the review's axes are matched.
    n_perms
        Label permutations of the CellPhoneDB test (p-values resolve to 1 / (n_perms + 1)).
    expr_prop
        Minimum fraction of a group's cells expressing every ligand/receptor subunit (LIANA).
    min_cells
        Groups with fewer cells are left out (listed in the notes).
    max_cells_per_group
        Cells kept per group (seeded subsample), so that the cost is bounded whatever the dataset size.
    alpha
        Interactions with p below this rank first (then by magnitude): the CellPhoneDB convention. In the
        per-sample replication an interaction is *present* in a sample when its p there is below alpha.
    per_sample
        Also score each sample on its own (the sample, not the cell, is the unit of replication): the same
        groups within the sample, groups with fewer than ``min_cells`` cells of that sample skipped (noted),
        a sample with too few CSC-like cells not tested. Cost: one LIANA run per sample, each on at most
        ``max_cells_per_group`` cells per group.
    sample_key
        obs column of samples; absent: the cells are one sample and the pooled run is its run.
    layer
        Layer of log-normalised values to use instead of ``X``.
    seed
        Seed of the subsample and of the permutations.
    n_jobs
        Parallel jobs of LIANA's permutations.
    key_added
        ``adata.uns`` key written.
    copy
        Return an annotated copy instead of writing into ``adata``.

    Returns
    -------
    The annotated copy when ``copy``, else None. Writes:

    - ``adata.obs[f"{key_added}_group"]``: each cell's group (categorical; NaN for groups left out).
    - ``adata.uns[key_added]``: ``interactions``, a tidy DataFrame, one row per (sender, receiver, ligand,
      receptor), best first, with ``magnitude`` (LIANA magnitude rank aggregate, 0-1, *smaller* = stronger
      expression), ``specificity`` (specificity rank aggregate, 0-1, smaller = more specific to the pair of
      groups), ``p`` (CellPhoneDB permutation p of the pair's mean expression, as (b + 1) / (n_perms + 1):
      never 0), ``q`` (BH over the table),
      ``lr_mean`` (mean of ligand and receptor means), per-group ligand/receptor means and detected
      fractions, ``review_axis`` ('' when none), ``rank``, and the per-sample summary ``n_samples_tested``
      (samples in which both groups have ``min_cells`` cells), ``n_samples_present`` (of those, samples where the
      interaction has p < alpha) and ``replication`` ('replicated (k of n samples)' with >= 3 samples tested and
      present in >= 80 %, 'not replicated (k of n samples)', or 'descriptive (n = k samples)' with fewer, as the
      pathway stage labels its results); ``by_sample``: one row per tested (sample, interaction) with that
      sample's ``magnitude``, ``specificity``, ``p`` (NaN when the pair did not pass expr_prop there) and
      ``present``; ``groups`` (cells per group, cells used); ``params_json`` and ``notes_json`` (JSON text:
      h5ad holds no None).

    Notes
    -----
    Cells are not independent samples: the p-value is a label permutation within one dataset and says
    that the ligand and receptor are specific to this pair of groups, not that they communicate, nor that
    the result replicates across tumours (the per-sample columns say whether it does). Expression of a pair
    is necessary, not sufficient, for signalling.
    """
    if copy:
        adata = adata.copy()
    import liana as li

    if n_perms < 1 or max_cells_per_group < min_cells or not 0 < alpha < 1:
        raise MetastemError("niche parameters out of range",
                            fix="use n_perms >= 1, max_cells_per_group >= min_cells and 0 < alpha < 1")
    labels, notes, has_csc = niche_groups(adata, groupby=groupby, csc_key=csc_key, malignant_key=malignant_key)
    sizes = labels.value_counts()
    small = sorted(sizes.index[sizes < min_cells])
    if small:
        notes.append(f"{len(small)} group(s) with fewer than {min_cells} cells left out: {', '.join(small)}.")
    used = labels.where(~labels.isin(small))
    adata.obs[f"{key_added}_group"] = pd.Categorical(used)  # Obs.NICHE_GROUP by default
    params = {"groupby": groupby, "csc_key": csc_key, "malignant_key": malignant_key, "resource": resource,
              "species": species, "n_perms": n_perms, "expr_prop": expr_prop, "min_cells": min_cells,
              "max_cells_per_group": max_cells_per_group, "alpha": alpha, "layer": layer or "X", "seed": seed,
              "per_sample": per_sample, "sample_key": sample_key,
              "method": f"liana.mt.rank_aggregate (liana {li.__version__})"}
    groups = sorted(used.dropna().unique())
    res = load_resource(resource, species) if len(groups) >= 2 else None
    table, n_used, run_notes = _score_groups(li, adata, used, groups, has_csc, res, species=species, layer=layer,
                                             n_perms=n_perms, expr_prop=expr_prop, min_cells=min_cells,
                                             max_cells_per_group=max_cells_per_group, alpha=alpha, seed=seed,
                                             n_jobs=n_jobs)
    n_used = n_used.reindex(sizes.index, fill_value=0)
    notes += run_notes
    by_sample = pd.DataFrame(columns=BY_SAMPLE_COLUMNS)
    if per_sample and len(table):
        by_sample, sample_notes = _score_per_sample(li, adata, labels, table, has_csc, res, sample_key=sample_key,
                                                    species=species, layer=layer, n_perms=n_perms,
                                                    expr_prop=expr_prop, min_cells=min_cells,
                                                    max_cells_per_group=max_cells_per_group, alpha=alpha,
                                                    seed=seed, n_jobs=n_jobs)
        notes += sample_notes
    table = _add_replication(table, by_sample)
    n_axis = int((table["review_axis"] != "").sum()) if len(table) else 0
    notes.append(f"{len(table)} interactions scored over {len(groups)} groups; {n_axis} on the review's axes.")
    group_tab = pd.DataFrame({"group": sizes.index.astype(str), "n_cells": sizes.to_numpy(),
                              "n_used": n_used.reindex(sizes.index).fillna(0).astype(int).to_numpy(),
                              "kind": [_kind(g) for g in sizes.index]})
    adata.uns[key_added] = {"interactions": table.reset_index(drop=True), "groups": group_tab,
                            "by_sample": by_sample.reset_index(drop=True),
                            "params_json": json.dumps(params), "notes_json": json.dumps(notes)}
    return adata if copy else None


def _score_groups(li, adata: ad.AnnData, used: pd.Series, groups: list[str], has_csc: bool, res: pd.DataFrame | None,
                  *, species: str, layer: str | None, n_perms: int, expr_prop: float, min_cells: int,
                  max_cells_per_group: int, alpha: float, seed: int,
                  n_jobs: int) -> tuple[pd.DataFrame, pd.Series, list[str]]:
    """LIANA's rank aggregate over the cells whose ``used`` label is not NaN (``groups`` their labels): the tidy
    table, the cells used per group and notes. With ``has_csc`` only pairs with CSC-like cells are scored."""
    notes: list[str] = []
    table = pd.DataFrame(columns=COLUMNS)
    n_used = pd.Series(0, index=pd.Index(groups, dtype=object), dtype=int)
    if has_csc and CSC_GROUP not in groups:
        n_csc = int((used.astype(object) == CSC_GROUP).sum())
        notes.append(f"Only {n_csc} CSC-like cells (fewer than min_cells={min_cells}): no interactions scored.")
        return table, n_used, notes
    if len(groups) < 2:
        notes.append("Fewer than two cell groups with enough cells: no interactions scored.")
        return table, n_used, notes
    rng = np.random.default_rng(seed)
    rows = _subsample(used.dropna(), max_cells_per_group, rng)
    rows = np.flatnonzero(used.notna().to_numpy())[rows]
    genes = {s for col in ("ligand", "receptor") for c in res[col] for s in c.split("_")}
    var_keep = np.flatnonzero(adata.var_names.isin(list(genes)))
    X = adata.layers[layer] if layer else adata.X
    sub = ad.AnnData(X=X[rows][:, var_keep], obs=pd.DataFrame({"@niche": pd.Categorical(used.iloc[rows])},
                                                                index=adata.obs_names[rows]),
                     var=pd.DataFrame(index=adata.var_names[var_keep]))
    if sp.issparse(sub.X):
        sub.X = sp.csr_matrix(sub.X, dtype=np.float32)
    # Genes detected in fewer than expr_prop of the cells of every group can pass no LIANA filter: dropping
    # them changes no score but SingleCellSignalR's matrix-mean normaliser, and LIANA's index look-ups
    # cost (interactions x genes)
    _, det = _group_stats(sub.X, sub.obs["@niche"].astype(str).to_numpy(), groups)
    sub = sub[:, det.max(axis=0) >= expr_prop].copy()
    n_used = sub.obs["@niche"].value_counts()
    pairs = None
    if has_csc:
        others = [g for g in groups if g != CSC_GROUP]
        pairs = pd.DataFrame([(g, CSC_GROUP) for g in others] + [(CSC_GROUP, g) for g in others]
                             + [(CSC_GROUP, CSC_GROUP)], columns=["source", "target"])
    try:
        out = li.mt.rank_aggregate(sub, groupby="@niche", resource=res, expr_prop=expr_prop, min_cells=min_cells,
                                   groupby_pairs=pairs, use_raw=False, n_perms=n_perms, seed=seed,
                                   n_jobs=n_jobs, inplace=False, verbose=False)
    except ValueError as exc:  # LIANA refuses data with no resource gene expressed enough
        notes.append(f"LIANA found no interaction to score ({exc}).")
        out = None
    if out is not None and len(out):
        table = _tidy(out, sub, groups, species, alpha, n_perms)
    elif out is not None:
        notes.append("No ligand-receptor pair passed expr_prop in any scored pair of groups.")
    return table, n_used, notes


def _score_per_sample(li, adata: ad.AnnData, labels: pd.Series, table: pd.DataFrame, has_csc: bool,
                      res: pd.DataFrame, *, sample_key: str, min_cells: int, alpha: float,
                      **kw) -> tuple[pd.DataFrame, list[str]]:
    """The same scoring within each sample: one row per (sample, interaction of ``table``) whose two groups
    both have at least ``min_cells`` cells in that sample; ``present`` = scored there (every subunit in at
    least expr_prop of both groups' cells) with p < alpha in that sample."""
    notes: list[str] = []
    key = ["sender", "receiver", "ligand", "receptor"]
    if sample_key not in adata.obs:
        notes.append(f"No obs['{sample_key}']: the cells are one sample, so the per-sample replication is the "
                     "pooled result (descriptive, n = 1 sample).")
        samples = pd.Series("all cells", index=adata.obs_names)
    else:
        samples = adata.obs[sample_key].astype(str)
    names = sorted(pd.unique(samples))
    parts = []
    for name in names:
        here = (samples == name).to_numpy()
        lab = labels.where(here)
        sizes = lab.value_counts()
        small = sorted(sizes.index[sizes < min_cells])
        if CSC_GROUP in small or (has_csc and CSC_GROUP not in sizes.index):
            notes.append(f"Sample {name}: {int(sizes.get(CSC_GROUP, 0))} CSC-like cells (fewer than "
                         f"min_cells={min_cells}): not tested.")
            continue
        if small:
            notes.append(f"Sample {name}: {len(small)} group(s) with fewer than {min_cells} cells skipped: "
                         f"{', '.join(small)}.")
        lab = lab.where(~lab.isin(small))
        groups = sorted(lab.dropna().unique())
        if len(names) == 1 and sample_key in adata.obs or sample_key not in adata.obs:
            t = table  # one sample: the pooled run is that sample's run
        else:
            t, _, run_notes = _score_groups(li, adata, lab, groups, has_csc, res, min_cells=min_cells, alpha=alpha,
                                            **kw)
            notes += [f"Sample {name}: {n}" for n in run_notes]
        tested = table[key][table["sender"].isin(groups) & table["receiver"].isin(groups)]
        got = t[key + ["magnitude", "specificity", "p"]] if len(t) else pd.DataFrame(
            columns=key + ["magnitude", "specificity", "p"])
        rows = tested.merge(got, on=key, how="left")
        rows.insert(0, "sample", name)
        rows["present"] = rows["p"].astype(float) < alpha
        parts.append(rows)
    by = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=BY_SAMPLE_COLUMNS)
    by["present"] = by["present"].astype(bool)
    return by[BY_SAMPLE_COLUMNS], notes


def replication_label(n_present: int, n_tested: int) -> str:
    """'replicated (k of n samples)' with at least MIN_REPLICATION_SAMPLES samples tested and the interaction
    present in at least MIN_PRESENT_FRACTION of them; 'not replicated (k of n samples)' otherwise; with fewer
    samples tested 'descriptive (n = k samples)' (the pathway stage's rule)."""
    if n_tested < MIN_REPLICATION_SAMPLES:
        return f"descriptive (n = {n_tested} sample{'s' if n_tested != 1 else ''})"
    word = "replicated" if n_present >= MIN_PRESENT_FRACTION * n_tested else "not replicated"
    return f"{word} ({n_present} of {n_tested} samples)"


def _add_replication(table: pd.DataFrame, by_sample: pd.DataFrame) -> pd.DataFrame:
    """The per-sample summary columns of the interaction table (COLUMNS order)."""
    key = ["sender", "receiver", "ligand", "receptor"]
    t = table.drop(columns=[c for c in REPLICATION_COLUMNS if c in table.columns])
    if len(by_sample):
        agg = by_sample.groupby(key, sort=False).agg(n_samples_tested=("sample", "size"),
                                                     n_samples_present=("present", "sum")).reset_index()
        t = t.merge(agg, on=key, how="left")
    else:
        t = t.assign(n_samples_tested=0, n_samples_present=0)
    t["n_samples_tested"] = t["n_samples_tested"].fillna(0).astype(int)
    t["n_samples_present"] = t["n_samples_present"].fillna(0).astype(int)
    t["replication"] = [replication_label(k, n) for k, n in zip(t["n_samples_present"], t["n_samples_tested"])]
    return t[COLUMNS].reset_index(drop=True)


def _kind(group: str) -> str:
    return {CSC_GROUP: "csc_like", MALIGNANT_GROUP: "malignant"}.get(group, "other")


def _tidy(out: pd.DataFrame, sub: ad.AnnData, groups: list[str], species: str, alpha: float,
          n_perms: int) -> pd.DataFrame:
    """LIANA's result as the contract's tidy table, with per-group expression and the review's axes."""
    mean, prop = _group_stats(sub.X, sub.obs["@niche"].astype(str).to_numpy(), groups)
    gpos = {g: i for i, g in enumerate(sub.var_names)}
    t = pd.DataFrame({"sender": out["source"].astype(str), "receiver": out["target"].astype(str),
                      "ligand": out["ligand_complex"].astype(str), "receptor": out["receptor_complex"].astype(str),
                      "magnitude": out["magnitude_rank"].astype(float),
                      "specificity": out["specificity_rank"].astype(float),
                      # LIANA's p is the fraction of permutations at or above the observed mean; (b + 1) / (m + 1)
                      # (Phipson & Smyth 2010) never reports an impossible p = 0
                      "p": (out["cellphone_pvals"].astype(float) * n_perms + 1) / (n_perms + 1),
                      "lr_mean": out["lr_means"].astype(float)})
    t["q"] = bh_adjust(t["p"].to_numpy())
    gidx = {g: i for i, g in enumerate(groups)}
    s_i, r_i = t["sender"].map(gidx).to_numpy(), t["receiver"].map(gidx).to_numpy()
    lig_u, rec_u = t["ligand"].unique(), t["receptor"].unique()
    for stat, name in ((mean, "mean"), (prop, "prop")):
        lig = dict(zip(lig_u, _complex_stat(stat, gpos, pd.Series(lig_u)).T))
        rec = dict(zip(rec_u, _complex_stat(stat, gpos, pd.Series(rec_u)).T))
        t[f"ligand_{name}"] = [lig[x][i] for x, i in zip(t["ligand"], s_i)]
        t[f"receptor_{name}"] = [rec[x][i] for x, i in zip(t["receptor"], r_i)]
    axes = {lr: review_axis(*lr, species=species) for lr in set(zip(t["ligand"], t["receptor"]))}
    t["review_axis"] = [axes[lr] for lr in zip(t["ligand"], t["receptor"])]
    t = t.assign(_ns=~(t["p"] < alpha)).sort_values(["_ns", "magnitude", "specificity", "sender", "receiver",
                                                      "ligand", "receptor"], kind="mergesort")
    t["rank"] = np.arange(1, len(t) + 1)
    return t[[c for c in COLUMNS if c not in REPLICATION_COLUMNS]].reset_index(drop=True)


def skip_reason(adata: ad.AnnData, *, csc_key: str = Obs.CSC_LIKE, stemness_key: str = Obs.STEMNESS,
                malignant_key: str = Obs.MALIGNANT) -> str | None:
    """Why the niche stage has nothing to score, or None: it asks which signals CSC-like cells exchange with
    their niche, so without CSC-like cells (no stemness score with ``stemness.required: false``, or none
    called) there is no question to answer, and an all-groups table would answer another one."""
    obs = adata.obs
    stem = obs[stemness_key].to_numpy(dtype=float) if stemness_key in obs else np.full(adata.n_obs, np.nan)
    csc = obs[csc_key].fillna(False).to_numpy(dtype=bool) if csc_key in obs else np.zeros(adata.n_obs, bool)
    if malignant_key in obs:
        csc = csc & obs[malignant_key].fillna(False).to_numpy(dtype=bool)
    if csc.any():
        return None
    if not np.isfinite(stem).any():
        return ("Niche not scored: no stemness score was computed (stemness.required: false and the data hold no "
                "stemness genes), so there are no CSC-like cells whose niche could be read.")
    return "Niche not scored: no malignant cell was called CSC-like, so there is no CSC-like niche to read."


def by_sample_table(adata: ad.AnnData, key: str = Uns.NICHE) -> pd.DataFrame:
    """The per-sample rows written by :func:`niche_interactions` (``per_sample``)."""
    if key not in adata.uns or "by_sample" not in adata.uns[key]:
        return pd.DataFrame(columns=BY_SAMPLE_COLUMNS)
    return pd.DataFrame(adata.uns[key]["by_sample"])


def interactions_table(adata: ad.AnnData, key: str = Uns.NICHE) -> pd.DataFrame:
    """The tidy interaction table written by :func:`niche_interactions`."""
    if key not in adata.uns or "interactions" not in adata.uns[key]:
        raise MetastemError(f"adata.uns has no '{key}' interactions", fix="run metastem.niche.niche_interactions first")
    return pd.DataFrame(adata.uns[key]["interactions"])


def notes(adata: ad.AnnData, key: str = Uns.NICHE) -> list[str]:
    """The plain-sentence notes of the last run (why groups were left out, fallbacks taken)."""
    return json.loads(adata.uns[key]["notes_json"])


# ----------------------------------------------------------------------------- figure

def select_for_plot(table: pd.DataFrame, n_top: int = 20, alpha: float = 0.05) -> pd.DataFrame:
    """Rows of the dot plot: every ligand-receptor pair on a review axis that reaches p < alpha in some
    pair of groups (its best rank first), then the best other pairs, up to ``n_top`` pairs."""
    best = table.sort_values("rank").drop_duplicates(["ligand", "receptor"])
    axis = best[(best["review_axis"] != "") & (best["p"] < alpha)]
    rest = best.drop(axis.index)
    lr = pd.concat([axis, rest]).head(n_top)[["ligand", "receptor"]].reset_index(drop=True)
    lr["_row"] = np.arange(len(lr))
    return table.merge(lr, on=["ligand", "receptor"]).sort_values(["_row", "rank"]).drop(columns="_row")


def plot_niche(adata: ad.AnnData, *, key: str = Uns.NICHE, n_top: int = 20, ax=None, return_fig: bool = False,
               save: str | os.PathLike | None = None):
    """Dot plot of the top interactions: rows ligand -> receptor (review axes labelled), columns
    sender -> receiver, dot size -log10 p, colour -log10 magnitude rank (darker = stronger).

    Saves nothing unless ``save``; returns the Figure when ``return_fig``.
    """
    import matplotlib.pyplot as plt

    from metastem.plots import apply_style

    apply_style()
    table = interactions_table(adata, key)
    params = json.loads(adata.uns[key]["params_json"])
    sel = select_for_plot(table, n_top, params.get("alpha", 0.05)) if len(table) else table
    lrs = list(dict.fromkeys(zip(sel["ligand"], sel["receptor"])))
    cols = list(dict.fromkeys(f"{s} -> {r}" for s, r in
                              sorted(zip(sel["sender"], sel["receiver"]), key=lambda sr: (sr[1] != CSC_GROUP, sr))))
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.45 * len(cols)), max(3.0, 1.2 + 0.32 * len(lrs))))
    else:
        fig = ax.figure
    if not len(sel):
        ax.text(0.5, 0.5, "no interaction scored\n(see the notes)", ha="center", va="center")
        ax.set_axis_off()
    else:
        floor = 1.0 / (params["n_perms"] + 1)
        x = [cols.index(f"{s} -> {r}") for s, r in zip(sel["sender"], sel["receiver"])]
        y = [lrs.index(lr) for lr in zip(sel["ligand"], sel["receptor"])]
        size = -np.log10(np.clip(sel["p"].to_numpy(float), floor, 1.0))
        colour = -np.log10(np.clip(sel["magnitude"].to_numpy(float), 1e-12, 1.0))
        sc = ax.scatter(x, y, s=20 + 60 * size, c=colour, cmap="viridis", edgecolors="0.3", linewidths=0.4)
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
        axis_of = dict(zip(zip(sel["ligand"], sel["receptor"]), sel["review_axis"]))
        ax.set_yticks(range(len(lrs)), [f"{l} -> {r}" + (f"  [{axis_of[(l, r)]}]" if axis_of[(l, r)] else "")
                                        for l, r in lrs], fontsize=8)
        for tick, lr in zip(ax.get_yticklabels(), lrs):
            if axis_of[lr]:
                tick.set_fontweight("bold")
        ax.set_ylim(len(lrs) - 0.5, -0.5)
        ax.set_xlim(-0.5, len(cols) - 0.5)
        ax.grid(True, color="0.92", zorder=0)
        fig.colorbar(sc, ax=ax, label="-log10 magnitude rank", shrink=0.5, anchor=(0.0, 0.0))
        for v in (1, 2, 3):
            ax.scatter([], [], s=20 + 60 * v, c="0.6", label=f"p = {10.0 ** -v:g}")
        ax.legend(title="dot size", loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False,
                  labelspacing=1.2)
        ax.set_title("Niche interactions of CSC-like cells (bold: the review's axes)", fontsize=10)
    fig.tight_layout()
    from metastem.plots import finish

    return finish(fig, save, return_fig)
