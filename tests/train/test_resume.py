"""Resume that survives: damaged checkpoints are skipped, bad --resume paths are one line, a failed resume
changes nothing, a killed run leaves no duplicate log records and no temporary files after the next run."""
import json
import os
import signal
import subprocess

import pytest
import torch

from pipeline.checkpoint import (COMPLETE, RUN_STATE_VERSION, CheckpointError, RunState, choose_resume_point,
                                 complete_checkpoints, problem_with)
from pipeline.config import load_config, resume_conflicts, to_dict
from tests.train.conftest import REPO, read_log, run_training, train_command
from tests.train.test_checkpoint_safety import snapshot, start_training, wait_for

MODEL_FILE = "mp_rank_00_model_states.pt"


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_damaged_newest_checkpoint_is_skipped_and_a_failed_resume_changes_nothing(tmp_path, digits_shards):
    run, steps = tmp_path / "run", ["train.steps=6", "train.ckpt_every=3"]
    run_training(run, digits_shards, *steps)
    info = json.loads((run / "run_info.json").read_text())["starts"][0]
    assert {"torch", "deepspeed", "triton", "webdataset"} <= info["versions"].keys() and info["device"]
    assert info["commit"] and "--out" in info["command"] and info["world_size"] == 1

    newest = complete_checkpoints(run)[-1]
    truncate(newest / MODEL_FILE)  # e.g. a file system that lost the end of the write
    proc = run_training(run, digits_shards, *steps)
    skipped = [line for line in proc.stdout.splitlines() if "skipping damaged checkpoint" in line]
    assert len(skipped) == 1 and "step-0000006" in skipped[0] and MODEL_FILE in skipped[0]
    assert "resumed from" in proc.stdout and "step-0000003 at step 3" in proc.stdout
    assert [r["step"] for r in read_log(run)] == list(range(1, 7))
    assert [c.name for c in complete_checkpoints(run)] == ["step-0000003", "step-0000006.r2"]
    assert problem_with(complete_checkpoints(run)[-1]) is None

    for ckpt in complete_checkpoints(run):  # nothing usable left: a clear error, and the folder as it was
        truncate(ckpt / MODEL_FILE)
    before = snapshot(run)
    proc = run_training(run, digits_shards, *steps, check=False)
    assert proc.returncode == 2 and "all 2 complete checkpoints are damaged" in proc.stderr.splitlines()[-1]
    assert snapshot(run) == before

    for target, says in ((tmp_path / "nowhere", "does not exist"), (tmp_path, "no COMPLETE marker"),
                         (run / "config.yaml", "is a file")):
        proc = subprocess.run([*train_command(run, digits_shards, *steps), "--resume", str(target)], cwd=REPO,
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=600)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.splitlines()[-1].startswith(f"error: checkpoint {target}: {says}")
        assert snapshot(run) == before


def test_a_run_killed_before_its_first_checkpoint_leaves_no_duplicates_or_temporaries(tmp_path, digits_shards):
    run, steps = tmp_path / "run", ["train.steps=8", "train.ckpt_every=100"]
    proc = start_training(run, digits_shards, *steps)
    wait_for(lambda: (run / "log.jsonl").exists() and len(read_log(run)) >= 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a record torn by the kill
    leftovers = [run / ".config.yaml.x1.tmp", run / "export" / ".latest.safetensors.x2.tmp",
                 run / "checkpoints" / "step-0000002" / MODEL_FILE]  # a killed save: no COMPLETE
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")

    run_training(run, digits_shards, *steps)
    assert [r["step"] for r in read_log(run)] == list(range(1, 9))
    assert not any(p.exists() for p in leftovers) and not (run / "checkpoints" / "step-0000002").exists()
    assert not list(run.rglob("*.tmp"))


# ---------------------------------------------------------------- the pieces, in-process

def test_problem_with_finds_lost_truncated_and_corrupted_files(tmp_path):
    ckpt = tmp_path / "step-0000001"
    ckpt.mkdir()
    torch.save({"w": torch.arange(1000.0)}, ckpt / MODEL_FILE)
    size = (ckpt / MODEL_FILE).stat().st_size
    (ckpt / COMPLETE).write_text(json.dumps({"step": 1, "world_size": 1, "files": {MODEL_FILE: size}}))
    assert problem_with(ckpt) is None
    data = bytearray((ckpt / MODEL_FILE).read_bytes())
    start = data.index(torch.arange(1000.0).numpy().tobytes()[:64])
    data[start + 100] ^= 0xFF  # a flipped bit inside the tensor's bytes: same size, wrong checksum
    (ckpt / MODEL_FILE).write_bytes(bytes(data))
    assert "fails its checksum" in problem_with(ckpt)
    truncate(ckpt / MODEL_FILE)
    assert f"{size // 2} bytes, {size} were written" in problem_with(ckpt)
    (ckpt / COMPLETE).write_text(json.dumps({"step": 1, "world_size": 1}))  # an older marker: no file list
    assert "unreadable" in problem_with(ckpt)
    (ckpt / MODEL_FILE).unlink()
    (ckpt / COMPLETE).write_text(json.dumps({"step": 1, "world_size": 1, "files": {MODEL_FILE: size}}))
    assert problem_with(ckpt) == f"{MODEL_FILE} is missing"


class Holder:
    step, note = 0, "?"


def registry(h: Holder) -> RunState:
    return RunState(step=(lambda: h.step, lambda v: setattr(h, "step", v)),
                    note=(lambda: h.note, lambda v: setattr(h, "note", v)))


def test_run_state_round_trips_through_weights_only_and_migrates_or_names_the_version(tmp_path):
    a, b = Holder(), Holder()
    a.step, a.note = 7, "x"
    torch.save(registry(a).state_dict(), tmp_path / "s.pt")
    registry(b).load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True), tmp_path)
    assert (b.step, b.note) == (7, "x")
    registry(b).load_state_dict({"step": 3, "note": "old", "config": {}}, tmp_path)  # v1: no version key
    assert (b.step, b.note) == (3, "old")
    with pytest.raises(CheckpointError, match=f"newer version .* up to v{RUN_STATE_VERSION}"):
        registry(b).load_state_dict({"version": RUN_STATE_VERSION + 1, "step": 1, "note": ""}, tmp_path)
    with pytest.raises(CheckpointError, match="older version"):
        registry(b).load_state_dict({"version": 0}, tmp_path)
    with pytest.raises(CheckpointError, match="lacks note"):
        registry(b).load_state_dict({"version": RUN_STATE_VERSION, "step": 1}, tmp_path)


def test_resume_rules_come_from_the_config_fields():
    saved = to_dict(load_config("configs/tiny.yaml"))
    now = load_config("configs/tiny.yaml", ["train.steps=9", "train.ckpt_every=2", "data.num_workers=2"])
    assert resume_conflicts(saved, now) == []
    now = load_config("configs/tiny.yaml", ["model.base_channels=16", "train.lr=0.1"])
    assert resume_conflicts(saved, now) == ["model.base_channels: 32 -> 16", "train.lr: 0.002 -> 0.1"]
    del saved["train"]["grad_clip"]  # a key added since the run was saved counts as its default
    assert resume_conflicts(saved, load_config("configs/tiny.yaml")) == []
    assert resume_conflicts(saved, load_config("configs/tiny.yaml", ["train.grad_clip=0.5"])) == [
        "train.grad_clip: 1.0 -> 0.5"]


def test_resume_never_refuses_a_folder_with_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step-0000003"
    ckpt.mkdir(parents=True)
    (ckpt / COMPLETE).write_text(json.dumps({"step": 3, "world_size": 1}))
    with pytest.raises(CheckpointError, match="--resume never: .* already holds checkpoints"):
        choose_resume_point(tmp_path, "never")
    assert choose_resume_point(tmp_path, "auto") == ckpt and choose_resume_point(tmp_path / "new", "never") is None
