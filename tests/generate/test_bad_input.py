"""Bad input is a clear error (exit 2, message naming the problem) and overwrites nothing."""
import pytest

from tests.generate.helpers import folder_state, generate


def run_error(capsys, checkpoint, out, num, *extra) -> str:
    assert generate(checkpoint, out, num, *extra) == 2
    return capsys.readouterr().err


def test_missing_checkpoint(capsys, tmp_path):
    err = run_error(capsys, tmp_path / "no-such-run", tmp_path / "gen", 4)
    assert "cannot load --checkpoint" in err and "no-such-run" in err and "no export found" in err
    assert not (tmp_path / "gen").exists()


def test_file_that_is_not_an_export(capsys, tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"\x00" * 64)
    err = run_error(capsys, fake, tmp_path / "gen", 4)
    assert "cannot load --checkpoint" in err and "model.safetensors" in err
    assert not (tmp_path / "gen").exists()


@pytest.fixture()
def finished(uncond_run, tmp_path):
    """A finished generation folder and a snapshot of every file in it."""
    out = tmp_path / "gen"
    assert generate(uncond_run, out, 8, "--shard-size", "4") == 0
    return out, folder_state(out)


@pytest.mark.parametrize("extra,named", [
    (["--sampler", "dpmpp"], "sampler: folder has 'ddim', this run asks for 'dpmpp'"),
    (["--seed", "1"], "seed: folder has 0"),
    (["--steps", "5"], "steps: folder has 4"),
    (["--shard-size", "2"], "shard_size: folder has 4"),
])
def test_folder_with_other_settings_is_refused(capsys, uncond_run, finished, extra, named):
    out, before = finished
    args = ["--shard-size", "4", *extra] if "--shard-size" not in extra else extra
    err = run_error(capsys, uncond_run, out, 8, *args)
    assert named in err and "other settings" in err
    assert folder_state(out) == before


def test_folder_of_another_model_is_refused(capsys, cond_run, finished):
    out, before = finished
    err = run_error(capsys, cond_run, out, 8, "--shard-size", "4")
    assert "model_hash: folder has" in err
    assert folder_state(out) == before


def test_other_sample_count_is_refused(capsys, uncond_run, finished):
    out, before = finished
    assert "num_samples: folder has 8, this run asks for 12" in run_error(capsys, uncond_run, out, 12,
                                                                           "--shard-size", "4")
    assert folder_state(out) == before


def test_real_data_set_folder_is_refused(capsys, uncond_run, digits_shards):
    before = folder_state(digits_shards)
    err = run_error(capsys, uncond_run, digits_shards, 8)
    assert "holds a data set that generate did not write" in err
    assert folder_state(digits_shards) == before


def test_non_empty_foreign_folder_is_refused(capsys, uncond_run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert "is not empty and is not a generation folder" in run_error(capsys, uncond_run, tmp_path, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("num,extra,named", [
    (8, ["--task-index", "3", "--num-tasks", "3"], "--task-index must be in [0, 3)"),
    (8, ["--task-index", "-1", "--num-tasks", "2"], "--task-index must be in [0, 2)"),
    (8, ["--num-tasks", "0"], "--num-tasks must be >= 1"),
    (8, ["--shard-size", "4", "--num-tasks", "3"], "--num-tasks 3 is more than the 2 shard(s)"),
    (0, [], "--num-samples, --shard-size and --batch-size must be >= 1"),
    (8, ["--shard-size", "0"], "must be >= 1"),
    (8, ["--steps", "5000"], "--steps must be in [1, 1000]"),
    (8, ["--sampler", "dpmpp", "--eta", "0.5"], "applies to --sampler ddim only"),
    (8, ["--classes", "1"], "unconditional model"),
    (8, ["--guidance", "3"], "unconditional model"),
])
def test_impossible_requests(capsys, uncond_run, tmp_path, num, extra, named):
    out = tmp_path / "gen"
    assert named in run_error(capsys, uncond_run, out, num, *extra)
    assert not out.exists()


def test_class_out_of_range(capsys, cond_run, tmp_path):
    assert "--classes [10] out of range" in run_error(capsys, cond_run, tmp_path / "gen", 8, "--classes", "2", "10")


def test_bad_rank_environment(capsys, uncond_run, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "RANK=2 / WORLD_SIZE=2" in run_error(capsys, uncond_run, tmp_path / "gen", 8)
