"""Bad input at the edge: every ranged config key and every flag of train/prepare/evaluate is refused with one
line naming the key or flag, the value and what is allowed; exit 2; nothing written; no torch import first."""
import dataclasses
import os
import subprocess
import sys

import pytest

from pipeline.config import Config, ConfigError, load_config

from .conftest import REPO


def pipeline_cli(*args, env=None, cwd=REPO):
    """Run `python -m pipeline ARGS` in a fresh process; print whether torch got loaded (a lazy `torch` is not)."""
    code = ("import sys; from pipeline.cli import main\n"
            "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('torch imported:', 'torch._C' in sys.modules); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300)


def ranged_keys():
    """(dotted key, allowed Range, whether the value is a list) of every key with range metadata."""
    for section in dataclasses.fields(Config):
        if dataclasses.is_dataclass(section.default_factory):  # a section: DataConfig, TrainConfig, ...
            defaults = section.default_factory()
            for f in dataclasses.fields(defaults):
                if "range" in f.metadata:
                    is_list = isinstance(getattr(defaults, f.name), list)
                    yield f"{section.name}.{f.name}", f.metadata["range"], is_list


def test_every_ranged_key_refuses_a_value_below_its_range():
    checked = 0
    for key, allowed, is_list in ranged_keys():
        bad = allowed.lo - 1 if not allowed.lo_open else allowed.lo
        value = f"[{bad}, {bad}]" if is_list else str(bad)
        with pytest.raises(ConfigError) as error:
            load_config(None, [f"{key}={value}"])
        assert key in str(error.value) and str(bad) in str(error.value) and str(allowed) in str(error.value)
        checked += 1
    assert checked >= 35  # the schema's numeric keys, counted by their metadata


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", "config key train.steps: 0 is out of range (allowed: >= 1)"),
    ("train.lr=-1e-3", "config key train.lr: -0.001 is out of range (allowed: > 0)"),
    ("train.lr=.nan", "config key train.lr: nan is out of range"),
    ("train.ema_decay=1.01", "config key train.ema_decay: 1.01 is out of range (allowed: in [0, 1])"),
    ("train.zero_stage=4", "config key train.zero_stage: 4 is out of range (allowed: in [0, 3])"),
    ("model.p_uncond=2", "config key model.p_uncond: 2.0 is out of range (allowed: in [0, 1])"),
    ("train.adam_betas=[0.9,1.0]", "config key train.adam_betas[1]: 1.0 is out of range (allowed: in [0, 1))"),
    ("train.adam_betas=[0.9]", "train.adam_betas: [0.9] must hold two values"),
    ("train.seed=-1", "config key train.seed: -1 is out of range (allowed: in [0, 2**64))"),
    ("diffusion.sample_steps=1001", "diffusion.sample_steps: 1001 is out of range (allowed: 1 to diffusion.timesteps"),
    ("model.channel_mult=[]", "model.channel_mult: [] must hold at least one multiplier"),
])
def test_out_of_range_values_name_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as error:
        load_config("configs/tiny.yaml", [override])
    assert message in str(error.value)


def test_every_shipped_config_is_in_range():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert len(paths) >= 5, paths  # the glob found the shipped configs
    for path in paths:
        load_config(path)  # raises ConfigError naming the key for any value out of its range


def assert_one_line_error(proc, *parts, torch_free=True):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for part in parts:
        assert part in lines[0]
    if torch_free:
        assert "torch imported: False" in proc.stdout  # refused before the heavy imports


def test_train_config_errors_answer_before_torch_and_write_nothing(tmp_path):
    proc = pipeline_cli("train", "--out", tmp_path / "run", "train.micro_batch=0")
    assert_one_line_error(proc, "train.micro_batch", "0", ">= 1")
    assert not (tmp_path / "run").exists()
    help_proc = pipeline_cli("train", "--help")
    assert help_proc.returncode == 0 and "--config" in help_proc.stdout
    assert "torch imported: False" in help_proc.stdout


def test_train_on_missing_data_answers_before_deepspeed_and_writes_nothing(tmp_path):
    proc = pipeline_cli("train", "--out", tmp_path / "run", f"data.shards={tmp_path}/none")
    assert_one_line_error(proc, f"shard pattern '{tmp_path}/none' matches no file", torch_free=False)
    assert "deepspeed" not in (proc.stdout + proc.stderr).lower()  # its start-up lines came first before
    assert not (tmp_path / "run").exists()


def test_train_with_an_unset_variable_in_the_cache_folder_answers_before_deepspeed(tmp_path, digits_shards):
    proc = pipeline_cli("train", "--out", tmp_path / "run", f"data.shards={digits_shards}",
                        "data.cache_dir=$NO_SUCH_VARIABLE_HERE/shards")
    assert_one_line_error(proc, "cache folder '$NO_SUCH_VARIABLE_HERE/shards'", "not set here", torch_free=False)
    assert "deepspeed" not in (proc.stdout + proc.stderr).lower()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, parts", [
    (["--out", "{file}"], ["argument --out", "{file} is a file, expected a folder"]),
    (["--out", "{file}/run"], ["argument --out", "is a file, so no folder can be created under it"]),
    (["--config", "{tmp}"], ["argument --config", "{tmp} is a folder, expected a file"]),
    (["--config", "{tmp}/none.yaml"], ["argument --config", "none.yaml does not exist"]),
])
def test_train_flags_name_the_real_problem(tmp_path, flags, parts):
    (tmp_path / "f.txt").write_text("x")
    fill = {"file": tmp_path / "f.txt", "tmp": tmp_path}
    proc = pipeline_cli("train", *[f.format(**fill) for f in flags])
    assert_one_line_error(proc, *[p.format(**fill) for p in parts])


@pytest.mark.parametrize("flags, parts", [
    (["--shard-size", "0"], ["argument --shard-size", "0 is out of range (allowed: >= 1)"]),
    (["--max-shard-bytes", "-5"], ["argument --max-shard-bytes", "-5 is out of range"]),
    (["--source", "npz", "--path", "{tmp}"], ["--path {tmp} is a folder", ".npz or .npy file"]),
    (["--source", "folder", "--path", "{file}"], ["--path {file} is a file", "folder of PNG/JPEG"]),
    (["--source", "digits", "--split", "test"], ["--split applies to fashion-mnist only"]),
])
def test_prepare_flags_are_checked_and_nothing_is_written(tmp_path, flags, parts):
    (tmp_path / "f.txt").write_text("x")
    fill = {"file": tmp_path / "f.txt", "tmp": tmp_path}
    proc = pipeline_cli("prepare", "--out", tmp_path / "out", "--no-progress", *[f.format(**fill) for f in flags])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for part in parts:
        assert part.format(**fill) in proc.stderr
    assert not (tmp_path / "out").exists()


def test_prepare_out_that_is_a_file_is_refused_at_parse(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    proc = pipeline_cli("prepare", "--out", tmp_path / "f.txt")
    assert_one_line_error(proc, "argument --out", "is a file, expected a folder")


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two real shard sets of different sizes: all 1797 digits, and the first 300 of them."""
    import numpy as np

    from pipeline.data.ingest import prepare
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("eval")
    prepare("digits", root / "real", progress=False)
    digits = load_digits()
    images = np.floor(digits.images[:300] * 255 / 16 + 0.5).astype(np.uint8)
    np.savez(root / "small.npz", images=images, labels=digits.target[:300])
    prepare("npz", root / "small", path=str(root / "small.npz"), progress=False)
    return root


@pytest.mark.parametrize("flags, parts", [
    (["--fake", "{small}", "--num", "500"], ["--num 500", "--fake {small} has 300 samples", "--num <= 300"]),
    (["--fake", "{small}", "--knn-k", "0"], ["argument --knn-k: 0 is out of range"]),
    (["--fake", "{small}", "--out", "{root}"], ["argument --out", "is a folder, expected a file name"]),
    (["--fake", "{small}", "--device", "gpu"], ["argument --device", "'gpu' is not a device"]),
    (["--fake", "{small}", "--device", "cuda:7"], ["--device cuda:7"]),
    (["--fake", "{small}", "--ode-steps", "10"], ["--ode-steps given without --checkpoint"]),
    (["--checkpoint", "x.safetensors", "--knn-k", "5"], ["--knn-k given without --fake"]),
    (["--fake", "{root}/real/manifest.json"], ["is a file; a shard set is a folder"]),
])
def test_evaluate_flags_are_checked(two_sets, flags, parts):
    import torch

    if "cuda:7" in flags and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")  # never the case on CI (CPU)
    fill = {"small": two_sets / "small", "root": two_sets}
    proc = pipeline_cli("evaluate", "--real", two_sets / "real", *[f.format(**fill) for f in flags])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for part in parts:
        assert part.format(**fill) in proc.stderr


def test_evaluate_compares_sets_at_one_size_by_default(two_sets, capsys):
    import json

    from pipeline.cli import main

    assert main(["evaluate", "--real", str(two_sets / "real"), "--fake", str(two_sets / "small")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_real"] == result["num_fake"] == 300


def test_a_two_rank_run_reports_a_config_error_once(tmp_path):
    """torchrun, 2 ranks, an out-of-range key: one error line (rank 0's), no Python traceback from a rank."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "pipeline", "train", "--out", tmp_path / "run",
                           "train.steps=0"], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    ours = [line for line in proc.stderr.splitlines() if "train.steps" in line]
    assert ours == ["error: config key train.steps: 0 is out of range (allowed: >= 1)"], proc.stderr
    assert "pipeline/" not in proc.stderr  # no frame of our code: the launcher's summary only
    assert not (tmp_path / "run").exists()
