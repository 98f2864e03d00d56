# Sheet parsing, validation and parameter lookup shared by every rule.
import json
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


def _workflow_version() -> str:
    """The version of this workflow: metastem.__version__ as written in the same source tree (or tag)."""
    import re

    with open(workflow.source_path("../../src/metastem/__init__.py")) as fh:
        return re.search(r'^__version__ = "([^"]+)"', fh.read(), re.M).group(1)


# The rules' Python is the installed metastem package; it must be the workflow's own version.
WORKFLOW_VERSION = _workflow_version()
try:
    import metastem
except ImportError:
    metastem = None
if metastem is None or metastem.__version__ != WORKFLOW_VERSION:
    sys.exit(
        f"metastem: this workflow is metastem {WORKFLOW_VERSION} but "
        + (
            "the metastem package is not installed"
            if metastem is None
            else f"the installed metastem package is {metastem.__version__} ({Path(metastem.__file__).parent})"
        )
        + f". Fix: pip install 'metastem=={WORKFLOW_VERSION}' into the environment that runs snakemake "
        "(from a checkout of the same tag: pip install .), or run with --sdm conda."
    )

from metastem.smk.config import check_workflow, load_schema
from metastem.errors import MetastemError
from metastem.genesets import resolve_path
from metastem.smk.resources import dataset_size, estimate_resources

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


def resolve_gene_sets(paths: list[str], species: str) -> list[str]:
    """GMT paths with '{species}' filled in and 'metastem:<file>' resolved to the file shipped inside
    the installed package; other paths are relative to the working directory."""
    try:
        return [resolve_path(p, species) for p in paths]
    except MetastemError as err:
        sys.exit(f"metastem: {err}")


# Gene-set files are checked here; params keep them as written ('metastem:<file>' resolves inside the
# installed package), so that a moved checkout or environment does not change any rule's params.
for _ds, _p in PARAMS.items():
    _species = SHEET.loc[_ds, "species"]
    for _key, _paths in (
        ("stemness.gene_sets", _p["stemness"]["gene_sets"]),
        ("pathways.gene_sets", _p["pathways"]["gene_sets"]),
        ("pathways.extra_gene_sets", _p["pathways"]["extra_gene_sets"]),
        ("pathways.aliases", [_p["pathways"]["aliases"]]),
    ):
        for _file in resolve_gene_sets(_paths, _species):
            if not Path(_file).is_file():
                _problems.append(
                    f"dataset '{_ds}': {_file}: file not found. Fix: correct {_key} in the config."
                )
if _problems:
    sys.exit("\n".join(f"metastem: {p}" for p in _problems))


def gene_set_files(stage: str):
    """The GMT files a stage scores, as inputs, so that editing a set reruns the stage."""

    def fn(wildcards) -> list[str]:
        p = PARAMS[wildcards.dataset][stage]
        species = SHEET.loc[wildcards.dataset, "species"]
        sets = (
            p["gene_sets"]
            + p.get("extra_gene_sets", [])
            + p.get("differentiation_sets", [])
        )
        return resolve_gene_sets(sets, species)

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
    """The raw inputs as Snakemake inputs: one per sample row of the dataset (none for simulated data)."""
    r = SHEET.loc[wildcards.dataset]
    return [s["path"] for s in r["samples"] if s["format"] != "simulated"]


def res(stage: str, key: str):
    """A resource callable for `stage` that grows with the dataset's size and with each retry."""

    def fn(wildcards, attempt):
        _, _, nnz = dataset_size(row(wildcards), params_of(wildcards))
        return estimate_resources(stage, nnz, attempt)[key]

    return fn


def wired_outputs(**wanted):
    """Input function: ``name=(stage, output key)`` for each stage rule that is wired and declares that
    output (a stage a workflow may not include is left out, and the consuming stage says so).
    """

    def fn(wildcards) -> dict:
        out = {}
        for name, (stage, key) in wanted.items():
            if rules.has(stage) and key in getattr(rules, stage).output.keys():
                pattern = getattr(getattr(rules, stage).output, key)
                out[name] = pattern.format(dataset=wildcards.dataset)
        return out

    return fn


def caption_texts(stages, caption_path) -> dict[str, str]:
    """{file stem: caption text} for every output of a stage rule flagged report(..., caption=...).

    ``caption_path(name)`` is workflow.source_path of ``workflow/report/<name>``, called from the rule
    file: a local copy also when the workflow is a module pulled by tag. Only captions the rules name
    are read (asking a git source for a file its tag lacks makes Snakemake fetch from the network).
    Passed to the report rule as params, so a caption edit reruns the report."""
    texts = {}
    for stage in stages:
        if not rules.has(stage):
            continue
        for f in getattr(rules, stage).rule.output:
            flagged = getattr(f, "flags", {}).get("report")
            if flagged is not None and flagged.caption:
                # a git source names it '<path>@<tag>': the file name is what precedes the '@'
                name = Path(str(flagged.caption)).name.split("@")[0]
                with open(caption_path(name)) as fh:
                    texts[Path(str(f)).name.split(".")[0]] = fh.read()
    return texts
