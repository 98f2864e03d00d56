# Sheet parsing, validation and parameter lookup shared by every rule.
import json
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# The analysis package lives beside the workflow; importable without installation (modules, conda envs).
METASTEM_SRC = Path(str(workflow.current_basedir)).parents[1] / "src"
sys.path.insert(0, str(METASTEM_SRC))

from metastem.config import check_workflow, load_schema  # noqa: E402
from metastem.errors import MetastemError  # noqa: E402
from metastem.resources import dataset_size, estimate_resources  # noqa: E402

CONFIG_SCHEMA = load_schema(workflow.source_path("../schemas/config.schema.yaml"))
SHEET_SCHEMA = load_schema(workflow.source_path("../schemas/datasets.schema.yaml"))

# Config (not snakemake.utils.validate: it prints the whole schema for one bad key), sheet rows,
# params overrides and inputs of every dataset, before any job; one line per problem.
try:
    OUTDIR, SHEET, PARAMS, _problems = check_workflow(
        config, CONFIG_SCHEMA, SHEET_SCHEMA
    )
except MetastemError as err:  # the config itself is unusable
    sys.exit("\n".join(f"metastem: {line}" for line in str(err).splitlines()))
DATASETS = list(SHEET.index)
REPO_ROOT = METASTEM_SRC.parent


def resolve_gene_sets(paths: list[str], species: str) -> list[str]:
    """GMT paths with '{species}' filled in; relative paths are looked up in the working directory
    first, then in the metastem repository, so the shipped sets resolve when used as a module.
    """
    out = []
    for p in (p.replace("{species}", species) for p in paths):
        if (
            not Path(p).is_absolute()
            and not Path(p).exists()
            and (REPO_ROOT / p).exists()
        ):
            p = str(REPO_ROOT / p)
        out.append(p)
    return out


for _ds, _p in PARAMS.items():
    _species = SHEET.loc[_ds, "species"]
    _p["stemness"]["gene_sets"] = resolve_gene_sets(
        _p["stemness"]["gene_sets"], _species
    )
    _p["pathways"]["gene_sets"] = resolve_gene_sets(
        _p["pathways"]["gene_sets"], _species
    )
    _p["pathways"]["extra_gene_sets"] = resolve_gene_sets(
        _p["pathways"]["extra_gene_sets"], _species
    )
    (_p["pathways"]["aliases"],) = resolve_gene_sets(
        [_p["pathways"]["aliases"]], _species
    )
    for _gmt in (
        _p["stemness"]["gene_sets"]
        + _p["pathways"]["gene_sets"]
        + _p["pathways"]["extra_gene_sets"]
    ):
        if not Path(_gmt).is_file():
            _problems.append(
                f"dataset '{_ds}': {_gmt}: gene-set file not found. Fix: correct the GMT path in the config."
            )
    if not Path(_p["pathways"]["aliases"]).is_file():
        _problems.append(
            f"dataset '{_ds}': {_p['pathways']['aliases']}: alias table not found. Fix: correct pathways.aliases in the config."
        )
if _problems:
    sys.exit("\n".join(f"metastem: {p}" for p in _problems))


def gene_set_files(stage: str):
    """The GMT files a stage scores, as inputs, so that editing a set reruns the stage."""

    def fn(wildcards) -> list[str]:
        p = PARAMS[wildcards.dataset][stage]
        return p["gene_sets"] + p.get("extra_gene_sets", [])

    return fn


wildcard_constraints:
    dataset="|".join(DATASETS) if DATASETS else "[A-Za-z0-9_-]+",


def intermediate(path: str) -> str:
    """Per-stage h5ad files: deleted once no job needs them unless config keep_intermediate is true."""
    return path if config["keep_intermediate"] else temp(path)


def row(wildcards) -> dict:
    """The sheet row of a dataset, as a plain dict."""
    return SHEET.loc[wildcards.dataset].to_dict()


def params_of(wildcards) -> dict:
    """Parameters used for a dataset: config defaults plus the row's per-dataset overrides."""
    return PARAMS[wildcards.dataset]


def params_for(*sections: str):
    """Only the config sections a job uses, plus the seed. Snakemake reruns a job whose params changed,
    so a QC job given every section would rerun after an edit to a pathways setting."""

    def fn(wildcards) -> dict:
        p = PARAMS[wildcards.dataset]
        return {key: p[key] for key in (*sections, "seed")}

    return fn


def input_path(wildcards) -> list[str]:
    """The raw input as a Snakemake input (none for simulated data)."""
    r = SHEET.loc[wildcards.dataset]
    return [] if r["format"] == "simulated" else [r["path"]]


def res(stage: str, key: str):
    """A resource callable for `stage` that grows with the dataset's size and with each retry."""

    def fn(wildcards, attempt):
        _, _, nnz = dataset_size(row(wildcards), params_of(wildcards))
        return estimate_resources(stage, nnz, attempt)[key]

    return fn
