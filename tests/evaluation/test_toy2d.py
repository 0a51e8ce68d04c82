"""Item 3: the 2-D known-density benchmark (points in shards -> training -> shared sampler) and its parts."""

import pytest
import torch

from pipeline.evaluation import EvaluationError, toy2d


@pytest.mark.parametrize("name", sorted(toy2d.DENSITIES))
def test_true_densities_integrate_to_one_and_match_their_samples(name):
    density = toy2d.make_density(name)
    grid = torch.linspace(-1.5, 1.5, 121, dtype=torch.float64)  # spacing 0.025: exact for std >= 0.04
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    cell = float(grid[1] - grid[0]) ** 2
    mass = float(density.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp().sum()) * cell
    assert mass == pytest.approx(1.0, abs=2e-3)
    # samples land where the density is: their mean log-density is the entropy's negative, which must
    # exceed that of points drawn uniformly over the same square
    points = density.sample(4000, torch.Generator().manual_seed(0))
    uniform = torch.rand(4000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3 - 1.5
    assert float(density.log_prob(points).mean()) > float(density.log_prob(uniform).mean()) + 2


def test_points_round_trip_through_shards_within_half_a_pixel(tmp_path):
    points = toy2d.ring_mixture().sample(1000, torch.Generator().manual_seed(0)).clamp(-1, 1)
    manifest = toy2d.write_point_shards(tmp_path / "pts", points, "ring8", per_shard=300)
    assert manifest["num_samples"] == 1000 and len(manifest["shards"]) == 4
    back = toy2d.read_points(tmp_path / "pts")
    assert back.shape == (1000, 2)
    assert float((back - points).abs().max()) <= 1 / 255 + 1e-9
    with pytest.raises(EvaluationError, match="must lie in"):
        toy2d.write_point_shards(tmp_path / "bad", points * 2, "ring8")


def test_ring_benchmark_converges(tmp_path):
    """The CI convergence test: a model trained from shards must beat fixed thresholds, far below the
    scores of a moment-matched Gaussian (what learning only mean and covariance gives)."""
    config = toy2d.ToyConfig(density="ring8", train_steps=1500, seed=0)
    result = toy2d.run_benchmark(tmp_path / "ring", config, num_eval=1000, samplers=(("dpmpp", 20),),
                                 ode_steps=50)
    samples, baseline, floor = result["dpmpp20"], result["gaussian_baseline"], result["floor"]
    assert samples["energy_distance"] < 0.002 and samples["energy_distance"] < 0.1 * baseline["energy_distance"]
    assert samples["mmd_rbf"] < 0.1 * baseline["mmd_rbf"]
    # samples sit on the modes: their true cross-entropy is within 1.5 nats of the true entropy
    assert samples["true_nll_of_samples"] - result["true_entropy"] < 1.5
    # the model's own density (probability-flow ODE) of true points: KL(p || model) well below the Gaussian's
    assert 0 < result["kl_estimate_t0"] < min(1.0, 0.5 * baseline["kl_estimate_t0"])
