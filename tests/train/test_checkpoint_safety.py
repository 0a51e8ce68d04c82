"""A complete checkpoint survives anything: reruns, stop signals on checkpoint steps, SIGKILL at any moment."""
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

from pipeline.checkpoint import (COMPLETE, complete_checkpoints, new_checkpoint_dir, prune_checkpoints,
                                 remove_incomplete_checkpoints)
from tests.train.conftest import REPO, read_log, run_training, train_command


def snapshot(folder: Path) -> dict:
    """Every file and folder under `folder`, files with inode, mtime and content hash: any change shows."""
    def fingerprint(p: Path):
        return (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())

    return {str(p.relative_to(folder)): fingerprint(p) if p.is_file() else "folder" for p in sorted(folder.rglob("*"))}


def start_training(run: Path, shards: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(train_command(run, shards, *overrides), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(condition, timeout=300.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_rerunning_a_finished_run_never_rewrites_its_checkpoint_even_when_killed(tmp_path, digits_shards):
    run, steps = tmp_path / "run", ["train.steps=6", "train.ckpt_every=3"]
    run_training(run, digits_shards, *steps)
    before = snapshot(run / "checkpoints")

    again = run_training(run, digits_shards, *steps)  # the same command on a finished run
    assert "resumed from" in again.stdout and "step 6" in again.stdout
    assert snapshot(run / "checkpoints") == before

    proc = start_training(run, digits_shards, *steps)  # once more, killed right after it resumed
    wait_for(lambda: "resumed from" in proc.stdout.readline())
    proc.kill()
    proc.wait(timeout=60)
    assert snapshot(run / "checkpoints") == before
    run_training(run, digits_shards, *steps)
    assert [r["step"] for r in read_log(run)] == list(range(1, 7))


def test_a_stop_signal_on_a_checkpoint_step_then_sigkill_leaves_a_resumable_run(tmp_path, digits_shards):
    run, steps = tmp_path / "run", ["train.steps=12", "train.ckpt_every=1"]  # every step is a checkpoint step
    proc = start_training(run, digits_shards, *steps)
    wait_for(lambda: (run / "log.jsonl").exists() and len(read_log(run)) >= 3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)  # the stop lands on a checkpoint step; kill while it handles it
    proc.kill()
    proc.wait(timeout=60)
    for ckpt in complete_checkpoints(run):  # whatever survived is whole
        assert (ckpt / "mp_rank_00_model_states.pt").stat().st_size > 0

    proc = start_training(run, digits_shards, *steps)  # SIGTERM alone: exit 75 with a checkpoint of that step
    wait_for(lambda: len(read_log(run)) >= 6)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75
    stopped = int(out.split("stopped by signal")[1].split("at step ")[1].split(";")[0])
    assert complete_checkpoints(run)[-1].name == f"step-{stopped:07d}"  # saved once, not re-saved

    run_training(run, digits_shards, *steps)
    assert [r["step"] for r in read_log(run)] == list(range(1, 13))  # nothing lost or logged twice
    assert [c.name for c in complete_checkpoints(run)] == ["step-0000011", "step-0000012"]


def fake_checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"weights of " + name.encode())
    if complete:
        (folder / COMPLETE).write_text("{}")
    return folder


def test_a_resave_of_an_existing_step_goes_to_a_new_revision_and_a_kill_at_any_point_keeps_one_whole(tmp_path):
    root = tmp_path / "checkpoints"
    old = fake_checkpoint(root, "step-0000010")
    fake_checkpoint(root, "step-0000005")
    new = new_checkpoint_dir(root, 10)
    assert new.name == "step-0000010.r2"
    # killed while writing the new revision: the old one is what resumes
    fake_checkpoint(root, new.name, complete=False)
    assert complete_checkpoints(tmp_path)[-1] == old
    # killed after the new one is COMPLETE but before the old one is removed: the new one resumes
    (new / COMPLETE).write_text("{}")
    assert complete_checkpoints(tmp_path)[-1] == new
    # killed in the middle of removing the old one (its COMPLETE goes first): still the new one
    (old / COMPLETE).unlink()
    assert complete_checkpoints(tmp_path) == [root / "step-0000005", new]
    (old / COMPLETE).write_text("{}")
    prune_checkpoints(root, keep_last=1)
    assert complete_checkpoints(tmp_path) == [new] and not (root / "step-0000005").exists()
    assert new_checkpoint_dir(root, 10).name == "step-0000010.r3"  # never a name that was used
    other = fake_checkpoint(root, "step-0000010-universal", complete=False)  # not a save: left alone
    remove_incomplete_checkpoints(tmp_path)
    prune_checkpoints(root, keep_last=1)
    assert other.is_dir() and complete_checkpoints(tmp_path) == [new]
