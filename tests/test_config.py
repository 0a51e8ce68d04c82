"""Config loading: YAML + dotted overrides, and one clear error per bad key or type."""
import subprocess
import sys

import pytest
import torch

from pipeline.config import ConfigError, load_config


def test_tiny_config_loads_and_overrides_apply(tmp_path):
    config = load_config("configs/tiny.yaml", ["train.steps=7", "model.channel_mult=[1,2,2]", "train.lr=1e-3"])
    assert config.train.steps == 7
    assert config.model.channel_mult == [1, 2, 2]
    assert config.train.lr == pytest.approx(1e-3)
    assert config.data.shards == "data/digits"


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        load_config(None, ["train.steps=1.5"])


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", r"unknown config key train.stpes \(did you mean train.steps\?\)"),
    ("trian.steps=3", r"unknown config key trian"),
    ("model.type=gan", r"model.type: 'gan' is not one of ddpm, vae"),
    ("train.micro_batch=big", r"train.micro_batch: expected int, got str"),
    ("model.channel_mult=3", r"model.channel_mult: expected a list"),
    ("train.precision=fp8", r"train.precision: 'fp8' is not one of"),
    ("train.steps", r"not of the form section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", [override])


def test_bad_yaml_key_in_a_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 3\n  warmup: 5\n")
    with pytest.raises(ConfigError, match=r"unknown config key train.warmup \(did you mean train.warmup_steps\?\)"):
        load_config(path)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_a_bad_key_and_fails(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", "configs/tiny.yaml",
                           "--out", str(tmp_path / "run"), "train.stpes=3"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "train.stpes" in proc.stderr and "train.steps" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was created for a run that never started


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True)
    for command in ("prepare", "train", "sample", "generate", "evaluate"):
        assert command in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on CPU only")
def test_fp16_on_cpu_is_refused_before_any_work(tmp_path, digits_shards):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--out", str(tmp_path / "run"),
                           f"data.shards={digits_shards}", "train.precision=fp16"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.precision=fp16 needs a CUDA GPU" in proc.stderr
