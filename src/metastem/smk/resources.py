"""Memory and runtime requests per rule, from the dataset's size, growing with each retry.

Every rule's peak RSS and wall time grow about linearly in the matrix's stored non-zeros
(benchmarks/run.py; pseudotime and report in cells, which track them). The coefficients sit above the
per-rule peaks and times measured on the 2-core, 24 GB reference machine at 10k and 100k cells (17M and
174M non-zeros) and at 1.05M cells (774M non-zeros, the first complete million-cell run, 4408 s end to end
on a shared machine, benchmarks/run.py --sizes 1000000 --library-size 1100): peaks qc 12.7 GB, cluster
14.0, malignant 11.9, stemness 8.0, pseudotime 4.3, pathways 8.9, niche 7.5, report 2.1 GB; walls qc 20.2
min, cluster 28.4, malignant 3.3, stemness 6.3, pseudotime 8.7, pathways 5.7, niche 0.5. A retry asks for
1.5x more. The size is read from the input's headers, never by loading it.
"""
from __future__ import annotations

import os

# stage: (fixed MB, MB per million non-zeros, fixed minutes, minutes per million non-zeros)
_COEFFS = {
    "qc": (2600, 16.0, 5, 0.025),
    "cluster": (1100, 19.0, 5, 0.04),
    "malignant": (1500, 16.0, 5, 0.02),
    "stemness": (1000, 14.0, 5, 0.006),
    # the diffusion map's eigenvectors and PAGA grow with the graph: 4.3 GB and 8.7 min at 774M non-zeros
    "pseudotime": (500, 6.0, 5, 0.012),
    "pathways": (1700, 14.0, 5, 0.006),
    # niche (LIANA): reads X of final.h5ad, then works on <= max_cells_per_group cells per group (pooled and
    # per sample), so beyond reading X its cost is flat: 7.5 GB and 29 s at 774M non-zeros
    "niche": (2000, 9.0, 10, 0.003),
    # the report reads only obs and small tables, yet obs of 1M cells took 2.1 GB
    "report": (400, 2.5, 5, 0.0),
}
_DENSITY = 0.07  # fraction of non-zero entries assumed when only a file size is known (droplet data)
_BYTES_PER_NONZERO = 6  # compressed text / HDF5, for the same guess


def dataset_size(row: dict, params: dict) -> tuple[int, int, int]:
    """Cells, genes and stored non-zeros, without loading the matrix: simulator params, HDF5 headers, or a
    guess from the file size. A dataset of several samples (sheet rows) sums its samples' cells and
    non-zeros (they are concatenated); genes are the largest sample's."""
    samples = row.get("samples") or []
    if len(samples) > 1:
        sizes = [_input_size({**row, **s}, params) for s in samples]
        return sum(c for c, _, _ in sizes), max(g for _, g, _ in sizes), sum(z for _, _, z in sizes)
    return _input_size(row, params)


def _input_size(row: dict, params: dict) -> tuple[int, int, int]:
    """Cells, genes and non-zeros of one input file (or the simulator)."""
    fmt, path = row.get("format"), row.get("path", "")
    if fmt == "simulated":
        sim = params["simulate"]
        cells = int(sim["n_cells"] * (1 + sim["frac_doublets"]))
        genes = int(sim["n_genes"])
        # the simulator detects about 0.8 genes per unit of library size (1600 of 20k genes at 2000 UMIs)
        return cells, genes, int(cells * min(genes, 0.8 * sim["mean_library_size"]))
    try:
        if fmt in ("h5ad", "10x_h5") and os.path.isfile(path):
            import h5py

            with h5py.File(path, "r") as f:
                if fmt == "h5ad":
                    X = f["X"]
                    if isinstance(X, h5py.Dataset):  # dense
                        return int(X.shape[0]), int(X.shape[1]), int(X.shape[0]) * int(X.shape[1])
                    cells, genes = (int(v) for v in X.attrs["shape"])
                    return cells, genes, int(X["data"].shape[0])
                grp = f["matrix"] if "matrix" in f else f[list(f.keys())[0]]
                genes, cells = (int(v) for v in grp["shape"][()])
                return cells, genes, int(grp["data"].shape[0])
    except (OSError, KeyError, TypeError, IndexError, ValueError):
        pass
    size = 0
    if os.path.isdir(path):
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    elif os.path.isfile(path):
        size = os.path.getsize(path)
    nnz = max(size / _BYTES_PER_NONZERO, 1e5)
    genes = 20000
    return int(nnz / (_DENSITY * genes)) + 1, genes, int(nnz)


def estimate_resources(stage: str, nnz: int, attempt: int = 1) -> dict[str, int]:
    """mem_mb and runtime (minutes) for one job on a matrix with ``nnz`` stored values; each retry asks
    for 1.5x more."""
    mb0, mb_per, min0, min_per = _COEFFS[stage]
    mnnz = nnz / 1e6
    grow = 1.5 ** (attempt - 1)
    return {"mem_mb": int((mb0 + mb_per * mnnz) * grow), "runtime": int((min0 + min_per * mnnz) * grow) + 1}
