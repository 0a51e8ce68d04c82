"""Latent diffusion end to end on the real digits: a real VAE -> `encode` -> a latent DDPM -> decoded samples.

Everything runs as a user runs it (subprocesses of `python -m pipeline` / `python -m launch`, the real DeepSpeed
trainer, submitit's local executor for the array).
"""
import io
import json

import numpy as np
import pytest
import torch

from pipeline.checkpoint import load_for_inference
from pipeline.data import shards
from pipeline.data.loader import decode_image
from tests.generate.conftest import run_module

# two exports: the last one encodes; the one at step 10 is "another VAE" for the mismatch test
VAE = ["model.base_channels=8", "train.micro_batch=32", "train.steps=25", "train.sample_every=0",
       "train.log_every=5", "train.warmup_steps=2", "train.ckpt_every=10", "train.keep_last=1"]
LDM = ["model.base_channels=8", "train.micro_batch=16", "train.steps=30", "train.sample_every=0",
       "train.log_every=5", "train.warmup_steps=2", "diffusion.sample_steps=4", "train.num_sample_images=4"]


def train_vae(out, digits_shards):
    run_module("pipeline", "train", "--config", "configs/tiny_vae.yaml", "--out", str(out),
               f"data.shards={digits_shards}", *VAE)
    return out


def encode(vae, data, out, *extra, check=True):
    return run_module("pipeline", "encode", "--vae", str(vae), "--data", str(data), "--out", str(out),
                      "--shard-size", "400", "--batch-size", "128", *extra, check=check)


def read_samples(folder):
    import webdataset as wds

    paths = [str(p) for p in shards.shard_paths(folder)]
    return list(wds.WebDataset(paths, shardshuffle=False, nodesplitter=lambda urls: urls, empty_check=False))


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, digits_shards):
    return train_vae(tmp_path_factory.mktemp("vae") / "vae", digits_shards)


@pytest.fixture(scope="module")
def latents(tmp_path_factory, vae_run, digits_shards):
    out = tmp_path_factory.mktemp("latents") / "latents"
    encode(vae_run, digits_shards, out)
    return out


def test_encode_writes_scaled_posterior_means_and_a_manifest_that_names_the_vae(latents, vae_run, digits_shards):
    manifest = shards.read_manifest(latents)
    vae = load_for_inference(vae_run)
    g = manifest["generator"]
    assert g["vae_hash"] == vae.model_hash and g["latent_shape"] == [4, 4, 4]
    assert manifest["num_samples"] == 1797 and manifest["complete"] and manifest["channels"] == 4
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert not shards.verify_shards(latents, manifest)

    images, labels = read_samples(digits_shards), read_samples(latents)
    assert [s["__key__"] for s in labels] == [f"{i:09d}" for i in range(1797)]
    assert [s["cls"] for s in labels] == [s["cls"] for s in images]
    z = np.stack([np.load(io.BytesIO(s["npy"])) for s in labels])
    assert z.dtype == np.float32 and z.shape == (1797, 4, 4, 4)
    assert 0.9 < z.std() < 1.1  # normalised to unit variance by the stored factor
    # each latent is its image's posterior mean times the factor (deterministic: no sampled z)
    x = torch.from_numpy(np.stack([decode_image(s["png"], 8, 1) for s in images[:64]])).float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.model.encode(x)[0] * g["scale_factor"]
    torch.testing.assert_close(torch.from_numpy(z[:64]), mean, atol=1e-5, rtol=1e-5)
    assert json.loads(labels[5]["json"]) == {"source_index": 5, "source_key": images[5]["__key__"]}


def test_encode_is_the_same_for_any_split_and_a_rerun_skips_finished_shards(tmp_path, latents, vae_run,
                                                                            digits_shards):
    split = tmp_path / "split"
    # a job array of 2 tasks through the launcher (submitit's local executor)
    run_module("launch", "encode", "--cluster", "local", "--array", "2", "--wait", "--", "--vae", str(vae_run),
               "--data", str(digits_shards), "--out", str(split), "--shard-size", "400", "--batch-size", "50")
    for name in [p.name for p in latents.glob("shard-*.tar")]:
        assert (split / name).read_bytes() == (latents / name).read_bytes(), name
    before = {p.name: p.stat().st_mtime_ns for p in split.glob("shard-*.tar")}
    (split / "shard-000003.tar").unlink()  # a lost shard is redone, the others are kept
    rerun = encode(vae_run, digits_shards, split)
    assert "5/5 shards" in rerun.stdout
    after = {p.name: p.stat().st_mtime_ns for p in split.glob("shard-*.tar")}
    assert {k for k in after if after[k] != before.get(k)} == {"shard-000003.tar"}
    assert (split / "shard-000003.tar").read_bytes() == (latents / "shard-000003.tar").read_bytes()


def test_latent_ddpm_trains_and_generates_decoded_images_identical_across_splits(tmp_path, latents, vae_run,
                                                                                digits_shards):
    run = tmp_path / "ldm"
    run_module("pipeline", "train", "--config", "configs/tiny_ldm.yaml", "--out", str(run),
               f"data.shards={latents}", f"model.vae={vae_run}", *LDM)
    inference = load_for_inference(run)
    assert inference.vae is not None and inference.config.model.vae_hash == load_for_inference(vae_run).model_hash
    common = ["--checkpoint", str(run), "--num-samples", "24", "--shard-size", "8", "--steps", "4", "--no-progress"]
    run_module("pipeline", "generate", *common, "--out", str(tmp_path / "one"), "--batch-size", "5")
    for k in (0, 1):
        run_module("pipeline", "generate", *common, "--out", str(tmp_path / "two"), "--task-index", str(k),
                   "--num-tasks", "2")
    for s in range(3):
        name = f"shard-{s:06d}.tar"
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    manifest = shards.read_manifest(tmp_path / "one")
    assert manifest["image_size"] == [8, 8] and manifest["channels"] == 1
    from PIL import Image

    image = Image.open(io.BytesIO(read_samples(tmp_path / "one")[0]["png"]))
    assert image.size == (8, 8) and image.mode == "L"
    report = run_module("pipeline", "evaluate", "--real", str(digits_shards), "--fake", str(tmp_path / "one"))
    result = json.loads(report.stdout.strip().splitlines()[-1])
    assert result["num_fake"] == 24 and np.isfinite(result["fd_digitsnet"])
    refused = run_module("pipeline", "evaluate", "--real", str(digits_shards), "--checkpoint", str(run), check=False)
    assert refused.returncode == 2 and "is a latent model" in refused.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("overrides,message", [
    (["data.channels=3"], "holds latents of shape (4, 4, 4), the config says (3, 4, 4)"),
    (["model.vae=null"], "is a latent set: set model.vae"),
    (["model.vae=OTHER"], "was encoded by VAE"),
])
def test_bad_latent_input_is_one_line_exit_2(tmp_path, latents, vae_run, overrides, message):
    other = vae_run / "export" / "ema-step-0000010.safetensors"  # the same run earlier: other weights
    overrides = [o.replace("OTHER", str(other)) for o in overrides]
    proc = run_module("pipeline", "train", "--config", "configs/tiny_ldm.yaml", "--out", str(tmp_path / "run"),
                      f"data.shards={latents}", f"model.vae={vae_run}", *LDM, *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()
