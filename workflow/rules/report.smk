# Reports: one self-contained report.html per dataset, and results/index.html linking them all.
from metastem.smk import report as metastem_report

# every caption of workflow/report/, read through workflow.source_path (works for a module pulled by tag)
CAPTIONS = caption_texts(
    metastem_report.STAGES, lambda name: workflow.source_path(f"../report/{name}")
)


rule report:
    input:
        # every table, figure and info.json the stage rules declare, grouped by stage
        unpack(lambda wc: metastem_report.stage_inputs(rules, wc)),
        provenance=lambda wc: metastem_report.provenance_files(
            params_of(wc), SHEET.loc[wc.dataset, "species"]
        ),
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
        captions=CAPTIONS,
        # parameter meanings and defaults for the methods table (the schema the config was checked with)
        schema=CONFIG_SCHEMA,
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
