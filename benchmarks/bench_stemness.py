"""Time and peak memory of the stemness stage, and sparse-vs-dense CytoTRACE agreement.

Usage (from the repository root):
    .venv/bin/python benchmarks/bench_stemness.py                 # 10k and 100k cells (minutes)
    .venv/bin/python benchmarks/bench_stemness.py --quick         # smoke test, < 1 min
    .venv/bin/python benchmarks/bench_stemness.py --ingredients   # issue 17 ingredients vs the CytoTRACE rule, 20k/50k
    .venv/bin/python benchmarks/bench_stemness.py --validate      # Spearman with the known order, every dataset

Each size is simulated with ``metastem.simulate.simulate_tumour``, normalised and given the
pipeline's kNN graph (HVG -> PCA -> sc.pp.neighbors; UMAP and Leiden are skipped because stemness
does not use them), then ``score_stemness`` is timed with tracemalloc measuring its peak Python/numpy
allocations (tracemalloc adds some overhead to the timing). The slope is the log-log growth of time
between the two sizes: 1.0 means linear in cells.
"""
from __future__ import annotations

import argparse
import inspect
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]


def prepared(n_cells: int, n_genes: int, seed: int = 0):
    """Simulated counts, normalised, with HVG/PCA/kNN as the cluster stage builds them."""
    import scanpy as sc

    from metastem.cluster import normalize
    from metastem.simulate import simulate_tumour

    adata = simulate_tumour(n_cells, n_genes, seed=seed, frac_doublets=0.0, frac_low_quality=0.0)
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel()   # as QC writes it
    normalize(adata, values="counts", target_sum=1e4)
    sc.pp.highly_variable_genes(adata, n_top_genes=min(2000, n_genes), flavor="seurat")
    sc.pp.pca(adata, n_comps=30, mask_var="highly_variable", svd_solver="arpack", random_state=seed)
    sc.pp.neighbors(adata, n_neighbors=15, n_pcs=30, random_state=seed)
    return adata


def stemness_params() -> dict:
    from metastem.smk.config import load_schema, validate_with_defaults

    from metastem.stemness import score_stemness

    cfg = validate_with_defaults({}, load_schema(REPO / "workflow/schemas/config.schema.yaml"), where="defaults")
    accepted = inspect.signature(score_stemness).parameters   # the section also holds metastem.csc's keys
    return {k: v for k, v in cfg["stemness"].items() if k in accepted}


def time_stemness(n_cells: int, n_genes: int) -> dict:
    from metastem.stemness import score_stemness

    t0 = time.perf_counter()
    adata = prepared(n_cells, n_genes)
    prep = time.perf_counter() - t0
    tracemalloc.start()
    t0 = time.perf_counter()
    info = score_stemness(adata, species="human", seed=0, **stemness_params())
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"cells": adata.n_obs, "genes": adata.n_vars, "nnz_X": adata.X.nnz, "prep_s": prep,
            "stemness_s": elapsed, "peak_mb": peak / 2**20, "method": info["method_used"],
            "auroc_stem_like": auroc(adata.obs["true_stem_like"].to_numpy(), adata.obs["stemness"].to_numpy())}


def auroc(truth: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth, score))


def agreement(n_cells: int, n_genes: int) -> dict:
    from metastem.stemness import cytotrace_dense, score_cytotrace

    adata = prepared(n_cells, n_genes)
    t0 = time.perf_counter()
    sparse = score_cytotrace(adata)
    t_sparse = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = cytotrace_dense(adata)
    t_dense = time.perf_counter() - t0
    truth = adata.obs["true_stem_like"].to_numpy()
    return {"cells": adata.n_obs, "spearman": float(spearmanr(sparse, dense)[0]), "sparse_s": t_sparse,
            "dense_s": t_dense, "auroc_sparse": auroc(truth, sparse), "auroc_dense": auroc(truth, dense)}


def time_ingredients(n_cells: int, n_genes: int, repeats: int = 1) -> dict:
    """Seconds of the issue-17 ingredients against the present rule (genes detected, CytoTRACE-style score,
    stem signatures, cell cycle), each step timed on its own in this process (best of ``repeats``)."""
    from metastem import stemness as st

    adata = prepared(n_cells, n_genes)
    sets = st.load_stemness_sets(["metastem:stemness_{species}.gmt"], "human")
    diff = st.load_stemness_sets(["metastem:stemness_differentiation_{species}.gmt"], "human")

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    n_det = st.gene_counts(adata)
    present = {"gene counts": best(lambda: st.gene_counts(adata)),
               "cytotrace": best(lambda: st.score_cytotrace(adata, n_detected=n_det)),
               "stem sets": best(lambda: st.score_stemness_sets(adata, sets)),
               "cell cycle": best(lambda: st.score_cell_cycle(adata, "human"))}
    new = {"depth-adjusted": best(lambda: st.depth_adjusted_gene_counts(adata, groupby="none", n_detected=n_det)),
           "entropy": best(lambda: st.transcriptional_entropy(adata)),
           "differentiation sets": best(lambda: st.score_differentiation_sets(adata, diff)),
           "programme+proliferation+rule": best(lambda: st.combine_stemness(
               adata.obs["cytotrace"].to_numpy(), st.programme_score(adata), st.proliferation_score(adata)))}
    return {"cells": adata.n_obs, "present": present, "new": new}


def validation_table() -> "pd.DataFrame":
    """Spearman of each score with the known differentiation order (negative = right), every dataset found.

    Datasets: HSMM myoblasts (Debian r-bioc-hsmmsinglecell; hours 0-72, all cells and the MYF5+/ANPEP-
    myoblasts), Ginhoux DC progenitors (MDP < CDP < PreDC), oligodendroglioma (malignant = 0, normal = 1),
    pbmc68k_reduced (CD34+ = 0, rest = 1; stemness.min_genes_for_gene_counts = 500 as in the tests), the
    simulated demo (true pseudotime), and the Treutlein 2014 lung panel shipped in Debian r-bioc-monocle
    (218 genes: a panel; E14.5 < E16.5 < E18.5 < adult). The same fixed rule everywhere.
    """
    import sys

    import pandas as pd
    from scipy.stats import spearmanr

    sys.path.insert(0, str(REPO / "tests"))
    from metastem import stemness as st
    from metastem.cluster import embed_and_cluster, normalize
    from metastem.smk.config import load_schema, validate_with_defaults

    cfg = validate_with_defaults({}, load_schema(REPO / "workflow/schemas/config.schema.yaml"), where="defaults")
    params = stemness_params()
    rows: dict[str, dict] = {}
    cols = ["stemness", "stemness_cytotrace", "stemness_gene_counts", "stemness_depth_adjusted", "stemness_entropy",
            "stemness_programme", "stemness_proliferation"]

    def score(name, adata, order, species, masks=None, **kw):
        info = st.score_stemness(adata, species=species, seed=0, **dict(params, **kw))
        for label, mask in (masks or {"all": np.ones(adata.n_obs, bool)}).items():
            r = {c: (float(spearmanr(adata.obs[c][mask], order[mask])[0]) if c in adata.obs
                     and adata.obs[c][mask].notna().all() else float("nan")) for c in cols}
            r.update(direction=info["direction"], agreement=info["agreement_cytotrace_vs_programme"],
                     method=info["method_used"], cells=int(mask.sum()))
            rows[f"{name} ({label})"] = r

    def clustered(adata, values, **cl):
        normalize(adata, values=values, target_sum=1e4)
        embed_and_cluster(adata, dict(cfg["cluster"], **cl), seed=0)
        return adata

    import test_stemness as t   # the tests' loaders, so the table and the tests read the data the same way

    if t.HSMM.is_dir():
        a = clustered(t.read_hsmm(), "normalized")
        myo = (a.obs["cell_type"] == "myoblast").to_numpy()
        score("HSMM myoblast time course", a, a.obs["hours"].to_numpy(float), "human",
              {"all": np.ones(a.n_obs, bool), "myoblasts": myo, "not fibroblasts": a.obs["cell_type"].ne("fibroblast").to_numpy()})
    shared = REPO.parent / "shared/datasets"
    if shared.is_dir():
        import anndata as ad
        import scipy.sparse as sp

        a = ad.read_h5ad(shared / "ginhoux_dc_progenitors.h5ad")
        a = clustered(a, "log", n_top_genes=params["n_variable_genes"])
        score("Ginhoux DC progenitors", a, a.obs["group"].map({"MDP": 0, "CDP": 1, "PreDC": 2}).to_numpy(float), "mouse")
        expr = pd.read_csv(shared / "oligodendroglioma_expression_downsampled.counts.matrix.gz", sep="\t", index_col=0)
        ann = pd.read_csv(shared / "oligodendroglioma_annotations_downsampled.txt", sep="\t", header=None, index_col=0)[1]
        a = ad.AnnData(sp.csr_matrix(expr.T.to_numpy(dtype=np.float32)),
                       obs=pd.DataFrame({"label": ann.loc[expr.columns].to_numpy()}, index=expr.columns),
                       var=pd.DataFrame(index=expr.index))
        a = clustered(a, "normalized")
        score("oligodendroglioma (malignant vs normal)", a,
              (~a.obs["label"].str.startswith("malignant")).to_numpy(float), "human")
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    a = pbmc.raw.to_adata()
    a.obs = pbmc.obs.copy()
    a = clustered(a, "log")
    score("pbmc68k (CD34+ vs rest)", a, (a.obs["bulk_labels"] != "CD34+").to_numpy(float), "human",
          min_genes_for_gene_counts=500)
    # r-bioc-monocle pulls ~600 packages; `apt-get download r-bioc-monocle && dpkg -x <deb> DIR` and
    # METASTEM_MONOCLE_EXTDATA=DIR/usr/lib/R/site-library/monocle/extdata reads the files without installing it
    lung = Path(os.environ.get("METASTEM_MONOCLE_EXTDATA", "/usr/lib/R/site-library/monocle/extdata"))
    if lung.is_dir():
        a = read_monocle_lung(lung)
        a = clustered(a, "normalized", n_top_genes=a.n_vars)
        score("Treutlein lung (218-gene panel)", a, a.obs["order"].to_numpy(float), "mouse", required=False)
    return pd.DataFrame(rows).T


def read_monocle_lung(folder: Path):
    """Treutlein et al. 2014 mouse lung epithelium as shipped in monocle's extdata (FPKM, 218 genes, 185 cells)."""
    import anndata as ad
    import pandas as pd
    import rdata
    import scipy.sparse as sp

    expr = rdata.read_rda(str(folder / "lung_exprs_data.RData"))["lung_exprs_data"]
    genes = rdata.read_rda(str(folder / "lung_feature_data.RData"))["lung_feature_data"]
    pheno = rdata.read_rda(str(folder / "lung_phenotype_data.RData"))["lung_phenotype_data"]
    cells = [str(c) for c in expr.coords["dim_1"].values]
    order = {"Embryonic day 14.5": 0, "Embryonic day 16.5": 1, "Embryonic day 18.5": 2, "post natal day 107": 3}
    symbols = genes.loc[[str(g) for g in expr.coords["dim_0"].values], "gene_short_name"].astype(str).to_numpy()
    adata = ad.AnnData(sp.csr_matrix(np.asarray(expr.values, dtype=np.float32).T),
                       obs=pd.DataFrame({"order": pheno.loc[cells, "age"].astype(str).map(order).to_numpy()}, index=cells),
                       var=pd.DataFrame(index=symbols))
    adata.var_names_make_unique()
    return adata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test (< 1 min)")
    parser.add_argument("--genes", type=int, default=2000, help="simulated genes (default 2000)")
    parser.add_argument("--ingredients", action="store_true",
                        help="time the issue-17 ingredients against the present CytoTRACE rule at 20k and 50k cells")
    parser.add_argument("--validate", action="store_true", help="Spearman with the known order on every dataset found")
    args = parser.parse_args()
    if args.validate:
        import pandas as pd

        with pd.option_context("display.width", 250, "display.max_columns", 20):
            print(validation_table().round(2).to_string())
        return
    if args.ingredients:
        for n in ((2000, 5000) if args.quick else (20_000, 50_000)):
            r = time_ingredients(n, args.genes)
            old, new = sum(r["present"].values()), sum(r["new"].values())
            print(f"{r['cells']} cells: present rule {old:.2f} s ({', '.join(f'{k} {v:.2f}' for k, v in r['present'].items())}); "
                  f"new ingredients {new:.2f} s ({', '.join(f'{k} {v:.2f}' for k, v in r['new'].items())}); "
                  f"ratio new/present {new / old:.2f}")
        return
    sizes = (1000, 4000) if args.quick else (10_000, 100_000)
    agree_cells = 500 if args.quick else 1500

    rows = [time_stemness(n, args.genes) for n in sizes]
    print(f"{'cells':>8} {'genes':>6} {'nnz(X)':>11} {'prep s':>7} {'stemness s':>10} {'peak MB':>8} {'method':>10} {'AUROC':>6}")
    for r in rows:
        print(f"{r['cells']:>8} {r['genes']:>6} {r['nnz_X']:>11} {r['prep_s']:>7.1f} {r['stemness_s']:>10.2f} "
              f"{r['peak_mb']:>8.0f} {r['method']:>10} {r['auroc_stem_like']:>6.3f}")
    a, b = rows
    slope_t = np.log(b["stemness_s"] / a["stemness_s"]) / np.log(b["cells"] / a["cells"])
    slope_m = np.log(b["peak_mb"] / a["peak_mb"]) / np.log(b["cells"] / a["cells"])
    print(f"log-log slope vs cells: time {slope_t:.2f}, peak memory {slope_m:.2f} (1.0 = linear)")

    g = agreement(agree_cells, args.genes)
    print(f"sparse vs dense CytoTRACE at {g['cells']} cells: Spearman {g['spearman']:.3f}; "
          f"time sparse {g['sparse_s']:.2f} s, dense {g['dense_s']:.2f} s; "
          f"AUROC(true_stem_like) sparse {g['auroc_sparse']:.3f}, dense {g['auroc_dense']:.3f}")


if __name__ == "__main__":
    main()
