"""The loss objects: each draws its own timesteps, label dropout and noise, keyed by global sample id."""
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import load_config
from pipeline.factory import build_loss, build_model
from pipeline.loss import BatchSlice, DiffusionLoss, VAELoss


class Recorder(torch.nn.Module):
    """A linear denoiser that remembers the timesteps and labels it was called with."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append((t.clone(), None if y is None else y.clone()))
        return self.scale * x


@pytest.mark.parametrize("overrides", [[], ["model.num_classes=4", "model.p_uncond=0.5"],
                                       ["diffusion.prediction=v", "diffusion.weighting=min_snr"]])
def test_any_split_of_a_global_batch_gives_the_same_draws_and_loss(overrides):
    config = load_config("configs/tiny.yaml", overrides)
    loss = build_loss(config, torch.device("cpu"))
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(8) % 4
    whole, parts = Recorder(), Recorder()
    full, _ = loss(whole, images, labels, BatchSlice(step=3, total=8, lo=0, hi=8))
    halves = [loss(parts, images[lo:lo + 4], labels[lo:lo + 4], BatchSlice(3, 8, lo, lo + 4))[0] for lo in (0, 4)]
    assert torch.allclose(full, (halves[0] + halves[1]) / 2, rtol=1e-5, atol=1e-7)
    (t_all, y_all), (t_lo, y_lo), (t_hi, y_hi) = whole.calls[0], *parts.calls
    assert torch.equal(t_all, torch.cat([t_lo, t_hi]))
    if y_all is not None:
        assert torch.equal(y_all, torch.cat([y_lo, y_hi]))
        assert (y_all == 4).any() and (y_all != 4).any()  # label dropout to the null class happened, not always
    other, _ = loss(Recorder(), images, labels, BatchSlice(step=4, total=8, lo=0, hi=8))
    assert not torch.equal(full, other)  # the next step draws anew


def test_vae_loss_is_the_elbo_with_the_configs_beta():
    config = load_config("configs/tiny_vae.yaml", ["model.kl_weight=0.25"])
    loss = build_loss(config, torch.device("cpu"))
    assert isinstance(loss, VAELoss) and loss.beta == 0.25
    torch.manual_seed(0)
    vae = build_model(config)
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.manual_seed(1)
    value, metrics = loss(SimpleNamespace(module=vae), images, torch.zeros(4, dtype=torch.int64), BatchSlice(0, 4, 0, 4))
    torch.manual_seed(1)
    expected, _ = vae.loss(images, beta=0.25)
    assert torch.equal(value, expected) and metrics and all(isinstance(v, float) for v in metrics.values())


def test_ddpm_config_builds_the_diffusion_loss():
    assert isinstance(build_loss(load_config("configs/tiny.yaml"), torch.device("cpu")), DiffusionLoss)
