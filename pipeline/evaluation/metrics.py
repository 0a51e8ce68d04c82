"""Two-sample metrics on feature vectors or points: Fréchet distance, KID, k-NN precision/recall, energy
distance, MMD, and label statistics of a classifier on a generated set.

All take float64 tensors shaped (N, D) (numpy arrays are accepted) and return Python floats, so they serve
both the image feature spaces and the 2-D known-density benchmark.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _as_tensor(x) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.ndim != 2 or len(t) < 2:
        raise ValueError(f"expected a 2-D array with at least 2 rows (samples x dims), got shape {tuple(t.shape)}")
    return t


def _check_pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_tensor(a), _as_tensor(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return a, b


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a, b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussian fits of two feature sets.

    Tr((S_a S_b)^1/2) is computed as the trace of (S_a^1/2 S_b S_a^1/2)^1/2, a symmetric PSD matrix, which
    avoids the complex round-off a general sqrtm of the non-symmetric product gives.
    """
    a, b = _check_pair(a, b)
    mean_term = (a.mean(0) - b.mean(0)).square().sum()
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float(mean_term + cov_a.trace() + cov_b.trace() - 2 * cross)


def _mmd2_unbiased(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor) -> torch.Tensor:
    m, n = len(k_xx), len(k_yy)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * k_xy.mean()


def kid_subset_size(num_a: int, num_b: int, subset_size: int = 1000) -> int:
    """At most half of each set, so the subsets differ and their spread says something."""
    return max(2, min(subset_size, num_a // 2, num_b // 2))


def kid(a, b, subset_size: int = 1000, num_subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD^2 with the cubic kernel (x.y/d + 1)^3, mean and std over
    random subsets of min(subset_size, half of each set). Unlike the Fréchet distance it is unbiased at
    small sample counts."""
    a, b = _check_pair(a, b)
    size = kid_subset_size(len(a), len(b), subset_size)
    gen = torch.Generator().manual_seed(seed)
    dim = a.shape[1]
    values = []
    a32, b32 = a.float(), b.float()  # float32 kernels: several times faster, and torch sums them pairwise

    def kernel(u, v):
        return (torch.addmm(torch.ones(()), u, v.T, alpha=1.0 / dim)).pow_(3)

    for _ in range(num_subsets):
        x = a32[torch.randperm(len(a), generator=gen)[:size]]
        y = b32[torch.randperm(len(b), generator=gen)[:size]]
        values.append(float(_mmd2_unbiased(kernel(x, x), kernel(y, y), kernel(x, y))))
    return float(np.mean(values)), float(np.std(values))


def _kth_neighbour_radius(points: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance of each point to its k-th nearest other point (the point itself is at distance 0)."""
    radii = [torch.cdist(points[i:i + chunk], points).kthvalue(k + 1, dim=1).values
             for i in range(0, len(points), chunk)]
    return torch.cat(radii)


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                     chunk: int = 2048) -> float:
    inside = [(torch.cdist(queries[i:i + chunk], centres) <= radii[None]).any(dim=1)
              for i in range(0, len(queries), chunk)]
    return float(torch.cat(inside).double().mean())


def knn_precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019): the manifold of a set is the union of balls
    reaching each point's k-th neighbour. Precision = share of fake inside the real manifold (fidelity),
    recall = share of real inside the fake manifold (diversity)."""
    real, fake = _check_pair(real, fake)
    if k >= min(len(real), len(fake)):
        raise ValueError(f"k={k} needs more than {k} samples in each set (got {len(real)} real, {len(fake)} fake)")
    real32, fake32 = real.float(), fake.float()
    precision = _fraction_inside(fake32, real32, _kth_neighbour_radius(real32, k))
    recall = _fraction_inside(real32, fake32, _kth_neighbour_radius(fake32, k))
    return precision, recall


def label_statistics(probs, coverage_share: float = 0.5) -> dict[str, float]:
    """What the domain classifier says about a set, from its class probabilities (N, K):
    - `mean_entropy_bits`: average per-sample prediction entropy (low = confidently recognisable images),
    - `marginal_entropy_bits`: entropy of the predicted-class histogram (log2 K = all classes equally often),
    - `class_coverage`: share of classes predicted for at least `coverage_share` of their uniform share N/K,
      so a collapsed set with a few stray predictions does not count as covering a class."""
    p = _as_tensor(probs)
    num_classes = p.shape[1]
    per_sample = -(p * p.clamp_min(1e-30).log2()).sum(1)
    histogram = torch.bincount(p.argmax(1), minlength=num_classes).double() / len(p)
    marginal = -(histogram * histogram.clamp_min(1e-30).log2()).sum()
    covered = (histogram >= coverage_share / num_classes).double().mean()
    return {"mean_entropy_bits": float(per_sample.mean()), "marginal_entropy_bits": float(marginal),
            "class_coverage": float(covered)}


def _exact_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # the default matmul form loses ~1e-8 relative, too much for small differences of large means
    return torch.cdist(u, v, compute_mode="donot_use_mm_for_euclid_dist")


def energy_distance(a, b) -> float:
    """2 E|X-Y| - E|X-X'| - E|Y-Y'| (Székely): zero iff the distributions agree; within-set terms unbiased."""
    a, b = _check_pair(a, b)
    d_ab, d_aa, d_bb = _exact_distances(a, b), _exact_distances(a, a), _exact_distances(b, b)
    m, n = len(a), len(b)
    return float(2 * d_ab.mean() - d_aa.sum() / (m * (m - 1)) - d_bb.sum() / (n * (n - 1)))


def mmd_rbf(a, b, bandwidths: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)) -> float:
    """Unbiased MMD^2 with a sum of Gaussian kernels at fixed bandwidths (fixed, so values compare across runs)."""
    a, b = _check_pair(a, b)

    def kernel(u, v):
        sq = _exact_distances(u, v).square()
        return sum(torch.exp(-sq / (2 * h * h)) for h in bandwidths)

    return float(_mmd2_unbiased(kernel(a, a), kernel(b, b), kernel(a, b)))


def psnr(reference: torch.Tensor, estimate: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-sample peak signal-to-noise ratio in dB (images in [0, data_range])."""
    mse = (reference - estimate).double().flatten(1).square().mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-20))


def bits_per_dim(nats_per_sample: torch.Tensor, dims: int) -> torch.Tensor:
    return nats_per_sample / (dims * math.log(2))
