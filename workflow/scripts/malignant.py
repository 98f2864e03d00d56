"""Snakemake wrapper: malignant vs normal calls, CNV score, per-sample summary, figures, per-cell table."""
from pathlib import Path

from metastem.smk import run

# obs columns handed to later stages (workflow DAG: malignant/cells.tsv.gz)
COLUMNS = ["malignant", "cnv_score", "malignant_evidence", "cnv_reference"]


def main(smk) -> None:
    from metastem._timing import timed  # one log line per step: time and peak RSS
    import anndata as ad

    from metastem import cnv, io
    from metastem.smk import write_json_atomic

    row, p = smk.params.row, smk.params.params
    m = p["malignant"]
    adata = timed("read clustered.h5ad", ad.read_h5ad, smk.input.h5ad)
    timed("CNV inference and malignant calls", cnv.infer_malignant, adata, labels_key=row.get("labels") or "", species=row["species"], n_jobs=smk.threads, **m)
    info = dict(adata.uns["malignant"])
    figure_notes = {}
    for path, draw, needs in ((smk.output.heatmap, cnv.plot_cnv_heatmap, "X_cnv"),
                              (smk.output.umap, cnv.plot_cnv_score_umap, "X_umap")):
        if needs in adata.obsm:
            timed(f"figure {Path(path).stem}", draw, adata, save=path)
        else:
            Path(path).write_bytes(b"")  # nothing to draw: the sentence goes to the report
            figure_notes[Path(path).stem] = ("no CNV profiles were inferred (see the notes)" if needs == "X_cnv"
                                             else "no UMAP embedding in the clustered data")
    info["figure_notes"] = figure_notes
    io.write_table_atomic(cnv.malignant_summary(adata), smk.output.summary, index=False)
    io.write_table_atomic(adata.obs[COLUMNS], smk.output.cells, index_label="cell")
    write_json_atomic(info, smk.output.info)


run(snakemake, main)  # noqa: F821
