"""The trainer end to end through the real DeepSpeed engine (gloo, CPU), as a user runs it."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.checkpoint import complete_checkpoints, load_for_inference
from pipeline.config import load_config
from pipeline.flops import flops_per_image
from tests.train.conftest import REPO, read_log, run_training, train_command


def model_states(run_dir):
    """Raw (non-EMA) model weights of the newest checkpoint, and the EMA export."""
    ckpt = complete_checkpoints(run_dir)[-1]
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return ckpt, module, load_file(str(run_dir / "export" / "latest.safetensors"))


def assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-5), f"{k} differs"


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, digits_shards):
    steps = ["train.steps=120", "train.ckpt_every=1000"]
    full = tmp_path / "full"
    run_training(full, digits_shards, *steps)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(train_command(cut, digits_shards, *steps), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and not ((cut / "log.jsonl").exists() and len(read_log(cut)) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    stopped_at = complete_checkpoints(cut)[-1]
    assert 5 <= int(stopped_at.name.split("-")[1]) < 120
    assert "stopped by signal" in out

    resumed = run_training(cut, digits_shards, *steps)  # the same command again
    assert "resumed from" in resumed.stdout
    _, full_module, full_ema = model_states(full)
    ckpt, cut_module, cut_ema = model_states(cut)
    assert ckpt.name == "step-0000120"
    assert_same_weights(full_module, cut_module)
    assert_same_weights(full_ema, cut_ema)
    steps_logged = [r["step"] for r in read_log(cut)]
    assert steps_logged == list(range(1, 121))  # no step lost or logged twice across the restart


def test_training_learns_and_writes_every_artifact(tmp_path, digits_shards):
    run = tmp_path / "run"
    run_training(run, digits_shards, "train.steps=150", "train.ckpt_every=50", "train.keep_last=2")
    log = read_log(run)
    first, last = sum(r["loss"] for r in log[:10]) / 10, sum(r["loss"] for r in log[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert {"step", "loss", "lr", "grad_norm", "images_per_s", "loss_t_q0", "loss_t_q3"} <= log[-1].keys()
    per_image = flops_per_image(load_config(run / "config.yaml"))  # the log reports TFLOP/s from model FLOPs
    assert log[-1]["tflops"] == pytest.approx(log[-1]["images_per_s"] * per_image / 1e12)
    assert [c.name for c in complete_checkpoints(run)] == ["step-0000100", "step-0000150"]  # last K kept
    exports = sorted(p.name for p in (run / "export").glob("ema-step-*.safetensors"))
    assert exports == [f"ema-step-{s:07d}.safetensors" for s in (50, 100, 150)]  # by default every export is kept
    assert (run / "samples" / "latest.png").stat().st_size > 0
    assert (run / "config.yaml").exists() and list((run / "tb").iterdir())
    inference = load_for_inference(run)
    assert inference.step == 150 and inference.config.train.steps == 150


def test_keep_exports_prunes_old_exports_but_never_those_of_kept_checkpoints(tmp_path, digits_shards):
    run = tmp_path / "run"
    # exports at steps 2, 3, 4, 6, 8 (checkpoints and grids); checkpoints 6 and 8 kept
    run_training(run, digits_shards, "train.steps=8", "train.ckpt_every=2", "train.sample_every=3",
                 "train.keep_last=2", "train.keep_exports=1")
    assert [c.name for c in complete_checkpoints(run)] == ["step-0000006", "step-0000008"]
    assert sorted(p.name for p in (run / "export").iterdir()) == [
        "ema-step-0000006.safetensors", "ema-step-0000008.safetensors", "latest.safetensors"]
    assert sorted(p.name for p in (run / "samples").glob("step-*.png")) == [
        "step-0000003.png", "step-0000006.png", "step-0000008.png"]  # grids were drawn from the pruned exports
    assert load_for_inference(complete_checkpoints(run)[0]).step == 6  # a kept checkpoint's export is there


def test_resume_with_a_different_model_is_refused(tmp_path, digits_shards):
    run = tmp_path / "run"
    run_training(run, digits_shards, "train.steps=3")
    proc = run_training(run, digits_shards, "train.steps=6", "model.base_channels=16", check=False)
    assert proc.returncode == 2
    assert "model.base_channels: 8 -> 16" in proc.stderr


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, digits_shards):
    run = tmp_path / "run"
    run_training(run, digits_shards, "train.steps=8", "train.fault_nonfinite_steps=[3,4]")
    log = read_log(run)
    assert log[-1]["step"] == 8 and log[-1]["nonfinite_skipped"] == 2
    assert all(torch.isfinite(v).all() for v in load_file(str(run / "export" / "latest.safetensors")).values())


def test_too_many_nonfinite_steps_checkpoint_and_stop(tmp_path, digits_shards):
    run = tmp_path / "run"
    proc = run_training(run, digits_shards, "train.steps=20", "train.max_nonfinite=3",
                        "train.fault_nonfinite_steps=[2,3,4,5]", check=False)
    assert proc.returncode != 0
    assert "3 consecutive steps had a non-finite loss" in proc.stderr
    assert complete_checkpoints(run)[-1].name == "step-0000004"


def test_vae_trains_and_exports(tmp_path, digits_shards):
    run = tmp_path / "vae"
    run_training(run, digits_shards, "model.type=vae", "train.steps=40", "train.lr=1e-3")
    log = read_log(run)
    assert log[-1]["loss"] < log[0]["loss"]
    assert (run / "samples" / "latest.png").exists()
    assert load_for_inference(run).config.model.type == "vae"


def run_sample(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", "sample", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_sample_command_writes_a_deterministic_grid_and_rejects_a_bad_checkpoint(tmp_path, digits_shards):
    run = tmp_path / "run"
    run_training(run, digits_shards, "train.steps=20")
    grids = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / f"{name}.png"
        proc = run_sample("--checkpoint", str(run), "--sampler", "dpmpp", "--steps", "4", "--num", "9",
                          "--seed", seed, "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
        grids.append(out.read_bytes())
    assert Image.open(tmp_path / "a.png").size[0] >= 256  # 3x3 tiles of 8x8, upscaled to be visible
    assert grids[0] == grids[1] and grids[0] != grids[2]  # image i depends only on (seed, i)
    bad = run_sample("--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "no export found" in bad.stderr
