# Sheet parsing, validation and parameter lookup shared by every rule.
import json
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

# The analysis package lives beside the workflow; importable without installation (modules, conda envs).
METASTEM_SRC = Path(str(workflow.current_basedir)).parents[1] / "src"
sys.path.insert(0, str(METASTEM_SRC))

from metastem.config import (  # noqa: E402
    check_inputs,
    dataset_params,
    load_schema,
    read_sheet,
    safe_outdir,
)
from metastem.errors import MetastemError  # noqa: E402
from metastem.resources import estimate_resources, dataset_shape  # noqa: E402

validate(config, "../schemas/config.schema.yaml")
CONFIG_SCHEMA = load_schema(workflow.source_path("../schemas/config.schema.yaml"))
SHEET_SCHEMA = load_schema(workflow.source_path("../schemas/datasets.schema.yaml"))

try:
    OUTDIR = safe_outdir(config["outdir"]).rstrip("/")
    SHEET = read_sheet(config["datasets"], SHEET_SCHEMA)
    PARAMS = {ds: dataset_params(config, row, CONFIG_SCHEMA) for ds, row in SHEET.iterrows()}
except MetastemError as err:
    sys.exit(f"metastem: {err}")
_problems = check_inputs(SHEET)
if _problems:
    sys.exit("\n".join(f"metastem: {p}" for p in _problems))
DATASETS = list(SHEET.index)


wildcard_constraints:
    dataset="|".join(DATASETS) if DATASETS else "[A-Za-z0-9_-]+",


def row(wildcards) -> dict:
    """The sheet row of a dataset, as a plain dict."""
    return SHEET.loc[wildcards.dataset].to_dict()


def params_of(wildcards) -> dict:
    """Parameters used for a dataset: config defaults plus the row's per-dataset overrides."""
    return PARAMS[wildcards.dataset]


def input_path(wildcards) -> list[str]:
    """The raw input as a Snakemake input (none for simulated data)."""
    r = SHEET.loc[wildcards.dataset]
    return [] if r["format"] == "simulated" else [r["path"]]


def res(stage: str, key: str):
    """A resource callable for `stage` that grows with the dataset's size and with each retry."""

    def fn(wildcards, attempt):
        cells, genes = dataset_shape(row(wildcards), params_of(wildcards))
        return estimate_resources(stage, cells, genes, attempt)[key]

    return fn
