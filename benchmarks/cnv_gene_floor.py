"""How many positioned genes does a malignant call from copy number need?

Why: ``malignant.min_genes_with_position`` decides when the CNV stage tries at all. A targeted panel of a
few hundred genes leaves each chromosome arm a handful of genes, fewer than one running window, and the
calls collapse (issue 15: a 400-gene panel called 0 % of a ~70 % malignant tumour). This script measures the
call quality against the number of positioned genes, so the floor is a measured value, not a guess.

Per seed, one simulated tumour (``simulate_tumour``, 3 patients, 6 planted arm-level events each, real
GRCh38 positions) of ``--genes`` genes; then for every panel size k, k genes drawn at random (the same
cells), the clustering stage and :func:`metastem.cnv.infer_malignant` with the automatic reference (no truth
read). Printed per (k, window, seed): genes with any position (X and Y included), AUROC of the CNV score against the truth,
sensitivity and specificity of the call, and then per k the worst seed.

    .venv/bin/python benchmarks/cnv_gene_floor.py --sizes 200,300,500,800,1200,2000,4000 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from metastem import cluster, cnv
from metastem.simulate import simulate_tumour
from metastem.smk.config import load_schema, validate_with_defaults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=1500)
    ap.add_argument("--genes", type=int, default=4000)
    ap.add_argument("--sizes", default="200,300,500,800,1200,2000,4000")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--windows", default="100", help="comma-separated infercnvpy window sizes (genes)")
    args = ap.parse_args()
    cfg = validate_with_defaults({}, load_schema("workflow/schemas/config.schema.yaml"), where="defaults")
    sizes = [int(s) for s in args.sizes.split(",")]
    windows = [int(w) for w in args.windows.split(",")]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        full = simulate_tumour(args.cells, args.genes, seed=seed, frac_doublets=0.0, frac_low_quality=0.0)
        rng = np.random.default_rng(seed)
        for k in sizes:
            # one gene subset and one clustering per panel size, so the windows are compared on the same data
            genes = np.sort(rng.choice(full.n_vars, size=min(k, full.n_vars), replace=False))
            clustered = full[:, genes].copy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cluster.normalize(clustered, values="counts", target_sum=cfg["cluster"]["target_sum"])
                cluster.embed_and_cluster(clustered, cfg["cluster"], seed=0)
            truth = clustered.obs["true_malignant"].to_numpy(bool)
            for w in windows:
                a = clustered.copy()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cnv.infer_malignant(a, min_genes_with_position=1, window_size=w, step=max(1, w // 10))
                call = a.obs["malignant"].to_numpy(bool)
                score = a.obs["cnv_score"].to_numpy(float)
                info = a.uns["malignant"]
                rows.append({"genes": k, "window": w, "seed": seed, "placed": info["genes_with_position"],
                             "evidence": info["evidence"],
                             "auroc": roc_auc_score(truth, score) if np.isfinite(score).all() else np.nan,
                             "sensitivity": call[truth].mean(), "specificity": (~call[~truth]).mean(),
                             "ashman_d": info.get("ashman_d", np.nan)})
                print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1,
                                                         float_format=lambda v: f"{v:.3f}"), flush=True)
    df = pd.DataFrame(rows)
    print("\nper panel size, worst seed:")
    worst = df.groupby(["genes", "window"]).agg(placed=("placed", "median"), auroc_min=("auroc", "min"),
                                                sens_min=("sensitivity", "min"), spec_min=("specificity", "min"),
                                                ashman_d_min=("ashman_d", "min"))
    print(worst.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
