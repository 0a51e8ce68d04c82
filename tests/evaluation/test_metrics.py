"""The metric functions against closed forms and independent implementations."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.evaluation import metrics


def gaussian(n, mean, std, dim, seed):
    return torch.from_numpy(np.random.default_rng(seed).normal(mean, std, size=(n, dim)))


def test_frechet_distance_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2)
                + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real))
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_isotropic_gaussians_matches_closed_form():
    # N(0, I) vs N(m, s^2 I) in d dims: d m^2 + d (1 - s)^2
    dim, shift, std = 4, 1.5, 2.0
    a, b = gaussian(20000, 0, 1, dim, 1), gaussian(20000, shift, std, dim, 2)
    assert metrics.frechet_distance(a, b) == pytest.approx(dim * shift ** 2 + dim * (1 - std) ** 2, rel=0.03)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_shift():
    a, b, c = gaussian(600, 0, 1, 8, 3), gaussian(600, 0, 1, 8, 4), gaussian(600, 0.5, 1, 8, 5)
    same, same_std = metrics.kid(a, b, subset_size=300, num_subsets=20)
    shifted, _ = metrics.kid(a, c, subset_size=300, num_subsets=20)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 10 * max(abs(same), same_std)


def test_precision_recall_separate_fidelity_from_diversity():
    real = gaussian(1000, 0, 1, 2, 6)
    narrow = gaussian(1000, 0, 0.2, 2, 7)  # all plausible, little variety
    far = gaussian(1000, 6, 1, 2, 8)  # nothing plausible
    precision, recall = metrics.knn_precision_recall(real, narrow)
    assert precision > 0.95 and recall < 0.3
    precision_far, _ = metrics.knn_precision_recall(real, far)
    assert precision_far < 0.05


def test_label_statistics_of_collapsed_and_uniform_predictions():
    collapsed = torch.zeros(100, 10, dtype=torch.float64)
    collapsed[:, 3] = 1
    stats = metrics.label_statistics(collapsed)
    assert stats == {"mean_entropy_bits": 0.0, "marginal_entropy_bits": 0.0, "class_coverage": 0.1}
    uniform = torch.eye(10, dtype=torch.float64).repeat(10, 1)
    assert metrics.label_statistics(uniform)["class_coverage"] == 1.0
    assert metrics.label_statistics(uniform)["marginal_entropy_bits"] == pytest.approx(math.log2(10))
    assert metrics.label_statistics(torch.full((5, 4), 0.25, dtype=torch.float64))["mean_entropy_bits"] == 2.0


def test_energy_distance_and_mmd_match_brute_force():
    a, b = gaussian(60, 0, 1, 2, 9).numpy(), gaussian(50, 0.3, 1.2, 2, 10).numpy()
    dist = lambda u, v: np.sqrt(((u[:, None] - v[None]) ** 2).sum(-1))  # noqa: E731
    off = lambda m: m[~np.eye(len(m), dtype=bool)].mean()  # noqa: E731 - mean over i != j
    expected_energy = 2 * dist(a, b).mean() - off(dist(a, a)) - off(dist(b, b))
    assert metrics.energy_distance(a, b) == pytest.approx(expected_energy, rel=1e-9)
    k = lambda u, v: sum(np.exp(-dist(u, v) ** 2 / (2 * h * h)) for h in (0.5, 2.0))  # noqa: E731
    expected_mmd = off(k(a, a)) + off(k(b, b)) - 2 * k(a, b).mean()
    assert metrics.mmd_rbf(a, b, bandwidths=(0.5, 2.0)) == pytest.approx(expected_mmd, rel=1e-9)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        metrics.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="2-D array"):
        metrics.energy_distance(np.zeros(5), np.zeros((5, 1)))
    with pytest.raises(ValueError, match="k=3 needs more than 3 samples"):
        metrics.knn_precision_recall(np.zeros((3, 2)), np.ones((10, 2)))
