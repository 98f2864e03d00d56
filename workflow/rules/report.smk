# Reports: one self-contained report.html per dataset, and results/index.html linking them all.
from metastem import report as metastem_report  # noqa: E402

REPORT_DIR = Path(str(workflow.current_basedir)).parent


rule report:
    input:
        # every table, figure and info.json the stage rules declare, grouped by stage
        unpack(lambda wc: metastem_report.stage_inputs(rules, wc)),
        provenance=lambda wc: metastem_report.provenance_files(params_of(wc)),
        schema=REPORT_DIR / "schemas/config.schema.yaml",
    output:
        html=report(
            f"{OUTDIR}/{{dataset}}/report.html",
            caption="../report/report_html.rst",
            category="6. HTML report",
            labels={"dataset": "{dataset}", "file": "report.html"},
        ),
    log:
        f"{OUTDIR}/logs/{{dataset}}/report.log",
    benchmark:
        f"{OUTDIR}/benchmarks/{{dataset}}/report.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        row=row,
        params=params_of,
        captions=str(REPORT_DIR / "report"),
    script:
        "../scripts/report.py"


rule index:
    input:
        reports=expand(f"{OUTDIR}/{{dataset}}/report.html", dataset=DATASETS),
    output:
        html=report(
            f"{OUTDIR}/index.html",
            caption="../report/index_html.rst",
            category="6. HTML report",
            labels={"dataset": "all datasets", "file": "index.html"},
        ),
    log:
        f"{OUTDIR}/logs/index.log",
    benchmark:
        f"{OUTDIR}/benchmarks/index.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    script:
        "../scripts/index.py"
