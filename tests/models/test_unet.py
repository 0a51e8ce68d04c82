"""UNet: shapes from 8x8 to 64x64, conditioning, label dropping, errors, and that a tiny one learns."""
import pytest
import torch

from pipeline.diffusion import make_schedule
from pipeline.diffusion.losses import training_losses
from pipeline.models import UNet, drop_labels

TINY = dict(base_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(4,), image_size=8)


def randomise_output(model: UNet) -> UNet:
    """Output layers start at zero (the model predicts 0); give them weights so that inputs show through."""
    torch.manual_seed(0)
    for p in model.parameters():
        if torch.all(p == 0):
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("channels,size,mult,attn", [(1, 8, (1, 2), (4,)), (3, 16, (1, 2), (8,)),
                                                      (1, 28, (1, 2), (14,)), (3, 32, (1, 2, 2), (8,)),
                                                      (3, 64, (1, 1, 2, 2), (8,))])
def test_shapes_and_zero_initialised_output(channels, size, mult, attn):
    model = UNet(channels, 16, mult, 1, attn, 0.1, None, size)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and torch.all(out == 0)
    randomise_output(model).eval()
    out = model(x, torch.tensor([0, 999]))
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_output_depends_on_time_and_class_and_null_class_is_default():
    model = randomise_output(UNet(1, num_classes=10, **TINY)).eval()
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([5, 500, 900])
    y = torch.tensor([1, 2, 3])
    base = model(x, t, y)
    assert (model(x, t + 50, y) - base).abs().max() > 1e-4
    assert (model(x, t, torch.tensor([4, 5, 6])) - base).abs().max() > 1e-4
    torch.testing.assert_close(model(x, t), model(x, t, torch.full((3,), 10)))
    assert torch.equal(model(x, t.float(), y), base)  # continuous t (the PF-ODE) embeds like integer t
    with pytest.raises(ValueError, match="class ids"):
        model(x, t, torch.tensor([0, 11, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(1, **TINY)(x, t, y)


def test_bad_configs_and_inputs_are_named():
    with pytest.raises(ValueError, match="not divisible"):
        UNet(1, 16, (1, 2, 2, 2), 1, (), 0.0, None, 12)
    with pytest.raises(ValueError, match="channel_mult"):
        UNet(1, 16, (), 1, (), 0.0, None, 8)
    with pytest.raises(ValueError, match="dropout"):
        UNet(1, 16, (1,), 1, (), 1.5, None, 8)
    with pytest.raises(ValueError, match="expects x of shape"):
        UNet(1, **TINY)(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.int64))


def test_drop_labels():
    y = torch.arange(10).repeat(2000)
    g = torch.Generator().manual_seed(0)
    dropped = drop_labels(y, 0.2, null_class=10, generator=g)
    changed = dropped != y
    assert torch.all(dropped[changed] == 10) and 0.18 < changed.float().mean() < 0.22
    assert torch.equal(drop_labels(y, 0.0, 10), y) and torch.all(drop_labels(y, 1.0, 10) == 10)
    assert torch.all(UNet(1, num_classes=10, **TINY).drop_labels(y[:5], 1.0) == 10)
    with pytest.raises(ValueError, match="probability"):
        drop_labels(y, 1.5, 10)


def test_tiny_config_is_small():
    assert sum(p.numel() for p in UNet(1, **TINY).parameters()) < 400_000


def test_tiny_unet_learns_digits(digits):
    """The DDPM loss on real digits falls well below its starting value (1.0 for a zero-output model)."""
    torch.manual_seed(0)
    model = UNet(1, **TINY)
    schedule = make_schedule("linear", 1000)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    data = digits[:256]
    history = []
    for step in range(50):
        idx = torch.randint(0, len(data), (32,))
        t = torch.randint(0, 1000, (32,))
        out = training_losses(model, data[idx], t, schedule, seed=0, sample_ids=idx, stream=1_000_000 + step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append(out.loss.item())
    assert history[0] == pytest.approx(1.0, abs=0.1)
    assert sum(history[-10:]) / 10 < 0.5, history
