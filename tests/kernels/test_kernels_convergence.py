"""Training a tiny denoiser with the fused kernels gives the loss curve of the torch reference."""
import pytest
import torch
from kernel_helpers import DEVICE
from sklearn.datasets import load_digits

import kernels

STEPS, BATCH, T = 10, 8, 1000  # each interpreted program that draws noise costs ~60 ms on CPU


class TinyDenoiser(torch.nn.Module):
    """Two 3x3 convolutions over (x_t, t / T): small enough for the interpreter, big enough to learn."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(2, 16, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(16, 1, 3, padding=1))

    def forward(self, x_t, t):
        time_plane = (t.float() / T).reshape(-1, 1, 1, 1).expand_as(x_t)
        return self.net(torch.cat([x_t, time_plane], dim=1))


def held_out_loss(model, digits, alpha_bars, target) -> float:
    """Reference loss on a fixed batch of 256 digits at fixed timesteps (torch path: cheap on CPU)."""
    t = torch.arange(256) * (T // 256)
    x0, alpha_bar, ids = digits[-256:].to(DEVICE), alpha_bars[t].to(DEVICE), torch.arange(256).to(DEVICE)
    with torch.no_grad():
        x_t = kernels.q_sample(x0, alpha_bar, 7, ids, 0, backend="torch")
        return kernels.diffusion_loss(model(x_t, t.to(DEVICE)), x0, alpha_bar, 7, ids, 0, target=target,
                                      backend="torch").loss.item()


def train_curve(backend: str, target: str) -> tuple[list[float], float, float]:
    """Loss per step over fresh batches, timesteps and noise (stream = 1e6 + step); held-out loss before/after."""
    torch.manual_seed(0)
    model = TinyDenoiser().to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    digits = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # real 8x8 digits
    alpha_bars = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T), 0)
    gen = torch.Generator().manual_seed(1)
    curve, before = [], held_out_loss(model, digits, alpha_bars, target)
    for step in range(STEPS):
        index = torch.randint(0, len(digits), (BATCH,), generator=gen)
        t = torch.randint(0, T, (BATCH,), generator=gen)
        x0, alpha_bar = digits[index].to(DEVICE), alpha_bars[t].to(DEVICE)
        ids = (step * BATCH + torch.arange(BATCH)).to(DEVICE)
        x_t = kernels.q_sample(x0, alpha_bar, 42, ids, 1_000_000 + step, backend=backend)
        out = kernels.diffusion_loss(model(x_t, t.to(DEVICE)), x0, alpha_bar, 42, ids, 1_000_000 + step,
                                     target=target, weights=alpha_bar.clamp(min=0.05), backend=backend)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        curve.append(out.loss.item())
    return curve, before, held_out_loss(model, digits, alpha_bars, target)


@pytest.mark.parametrize("target", ["eps"])  # x0 / v gradients are checked element by element elsewhere
def test_fused_training_follows_reference_curve(target):
    (fused, before, after), (reference, _, _) = train_curve("triton", target), train_curve("torch", target)
    assert after < 0.8 * before  # it learns
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(reference), atol=1e-4, rtol=1e-4)
