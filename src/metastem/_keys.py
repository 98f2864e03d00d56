"""Key names, defined once: AnnData slots the library writes and the files stages hand each other.

Like scanpy's ``_keys`` or CellRank's ``Key``: a function writes under a ``key_added`` whose default is
one of these, and a later stage (or a notebook) reads the same constant instead of repeating a string.
Renaming a key is then one edit here, and a test checks that the workflow's contracts
(docs/CONTRACTS.md) name only keys defined here.
"""
from __future__ import annotations


class Obs:
    """Per-cell columns (``adata.obs``)."""

    SAMPLE = "sample"
    LEIDEN = "leiden"
    KNN_COMPONENT = "knn_component"
    N_GENES = "n_genes_by_counts"
    TOTAL_COUNTS = "total_counts"
    PCT_MT = "pct_counts_mt"
    PCT_HB = "pct_counts_hb"
    PCT_ERCC = "pct_counts_ercc"
    DOUBLET_SCORE = "doublet_score"
    MALIGNANT = "malignant"
    MALIGNANT_EVIDENCE = "malignant_evidence"
    CNV_SCORE = "cnv_score"
    CNV_REFERENCE = "cnv_reference"   # compartment/label of the CNV reference cells, '' for the others
    STEMNESS = "stemness"
    STEMNESS_CYTOTRACE = "stemness_cytotrace"
    STEMNESS_GENE_COUNTS = "stemness_gene_counts"
    STEMNESS_SIGNATURE = "stemness_signature"
    S_SCORE = "S_score"
    G2M_SCORE = "G2M_score"
    PHASE = "phase"
    CSC_LIKE = "csc_like"
    PSEUDOTIME = "pseudotime"
    PSEUDOTIME_REACHABLE = "pseudotime_reachable"
    # DPT within each sample's malignant cells, rooted in its CSC-like cells; 0-1 per sample (issue 15)
    PSEUDOTIME_MALIGNANT = "pseudotime_malignant"
    PATHWAY_PREFIX = "pathway_"
    STEMNESS_SET_PREFIX = "stemness_set_"
    # stemness ingredients (issue 17): each is rank-scaled, 1 = least differentiated
    STEMNESS_DEPTH_ADJUSTED = "stemness_depth_adjusted"
    STEMNESS_ENTROPY = "stemness_entropy"
    STEMNESS_PROGRAMME = "stemness_programme"
    STEMNESS_PROLIFERATION = "stemness_proliferation"
    STEMNESS_DIFF_SET_PREFIX = "stemness_diffset_"
    STEMNESS_WITHIN = "stemness_within"  # the score within compartments, shape kept (CSC-like calls)
    NICHE_GROUP = "niche_group"  # the cell group of the niche ligand-receptor analysis (metastem.niche)


class Obsm:
    """Per-cell matrices (``adata.obsm``): numpy arrays only, so that cellxgene and scanpy read them."""

    PCA = "X_pca"
    PCA_HARMONY = "X_pca_harmony"
    UMAP = "X_umap"
    DIFFMAP = "X_diffmap"
    UMAP_PAGA = "X_umap_paga"     # UMAP initialised from the PAGA layout (pseudotime stage)


class Uns:
    """Unstructured annotations (``adata.uns``)."""

    METASTEM = "metastem"          # dataset, species, values, labels, params_json (workflow provenance)
    LOG1P = "log1p"                # scanpy's: {'base': None (e) | 2 | 10 ...}
    LOG_BASE_RULE = "log_base_rule"  # how the base of log input was known (metastem.io.resolve_log_base)
    GENE_MAPPING = "gene_mapping"  # how gene names became current symbols (metastem.genes.map_gene_names)
    PAGA = "paga"
    IROOT = "iroot"
    DIFFMAP_EVALS = "diffmap_evals"
    MARKERS = "rank_genes_groups"
    STEMNESS = "stemness"
    PSEUDOTIME = "pseudotime"
    PSEUDOTIME_ROOT = "pseudotime_root"  # the root cell, how it was chosen, the candidates
    PSEUDOTIME_MALIGNANT = "pseudotime_malignant"  # per sample: cells ordered, root, why, notes (JSON text)
    PATHWAYS = "pathways"
    NICHE = "niche"
    MALIGNANT = "malignant"        # evidence, rule, notes, reference cells of the malignant call
    CNV = "cnv"                    # infercnvpy's chr_pos (window index where each chromosome starts)


class Files:
    """Files one stage writes for another, relative to ``{outdir}/{dataset}/``."""

    QC_H5AD = "qc/qc.h5ad"
    CLUSTERED_H5AD = "cluster/clustered.h5ad"
    MALIGNANT_CELLS = "malignant/cells.tsv.gz"
    STEMNESS_CELLS = "stemness/cells.tsv.gz"
    PSEUDOTIME_CELLS = "pseudotime/cells.tsv.gz"
    PSEUDOTIME_ANNOTATIONS = "pseudotime/annotations.h5ad"
    FINAL_H5AD = "final.h5ad"
    REPORT = "report.html"
    NICHE_INTERACTIONS = "tables/niche_interactions.tsv"
    NICHE_FIGURE = "figures/niche_interactions.png"
    NICHE_INFO = "niche/info.json"
