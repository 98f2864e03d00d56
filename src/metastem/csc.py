"""CSC-like calls inside the tumour: each sample's own most stem-like malignant cells.

Ranking all cells of a dataset together lets the patient whose cells detect the most genes take every
call, and lets normal progenitors be called cancer stem cells (issue 15: on the shared oligodendroglioma
data all 19 CSC-like cells came from one of four tumours). Here stemness is compared only among the
malignant cells of one sample (``groupby``, by default the patient/sample): each sample's CSC-like cells
are its own most stem-like malignant cells. Normal cells keep their stemness score (normal stem and
progenitor cells are the comparison the review draws) but are never CSC-like.

A fixed quantile always calls (1 - quantile) of the cells, whether or not there is a stem-like
population. So each sample is also asked whether its malignant cells' stemness has a distinct upper
mode (``stemness_modes``): a Gaussian kernel density (Scott's bandwidth x 0.7) with an antimode whose
density is below 0.6 x the lower of the highest densities on either side, and at least 3 % of the cells
(and 10 cells) above it but at most 35 % of them (a minority population). A single value shared by more
than 10 % of the cells (the floor of a zero-inflated gene-set score) is set aside before the density is
estimated: its spike would make a dip of its own. Calibrated with this function on simulated scores
(30 draws per shape and size, 40-5000 cells; tests/test_csc.py checks the unimodal side): uniform, normal,
beta(1.1, 1.3), gamma(2), log-normal, zero-inflated gamma (40 % zeros) and rank-scaled scores are called
distinct in at most 7 % of draws (log-normal at 200 cells; 0 % otherwise); two normal modes 3.5-4 SD apart
with 5-20 % of the cells in the upper one in 47-83 % of draws at 200 cells and 77-100 % from 1000 cells on
(rarely below 100 cells). A sample without a distinct mode is reported as such (``distinct`` False)
instead of headlining "10 % CSC-like".

Rules: ``'antimode'`` (default) calls the cells above the antimode where the sample has a distinct mode
(so the CSC-like share is estimated per sample) and falls back to the quantile elsewhere, flagged as no
distinct population; ``'quantile'`` calls the malignant cells at or above the sample's ``quantile`` of
stemness whatever the shape.

The score read is ``obs['stemness_within']`` (``metastem.stemness.score_stemness``): the stemness that
orders malignant cells, learned among them, on a scale that keeps its shape. A rank-scaled score is
uniform by construction, so no dip can ever be seen in it: on the simulated tumour (3 patients, planted
stem-like shares 8 / 15 / 22 %), the rank-scaled ``stemness`` showed no distinct mode in any patient,
while the within-malignant diffused signature showed one in each, above which lie 7.6 / 14.7 / 20.6 %
of the malignant cells (precision 0.97-0.98). Without that column ``obs['stemness']`` is read, with a note.
"""
from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd

from metastem._keys import Obs
from metastem.stemness import STEMNESS_WITHIN

log = logging.getLogger(__name__)

BANDWIDTH_FACTOR = 0.7   # x Scott's factor: narrower finds real modes, wider hides them; calibrated above
MAX_DIP_RATIO = 0.6      # antimode density / lower side's peak density below this: a distinct mode
MIN_UPPER_SHARE = 0.03   # the upper mode must hold at least this share (and 10 cells) ...
MAX_UPPER_SHARE = 0.35   # ... and at most 35 % of the sample's malignant cells (a minority population)
MAX_TIED_SHARE = 0.1     # a single value held by more cells (a zero-inflated score's floor) is set aside
MAX_KDE_CELLS = 5000     # the density is estimated on at most this many cells (seeded), so cost stays flat
GRID = 512

TABLE_COLUMNS = ["sample", "n_cells", "n_malignant", "n_csc_like", "frac_csc_like", "threshold", "rule_used",
                 "distinct", "dip_ratio", "antimode", "upper_share", "note"]


def stemness_modes(x: np.ndarray, *, seed: int = 0) -> dict:
    """Does ``x`` (one sample's malignant-cell stemness) have a distinct upper mode?

    Returns ``{'distinct': bool, 'dip_ratio': float, 'antimode': float (NaN if none), 'upper_share': float}``;
    ``dip_ratio`` is the density at the best antimode over the lower of the two sides' peak densities
    (1 = no dip). See the module docstring for the rule and its calibration.
    """
    from scipy.stats import gaussian_kde

    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    none = {"distinct": False, "dip_ratio": 1.0, "antimode": float("nan"), "upper_share": 0.0}
    if x.size < 20 or np.ptp(x) == 0:
        return none
    n_all = x.size
    floor = x.min()
    if np.mean(x == floor) > MAX_TIED_SHARE:
        # a spike of tied lowest values (cells scoring 0 on a gene-set score) would make a dip of its own
        x = x[x > floor]
        if x.size < 20 or np.ptp(x) == 0:
            return none
    fit = x if x.size <= MAX_KDE_CELLS else np.random.default_rng(seed).choice(x, MAX_KDE_CELLS, replace=False)
    try:
        kde = gaussian_kde(fit)
    except np.linalg.LinAlgError:  # (almost) constant scores
        return none
    kde.set_bandwidth(kde.factor * BANDWIDTH_FACTOR)
    grid = np.linspace(x.min(), x.max(), GRID)
    f = kde(grid)
    left, right = np.maximum.accumulate(f), np.maximum.accumulate(f[::-1])[::-1]
    minima = np.flatnonzero((f[1:-1] <= f[:-2]) & (f[1:-1] <= f[2:])) + 1
    best = none
    sorted_x = np.sort(x)
    for i in minima:
        ratio = float(f[i] / min(left[i], right[i]))
        n_upper = x.size - np.searchsorted(sorted_x, grid[i], side="right")
        upper = n_upper / n_all    # a share of all the sample's malignant cells, tied floor included
        if ratio < best["dip_ratio"] and max(MIN_UPPER_SHARE, 10 / n_all) <= upper <= MAX_UPPER_SHARE \
                and n_upper >= 10:
            best = {"distinct": ratio < MAX_DIP_RATIO, "dip_ratio": ratio, "antimode": float(grid[i]),
                    "upper_share": float(upper)}
    return best


def call_csc_like(adata: ad.AnnData, *, stemness_key: str = STEMNESS_WITHIN, groupby: str = Obs.SAMPLE,
                  malignant_key: str = Obs.MALIGNANT, quantile: float = 0.9, rule: str = "antimode",
                  min_cells: int = 20, key_added: str = Obs.CSC_LIKE, seed: int = 0,
                  copy: bool = False) -> ad.AnnData | None:
    """Call CSC-like cells among the malignant cells of each sample.

    Parameters
    ----------
    stemness_key
        obs column of stemness (high = less differentiated); normal cells keep theirs. Default: the
        shape-keeping within-compartment score ``stemness_within`` (see the module docstring); when it is
        absent, ``stemness`` (with a note).
    groupby
        obs column of samples; each is ranked on its own (one group of all cells when absent).
    malignant_key
        obs boolean column of malignant cells; when absent every cell counts as malignant (a note says so).
    quantile
        With ``rule='quantile'`` (and as the fallback of ``'antimode'``), the malignant cells at or above this
        quantile of their sample's malignant-cell stemness are CSC-like.
    rule
        ``'antimode'`` (cells above the sample's antimode where it has a distinct upper mode, see
        ``stemness_modes``; the quantile elsewhere, flagged) or ``'quantile'``.
    min_cells
        Samples with fewer malignant cells get no call (too few to rank), with a note.

    Writes ``obs[key_added]`` (bool) and ``uns[key_added]``: the parameters and ``table_json``, one row per
    sample (``csc_table`` reads it back): cells, malignant cells, CSC-like cells and their share of the
    malignant cells, the threshold, the rule used, whether the sample has a distinct stem-like mode and its
    diagnostics, and a note.
    """
    if rule not in ("quantile", "antimode"):
        raise ValueError(f"rule must be 'quantile' or 'antimode', not {rule!r}")
    adata = adata.copy() if copy else adata
    obs = adata.obs
    notes = []
    if stemness_key not in obs and stemness_key == STEMNESS_WITHIN and Obs.STEMNESS in obs:
        notes.append(f"no obs['{STEMNESS_WITHIN}']: CSC-like cells are called on obs['{Obs.STEMNESS}'], whose "
                     "rank scale hides any distinct mode")
        stemness_key = Obs.STEMNESS
    if stemness_key not in obs:
        raise ValueError(f"no obs['{stemness_key}'] to call CSC-like cells on: run score_stemness first")
    stem = obs[stemness_key].to_numpy(dtype=float)
    if malignant_key in obs:
        malignant = obs[malignant_key].fillna(False).to_numpy(dtype=bool)
    else:
        malignant = np.ones(adata.n_obs, dtype=bool)
        notes.append(f"no obs['{malignant_key}']: every cell is treated as malignant")
    groups = obs[groupby].astype(str).to_numpy() if groupby in obs else np.full(adata.n_obs, "all")
    if groupby not in obs:
        notes.append(f"no obs['{groupby}']: all cells are one group")
    calls = np.zeros(adata.n_obs, dtype=bool)
    rows = []
    for name in sorted(pd.unique(groups)):
        in_group = groups == name
        m = in_group & malignant & np.isfinite(stem)
        x = stem[m]
        row = {"sample": name, "n_cells": int(in_group.sum()), "n_malignant": int(m.sum()), "n_csc_like": 0,
               "frac_csc_like": float("nan"), "threshold": float("nan"), "rule_used": "none", "distinct": False,
               "dip_ratio": float("nan"), "antimode": float("nan"), "upper_share": float("nan"), "note": ""}
        if m.sum() < min_cells:
            row["note"] = f"{int(m.sum())} malignant cells, fewer than {min_cells}: no CSC-like call"
            rows.append(row)
            continue
        modes = stemness_modes(x, seed=seed)
        row.update(distinct=bool(modes["distinct"]), dip_ratio=modes["dip_ratio"], antimode=modes["antimode"],
                   upper_share=modes["upper_share"])
        if rule == "antimode" and modes["distinct"]:
            threshold, row["rule_used"] = modes["antimode"], "antimode"
            hit = m & (stem > threshold)
        else:
            threshold, row["rule_used"] = float(np.quantile(x, quantile)), "quantile"
            hit = m & (stem >= threshold)
        calls |= hit
        row.update(n_csc_like=int(hit.sum()), frac_csc_like=float(hit.sum() / m.sum()), threshold=float(threshold))
        if not modes["distinct"]:
            row["note"] = (f"no distinct stem-like population (stemness unimodal among its malignant cells, dip ratio "
                           f"{modes['dip_ratio']:.2f}): the {100 * (1 - quantile):.0f}% CSC-like cells are the "
                           "quantile rule's share, not a population")
        rows.append(row)
    obs[key_added] = calls
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    adata.uns[key_added] = {"stemness_key": stemness_key, "groupby": groupby, "malignant_key": malignant_key,
                            "quantile": float(quantile), "rule": rule, "min_cells": int(min_cells),
                            "notes_json": json.dumps(notes), "table_json": table.to_json(orient="records")}
    for note in notes:
        log.info(note)
    return adata if copy else None


def csc_table(adata: ad.AnnData, key: str = Obs.CSC_LIKE) -> pd.DataFrame:
    """The per-sample table ``call_csc_like`` recorded in ``uns[key]``."""
    return pd.DataFrame(json.loads(adata.uns[key]["table_json"]), columns=TABLE_COLUMNS)


def csc_summary(adata: ad.AnnData, key: str = Obs.CSC_LIKE) -> dict:
    """Headline facts: CSC-like cells among malignant cells, samples with calls, samples without a
    distinct stem-like population (for info.json and the report)."""
    t = csc_table(adata, key)
    called = t[t["n_csc_like"] > 0]
    return {"n_csc_like": int(t["n_csc_like"].sum()), "n_malignant": int(t["n_malignant"].sum()),
            "n_samples": int(len(t)), "samples_with_calls": int(len(called)),
            "samples_without_distinct_population": [str(s) for s in t.loc[~t["distinct"].astype(bool), "sample"]],
            "rule": adata.uns[key]["rule"], "groupby": adata.uns[key]["groupby"],
            "quantile": adata.uns[key]["quantile"], "notes": json.loads(adata.uns[key]["notes_json"])}
