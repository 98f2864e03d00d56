"""Snakemake wrapper: read one dataset, run QC, write the filtered AnnData, tables and figure."""
from metastem.smk import run


def main(smk) -> None:
    from metastem._timing import timed  # one log line per step: time and peak RSS
    import json

    from metastem import io, plots, qc
    from metastem.errors import MetastemError
    from metastem.smk import write_json_atomic

    row, p = smk.params.row, smk.params.params
    adata = io.read_dataset(row, p)
    try:
        filtered, cells, info = timed("QC metrics, doublets, filters", qc.run_qc, adata, p["qc"], values=row["values"], species=row["species"], seed=p["seed"])
    except MetastemError as err:
        raise err.with_context(file=row["path"] or "(simulated)")
    filtered.uns["metastem"] = {"dataset": row["dataset"], "species": row["species"], "values": row["values"],
                                "labels": row["labels"], "params_json": json.dumps(p)}
    info["input"] = {"path": row["path"] or "(built-in simulator)", "format": row["format"],
                     "values": row["values"], "species": row["species"], "labels": row["labels"],
                     "log_base": filtered.uns.get("log_base_rule", ""),
                     "checksum": io.file_checksum(row["path"]) if row["path"] else f"simulated, seed {p['seed']}"}
    samples = row.get("samples") or []
    if len(samples) > 1:  # one input per sample
        info["input"]["path"] = ", ".join(s["path"] for s in samples)
        info["input"]["samples"] = [{**s, "checksum": io.file_checksum(s["path"])} for s in samples]
    info["sample_key"] = row.get("sample_key") or None
    if filtered.uns.get("samples_note"):
        info["notes"].append(filtered.uns.pop("samples_note"))
    if len(info["per_sample"]) > 1:
        plots.plot_qc_metrics_by_sample(cells, info["per_sample"], smk.output.figure)
    else:
        plots.plot_qc_metrics(cells, info["thresholds"], smk.output.figure)
    io.write_table_atomic(cells, smk.output.cells, index_label="cell")
    io.write_table_atomic(qc.qc_summary_table(info), smk.output.summary, index=False)
    write_json_atomic(info, smk.output.info)
    io.write_h5ad_atomic(filtered, smk.output.h5ad)


run(snakemake, main)  # noqa: F821
