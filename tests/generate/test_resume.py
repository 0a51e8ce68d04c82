"""Killed runs, reruns and verification: the final set always equals an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

from pipeline.data.shards import verify_shards
from tests.generate.conftest import ENV, REPO
from tests.generate.helpers import FAST, folder_state, generate, manifest, shard_bytes

SETTINGS = ["--shard-size", "4", "--batch-size", "2", "--seed", "11"]


def test_kill_mid_shard_then_rerun_equals_uninterrupted_run(uncond_run, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert generate(uncond_run, reference, 24, *SETTINGS) == 0
    command = [sys.executable, "-m", "pipeline", "generate", "--checkpoint", str(uncond_run), "--out", str(out),
               "--num-samples", "24", *SETTINGS, *FAST]
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_done = out / "done" / "shard-000000.json"
    deadline = time.monotonic() + 120
    while not first_done.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # while it samples (and streams into the temporary file of) shard 1
    proc.wait()
    finished = sorted(p.name for p in (out / "done").glob("shard-*.json"))
    assert 1 <= len(finished) < 5, f"the kill should land mid-run, found {finished}"
    # What else a kill can leave: a shard renamed into place without its done record (here: garbage of the
    # right name) and a temporary file of a shard being written.
    (out / "shard-000005.tar").write_bytes(b"half a shard")
    (out / ".shard-000005.tar.abc.tmp").write_bytes(b"partial")

    assert generate(uncond_run, out, 24, *SETTINGS) == 0
    assert shard_bytes(out) == shard_bytes(reference)
    assert manifest(out) == manifest(reference)
    assert verify_shards(out) == []
    assert not list(out.glob(".*.tmp"))


def test_rerun_of_a_finished_set_touches_nothing(uncond_run, tmp_path, capsys):
    out = tmp_path / "gen"
    assert generate(uncond_run, out, 10, *SETTINGS) == 0
    shards_before = {k: v for k, v in folder_state(out).items() if k.endswith(".tar")}
    assert generate(uncond_run, out, 10, *SETTINGS) == 0
    assert {k: v for k, v in folder_state(out).items() if k.endswith(".tar")} == shards_before
    assert "wrote 0 shard(s), 3 already done" in capsys.readouterr().out


def test_missing_or_corrupted_shards_are_found_and_regenerated(uncond_run, tmp_path):
    out = tmp_path / "gen"
    assert generate(uncond_run, out, 12, *SETTINGS) == 0
    original = shard_bytes(out)
    corrupt = bytearray(original["shard-000001.tar"])
    corrupt[700] ^= 0xFF  # same size: only the sha256 tells
    (out / "shard-000001.tar").write_bytes(bytes(corrupt))
    (out / "shard-000002.tar").unlink()
    problems = verify_shards(out)
    assert any("shard-000001.tar: sha256" in p for p in problems)
    assert any("shard-000002.tar: missing" in p for p in problems)

    assert generate(uncond_run, out, 12, *SETTINGS) == 0  # a missing shard is redone on any rerun
    assert (out / "shard-000002.tar").read_bytes() == original["shard-000002.tar"]
    assert (out / "shard-000001.tar").read_bytes() == bytes(corrupt)  # size checks cannot see this one...
    assert generate(uncond_run, out, 12, *SETTINGS, "--verify") == 0  # ...the sha256 check can
    assert shard_bytes(out) == original
    assert verify_shards(out) == []


def test_manifest_lists_only_finished_shards_of_a_partial_set(uncond_run, tmp_path):
    out = tmp_path / "gen"
    assert generate(uncond_run, out, 12, *SETTINGS, "--task-index", "1", "--num-tasks", "2") == 0
    m = manifest(out)
    assert [r["name"] for r in m["shards"]] == ["shard-000001.tar"]
    assert (m["complete"], m["num_samples"], m["num_samples_planned"]) == (False, 4, 12)
    assert verify_shards(out) == []
