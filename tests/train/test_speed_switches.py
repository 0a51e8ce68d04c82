"""The speed switches (train.compile, train.channels_last) change how a step runs, never what it computes."""
import pytest
import torch

from pipeline.config import load_config
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
