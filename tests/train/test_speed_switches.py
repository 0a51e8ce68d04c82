"""The speed switches (train.compile, train.channels_last, train.fused_norm) change how a step runs, never what it
computes."""
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.factory import build_model
from tests.train.conftest import FAST, read_log, run_training
from tests.train.test_trainer import assert_same_weights, model_states


@pytest.mark.parametrize("model", ["ddpm", "vae"])
def test_compiled_channels_last_training_matches_eager(tmp_path, digits_shards, model):
    steps = ["train.steps=5", "train.ckpt_every=5", *(["model.type=vae", "train.lr=1e-3"] if model == "vae" else [])]
    run_training(tmp_path / "eager", digits_shards, *steps)
    fast = run_training(tmp_path / "fast", digits_shards, *steps, "train.compile=true", "train.channels_last=true")
    assert "train.compile: torch.compile runs during the first step" in fast.stderr  # the wait is announced
    eager_log, fast_log = read_log(tmp_path / "eager"), read_log(tmp_path / "fast")
    assert [r["step"] for r in fast_log] == [r["step"] for r in eager_log] == [1, 2, 3, 4, 5]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in fast_log]),
                               torch.tensor([r["loss"] for r in eager_log]), rtol=1e-4, atol=1e-6)
    _, eager_module, eager_ema = model_states(tmp_path / "eager")
    _, fast_module, fast_ema = model_states(tmp_path / "fast")
    assert_same_weights(eager_module, fast_module, atol=1e-4)  # the same names: compiled in place
    assert_same_weights(eager_ema, fast_ema, atol=1e-4)


def test_fused_norm_switch_reaches_the_norms_and_trains_the_same(tmp_path, digits_shards, monkeypatch):
    """train.fused_norm with the kernels in Triton's interpreter (on CPU the switch alone keeps the torch ops):
    the weights differ (float32 sums in another order: the kernel really ran) by float rounding only."""
    monkeypatch.setenv("DIFFUSION_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    steps = ["train.steps=3", "train.ckpt_every=3", "train.micro_batch=2", "train.loss_backend=torch"]
    run_training(tmp_path / "eager", digits_shards, *steps)
    run_training(tmp_path / "fused", digits_shards, *steps, "train.fused_norm=true")
    _, eager_module, eager_ema = model_states(tmp_path / "eager")
    _, fused_module, fused_ema = model_states(tmp_path / "fused")
    assert any(not torch.equal(eager_module[k], fused_module[k]) for k in eager_module)
    assert_same_weights(eager_module, fused_module, atol=1e-5)
    assert_same_weights(eager_ema, fused_ema, atol=1e-5)


def test_fused_norm_is_refused_for_a_network_without_group_norm():
    with pytest.raises(ConfigError, match="train.fused_norm: true needs GroupNorm layers to fuse .* model.network dit"):
        load_config("configs/tiny.yaml", ["model.network=dit", "model.patch_size=2", "train.fused_norm=true"])


def test_channels_last_switch_makes_every_convolution_channels_last_and_keeps_contiguous_weights():
    """Even for 1-channel images (contiguous and channels_last at once, so torch would keep the contiguous
    format); the weights stay contiguous, as DeepSpeed's broadcast and ZeRO's flat buffers need them."""
    from pipeline.train import channels_last_activations

    model = build_model(load_config("configs/tiny.yaml", FAST)).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 100, 999])

    def conv_output_layouts(images):
        layouts = []
        hooks = [m.register_forward_hook(lambda m, i, out: layouts.append(
            out.is_contiguous(memory_format=torch.channels_last))) for m in model.modules()
            if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            out = model(images, t)
        for hook in hooks:
            hook.remove()
        return out, layouts

    reference, layouts = conv_output_layouts(x)
    assert layouts and not all(layouts)  # without the switch: contiguous activations
    channels_last_activations(model)  # its hooks run before those registered after it
    fast, layouts = conv_output_layouts(x.contiguous(memory_format=torch.channels_last))
    assert len(layouts) > 5 and all(layouts)
    assert all(p.is_contiguous() for p in model.parameters())
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
