"""Memory and runtime requests per rule, from the dataset's size, growing with each retry.

Peak RSS and wall time grow about linearly in non-zeros (benchmarks/run.py, slopes 0.7-1.0 from 100k to
250k cells). The coefficients sit above the peaks measured there on the 2-core reference machine
(105k cells, 174M non-zeros: qc 5.9 GB, cluster 4.1, stemness 5.4, pathways 3.9, pseudotime 0.7), so a
first attempt rarely fails; a retry asks for 1.5x more.
"""
from __future__ import annotations

import os

# stage: (fixed MB, MB per million non-zeros, fixed minutes, minutes per million non-zeros)
_COEFFS = {
    "qc": (1500, 60.0, 5, 0.05),
    "cluster": (1500, 70.0, 10, 0.10),
    "stemness": (1200, 45.0, 5, 0.03),
    "pseudotime": (1200, 25.0, 5, 0.03),
    "pathways": (1500, 40.0, 10, 0.05),
    "report": (800, 2.0, 5, 0.0),
}
_DENSITY = 0.07  # typical fraction of non-zero entries in droplet data


def dataset_shape(row: dict, params: dict) -> tuple[int, int]:
    """Cells x genes without loading the matrix: simulator params, HDF5 headers, or file size."""
    fmt, path = row.get("format"), row.get("path", "")
    if fmt == "simulated":
        return int(params["simulate"]["n_cells"] * (1 + params["simulate"]["frac_doublets"])), int(params["simulate"]["n_genes"])
    try:
        if fmt in ("h5ad", "10x_h5") and os.path.isfile(path):
            import h5py

            with h5py.File(path, "r") as f:
                if fmt == "h5ad":
                    X = f["X"]
                    shape = X.attrs.get("shape", getattr(X, "shape", None))
                    return int(shape[0]), int(shape[1])
                grp = f["matrix"] if "matrix" in f else f[list(f.keys())[0]]
                genes, cells = grp["shape"][()]
                return int(cells), int(genes)
    except (OSError, KeyError, TypeError, IndexError):
        pass
    size = 0
    if os.path.isdir(path):
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    elif os.path.isfile(path):
        size = os.path.getsize(path)
    nnz = max(size / 6, 1e5)  # ~6 bytes per non-zero in compressed text/HDF5
    genes = 20000
    return int(nnz / (_DENSITY * genes)) + 1, genes


def estimate_resources(stage: str, n_cells: int, n_genes: int, attempt: int = 1) -> dict[str, int]:
    """mem_mb and runtime (minutes) for one job; each retry asks for 1.5x more."""
    mb0, mb_per, min0, min_per = _COEFFS[stage]
    mnnz = n_cells * min(n_genes, 20000) * _DENSITY / 1e6
    grow = 1.5 ** (attempt - 1)
    return {"mem_mb": int((mb0 + mb_per * mnnz) * grow), "runtime": int((min0 + min_per * mnnz) * grow) + 1}
