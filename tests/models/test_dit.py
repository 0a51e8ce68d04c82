"""DiT: shapes, zero-initialised output, conditioning, config errors, and training through the real trainer."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from pipeline.models.dit import DiT
from tests.train.conftest import REPO, read_log, run_training

TINY = dict(hidden=32, depth=2, heads=4)


def randomise_zero_layers(model):
    """adaLN-Zero layers start at zero (the model is the identity and predicts 0): give them weights."""
    torch.manual_seed(0)
    for p in model.parameters():
        if torch.all(p == 0):
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


@pytest.mark.parametrize("channels,size,patch", [(1, 8, 2), (4, 4, 1), (3, (4, 12), 4), (1, 28, 4)])
def test_shapes_and_zero_initialised_output(channels, size, patch):
    model = DiT(channels, size, patch, **TINY)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, channels, h, w)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and torch.all(out == 0)
    out = randomise_zero_layers(model)(x, torch.tensor([0, 999]))
    assert torch.isfinite(out).all() and out.abs().min() > 0  # every pixel of every patch is written


def test_unpatchify_puts_each_patch_back_where_it_came_from():
    """With the blocks' gates at zero and an output layer that copies the patch's own pixels, DiT is a map
    x -> x (patch by patch): any mix-up of patch positions or channels would show."""
    model = DiT(3, (4, 6), 2, hidden=12, depth=1, heads=1)
    with torch.no_grad():
        model.patchify.weight.copy_(torch.eye(12).reshape(12, 2, 2, 3).permute(0, 3, 1, 2))  # (out, c, ph, pw)
        model.patchify.bias.zero_()
        model.positions.zero_()
        model.out.weight.copy_(torch.eye(12))
    model.blocks[0].modulation.weight.data.zero_()
    x = torch.randn(2, 3, 4, 6)
    with torch.no_grad():
        tokens = model.patchify(x).flatten(2).transpose(1, 2)
        # the final LayerNorm normalises each token: compare against the normalised patches
        expected_tokens = torch.nn.functional.layer_norm(tokens, (12,), eps=1e-6)
        out = model(x, torch.tensor([3, 4]))
    patches = out.reshape(2, 3, 2, 2, 3, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 6, 12)
    torch.testing.assert_close(patches, expected_tokens)


def test_output_depends_on_time_and_class_and_null_class_is_default():
    model = randomise_zero_layers(DiT(1, 8, 2, num_classes=10, **TINY))
    x = torch.randn(3, 1, 8, 8)
    t, y = torch.tensor([5, 500, 900]), torch.tensor([1, 2, 3])
    base = model(x, t, y)
    assert (model(x, t + 50, y) - base).abs().max() > 1e-4
    assert (model(x, t, torch.tensor([4, 5, 6])) - base).abs().max() > 1e-4
    torch.testing.assert_close(model(x, t), model(x, t, torch.full((3,), 10)))
    with pytest.raises(ValueError, match="class ids"):
        model(x, t, torch.tensor([0, 11, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        DiT(1, 8, 2, **TINY)(x, t, y)
    with pytest.raises(ValueError, match="expects x of shape"):
        model(torch.zeros(2, 1, 6, 6), t[:2])
    with pytest.raises(ValueError, match="patch size 3 does not divide"):
        DiT(1, 8, 3, **TINY)


def test_patch_size_that_does_not_divide_the_resolution_is_one_line_exit_2(tmp_path, digits_shards):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", "configs/tiny.yaml", "--out",
                           str(tmp_path / "run"), f"data.shards={digits_shards}", "model.network=dit",
                           "model.patch_size=3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config key model.patch_size: 3 does not divide the image size 8x8 (data.resolution/data.width)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (3, "bf16")])
def test_dit_trains_through_the_real_trainer(tmp_path, digits_shards, stage, precision):
    run = tmp_path / "run"
    run_training(run, digits_shards, "model.network=dit", "model.dit_hidden=32", "model.dit_depth=2",
                 "model.num_classes=10", f"train.zero_stage={stage}", f"train.precision={precision}",
                 "train.steps=40", "train.lr=1e-3", "train.ckpt_every=1000")
    log = read_log(run)
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    from pipeline.checkpoint import load_for_inference
    from pipeline.generation.sampling import sample_images
    from pipeline.generation.settings import default_sampling

    inference = load_for_inference(run)
    assert isinstance(inference.model, DiT)
    images = sample_images(inference, range(4), dataclasses.replace(default_sampling(inference.config), steps=4))
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
