"""The GPU speed paths (CUDA graph, bf16 autocast, channels_last, fused sampler kernel) keep the images."""
import numpy as np
import pytest
import torch

from pipeline.data.shards import verify_shards
from tests.generate.helpers import generate, read_samples, shard_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_graph_replays_the_eager_forward(uncond_run):
    from pipeline.checkpoint import load_for_inference
    from pipeline.generation.sampling import FastDenoiser

    model = load_for_inference(uncond_run, device="cuda").model
    eager = FastDenoiser(model)
    graphed = FastDenoiser(model, cuda_graph=True)
    for batch in (6, 6, 3):  # the second call replays the first graph; 3 captures another
        x = torch.randn(batch, 1, 8, 8, device="cuda")
        t = torch.randint(0, 1000, (batch,), device="cuda")
        with torch.no_grad():
            assert torch.allclose(graphed(x, t), eager(x, t), atol=1e-5, rtol=1e-5)


def test_graph_and_split_do_not_change_images_on_gpu(uncond_run, tmp_path):
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    common = ["--device", "cuda", "--precision", "fp32", "--shard-size", "6", "--sampler", "dpmpp"]
    assert generate(uncond_run, eager, 12, *common, "--no-cuda-graph") == 0
    for k in (0, 1):
        assert generate(uncond_run, graphed, 12, *common, "--cuda-graph", "--task-index", str(k),
                        "--num-tasks", "2") == 0
    assert verify_shards(graphed) == []
    a, b = read_samples(eager), read_samples(graphed)
    # Same arithmetic in and out of a graph; allow the rare 1-level rounding flip of a different kernel choice.
    diffs = [np.abs(x["image"].astype(int) - y["image"].astype(int)).max() for x, y in zip(a, b)]
    assert max(diffs) <= 1


def test_bf16_images_stay_close_to_fp32(uncond_run, tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert generate(uncond_run, fp32, 8, "--device", "cuda", "--precision", "fp32") == 0
    assert generate(uncond_run, bf16, 8, "--device", "cuda", "--precision", "bf16", "--batch-size", "3") == 0
    mean_abs = np.mean([np.abs(x["image"].astype(float) - y["image"].astype(float)).mean()
                        for x, y in zip(read_samples(fp32), read_samples(bf16))])
    assert mean_abs < 8.0  # of 255 levels: bf16 rounding, not a different image
    assert shard_bytes(bf16)  # and it wrote a complete set
