"""metastem reused as a Snakemake module by another workflow (tests/module_consumer), run from elsewhere.

The consumer runs in a temporary working directory that has none of metastem's files (no config/,
workflow/, envs/): every path inside the rules (schemas, scripts, report captions, shipped gene sets,
conda envs) must resolve relative to the metastem repo, and every output must land under the consumer's
outdir. The results must equal a plain local run of the same small demo.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
import workflow_runs as wr  # noqa: E402

pytestmark = pytest.mark.slow

CONSUMER = wr.REPO / "tests" / "module_consumer"
CONSUMER_OUTDIR = "results/metastem"  # tests/module_consumer/config.yaml
DATASET = "consumer_demo"  # tests/module_consumer/datasets.tsv


@pytest.fixture()
def consumer_dir(tmp_path) -> Path:
    """An empty working directory holding only the consumer's sheet (its config is read from beside its Snakefile)."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(CONSUMER / "datasets.tsv", work / "datasets.tsv")
    return work


def _snakemake(work: Path, *args: str, log: str, timeout: int = 900, check: bool = True) -> wr.Run:
    return wr.run_snakemake(["-s", str(CONSUMER / "Snakefile"), "--cores", "2", *args],
                            cwd=work, log=work.parent / log, timeout=timeout, check=check)


def test_consumer_config_is_small_demo():
    """The consumer's config is the small demo the local reference runs (same simulate params, seed)."""
    import yaml

    cfg = yaml.safe_load((CONSUMER / "config.yaml").read_text())["metastem"]
    assert cfg["outdir"] == CONSUMER_OUTDIR and cfg["datasets"] == "datasets.tsv"
    assert cfg["simulate"] == wr.SMALL and cfg["seed"] == 0
    assert (CONSUMER / "datasets.tsv").read_text().splitlines()[1].split("\t")[0] == DATASET


def test_single_stage_target_runs_only_that_stage(consumer_dir):
    """`clustering_only` (README example): QC + clustering, nothing downstream, from another directory."""
    run = _snakemake(consumer_dir, "--dry-run", "clustering_only", log="dry_stage.log", timeout=300)
    assert run.job_stats() == {"metastem_qc": 1, "metastem_cluster": 1, "clustering_only": 1}


def test_module_end_to_end_from_elsewhere(consumer_dir, tmp_path_factory):
    ref_out, ref_run = wr.local_reference(tmp_path_factory.mktemp("local_reference"))

    # dry run first: unresolvable paths (missing GMT, schema, script) fail here in seconds
    dry = _snakemake(consumer_dir, "--dry-run", log="dry_all.log", timeout=300)
    stats = dry.job_stats()
    module_jobs = {r[len("metastem_"):]: n for r, n in stats.items() if r.startswith("metastem_")}
    assert set(stats) - {f"metastem_{r}" for r in module_jobs} == {"all"}, stats
    assert module_jobs == {r: n for r, n in ref_run.job_stats().items() if r != "all"}, \
        "the module schedules other jobs than the plain workflow"

    run = _snakemake(consumer_dir, "--rerun-incomplete", log="run.log", timeout=1200)
    outdir = consumer_dir / CONSUMER_OUTDIR
    assert (outdir / DATASET).is_dir(), f"no outputs under the consumer's outdir {outdir}:\n{run.tail()}"

    # nothing written outside the consumer's outdir (besides snakemake's own .snakemake)
    stray = sorted(p.name for p in consumer_dir.iterdir())
    assert stray == [".snakemake", "datasets.tsv", "results"], f"unexpected files in the consumer dir: {stray}"
    assert sorted(p.name for p in (consumer_dir / "results").iterdir()) == ["metastem"]
    assert not (wr.REPO / CONSUMER_OUTDIR).exists() and not list(wr.REPO.glob(f"results/{DATASET}")), \
        "the module wrote into the metastem repo"

    problems = wr.compare_outputs(outdir, ref_out, rename={DATASET: "demo"},
                                  outdirs=[CONSUMER_OUTDIR, str(outdir), str(ref_out)])
    assert not problems, "module and plain local results differ:\n" + "\n".join(problems)

    # report captions (relative to the rule files) resolve from the consumer too
    report = consumer_dir.parent / "snakemake_report.html"
    _snakemake(consumer_dir, "--report", str(report), log="report.log", timeout=600)
    assert report.stat().st_size > 0
    print(f"\nmodule run: {sum(module_jobs.values())} jobs in {run.wall:.1f} s; compared {wr.compared_kinds(outdir)}")
