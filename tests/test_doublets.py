"""metastem.doublets is Scrublet: same scores as scanpy's sc.pp.scrublet within its own seed-to-seed noise."""
import numpy as np
import pytest
import scanpy as sc
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from metastem import doublets
from metastem.simulate import simulate_tumour


@pytest.fixture(scope="module")
def tumour():
    return simulate_tumour(3000, 4000, seed=3, n_samples=1)


def _scanpy(adata, seed):
    tmp = adata.copy()
    sc.pp.scrublet(tmp, expected_doublet_rate=0.05, random_state=seed, mean_center=False, n_neighbors=30,
                   sim_doublet_ratio=1.0, use_approx_neighbors=False, verbose=False)
    return tmp.obs["doublet_score"].to_numpy()


def test_scores_agree_with_scanpy_scrublet(tumour):
    ours = doublets.scrublet_scores(tumour.X, expected_rate=0.05, sim_ratio=1.0, n_neighbors=30, seed=0)
    theirs, theirs_other_seed = _scanpy(tumour, 0), _scanpy(tumour, 1)
    rho, noise = spearmanr(ours["scores"], theirs)[0], spearmanr(theirs, theirs_other_seed)[0]
    truth = tumour.obs["true_doublet"].to_numpy(bool)
    auc_ours, auc_theirs = roc_auc_score(truth, ours["scores"]), roc_auc_score(truth, theirs)
    print(f"Spearman ours vs scanpy {rho:.3f} (scanpy seed 0 vs 1: {noise:.3f}); AUROC {auc_ours:.3f} vs {auc_theirs:.3f}")
    assert rho >= noise - 0.03  # as close to scanpy as scanpy is to itself with another seed
    assert auc_ours >= auc_theirs - 0.02
    assert ours["threshold"] is not None and ours["scores_sim"].size == tumour.n_obs
    called = ours["scores"] > ours["threshold"]
    assert truth[called].mean() > 3 * truth.mean()  # calls are enriched for true doublets


def test_scores_are_deterministic_and_seeded(tumour):
    a = doublets.scrublet_scores(tumour.X, seed=4)["scores"]
    np.testing.assert_array_equal(a, doublets.scrublet_scores(tumour.X, seed=4)["scores"])
    assert not np.array_equal(a, doublets.scrublet_scores(tumour.X, seed=5)["scores"])


def test_too_few_variable_genes_is_a_value_error():
    X = np.ones((200, 5))
    with pytest.raises(ValueError, match="variable genes"):
        doublets.scrublet_scores(X)
