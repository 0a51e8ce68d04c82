"""Generation writes images of the model's height AND width (a toy2d model makes 1x2 images, not 1x1)."""
import torch

from pipeline.checkpoint import export_weights
from pipeline.config import load_config
from pipeline.factory import build_model
from tests.generate.helpers import generate, manifest, read_samples


def test_non_square_model_generates_its_own_shape(tmp_path):
    config = load_config("configs/toy2d.yaml", ["model.mlp_hidden=8", "diffusion.timesteps=50"])
    torch.manual_seed(0)
    export = export_weights(build_model(config).state_dict(), config, 0, tmp_path / "run")
    out = tmp_path / "gen"
    assert generate(export, out, 6, "--shard-size", "3", "--sampler", "dpmpp") == 0
    assert manifest(out)["image_size"] == [1, 2]
    assert {s["image"].shape for s in read_samples(out)} == {(1, 2)}
