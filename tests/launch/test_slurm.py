"""End to end on a real SLURM (tests/slurm/start.sh): real sbatch/srun/scontrol/sacct, the real trainer."""
import importlib.util
import json
import re
import subprocess
import sys
import time

import pytest
import submitit
import torch

from pipeline.checkpoint import complete_checkpoints
from tests.launch.conftest import REPO, job_env, run_launch, train_args

pytestmark = pytest.mark.usefixtures("slurm_cluster")

STEPS = 40
TRAIN = ("train.steps=40", "train.ckpt_every=20")


def submitted_job_id(stdout: str) -> str:
    found = re.search(r"submitted \d+ job\(s\) to slurm: (\S+)", stdout)
    assert found, stdout
    return found.group(1).split(",")[0]


def logged_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def final_weights(run) -> tuple[str, dict]:
    ckpt = complete_checkpoints(run)[-1]
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return ckpt.name, states["module"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, digits_shards):
    """An uninterrupted 2-task gloo training job, submitted like a user does and waited for."""
    run = tmp_path_factory.mktemp("slurm") / "reference"
    proc = run_launch("train", "--cluster", "slurm", "--tasks-per-node", "2", "--time", "10", "--wait", "--",
                      *train_args(run, digits_shards, *TRAIN))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return run, proc.stdout


def test_two_task_training_job_trains_and_checkpoints(reference_run):
    run, stdout = reference_run
    job_id = submitted_job_id(stdout)
    assert f"squeue -j {job_id}" in stdout and f"{run}/.submitit/{job_id}_0_log.out" in stdout
    assert "'rank': 0, 'world_size': 2" in stdout and "'rank': 1, 'world_size': 2" in stdout
    assert logged_steps(run) == list(range(1, STEPS + 1))
    assert [c.name for c in complete_checkpoints(run)] == ["step-0000020", "step-0000040"]
    accounting = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,State,NTasks"],
                                capture_output=True, text=True, check=True).stdout
    rows = {row.split("|")[0]: row.split("|")[1:] for row in accounting.splitlines()}
    assert rows[job_id][0] == "COMPLETED"
    assert rows[f"{job_id}.0"] == ["COMPLETED", "2"]  # the srun step ran the 2 tasks


def test_preempted_job_is_requeued_and_resumes_to_the_same_weights(reference_run, tmp_path, digits_shards):
    run = tmp_path / "preempted"
    proc = run_launch("train", "--cluster", "slurm", "--tasks-per-node", "2", "--time", "10", "--",
                      *train_args(run, digits_shards, *TRAIN))
    assert proc.returncode == 0, proc.stderr[-4000:]
    job_id = submitted_job_id(proc.stdout)
    wait_until(lambda: (run / "log.jsonl").exists() and len(logged_steps(run)) >= 5, 300, "5 training steps")
    # What SLURM does at the time limit (--signal=USR2@delay) or what submitit's pre-emption test sends.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    job = submitit.SlurmJob(folder=run / ".submitit", job_id=job_id, tasks=[0, 1])
    wait_until(job.done, 400, f"job {job_id} to finish after its requeue")
    results = job.results()
    assert [r["requeues"] for r in results] == [1, 1], results
    assert [r["slurm_restart_count"] for r in results] == [1, 1]
    log0 = (run / ".submitit" / f"{job_id}_0_log.out").read_text()
    assert "stopped by signal" in log0 and "requeueing through submitit" in log0
    assert logged_steps(run) == list(range(1, STEPS + 1))  # no step lost or repeated across the requeue
    reference_step, reference = final_weights(reference_run[0])
    step, resumed = final_weights(run)
    assert step == reference_step == f"step-{STEPS:07d}"
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.allclose(reference[name], resumed[name], atol=1e-6, rtol=1e-5), name


def test_a_job_that_raises_surfaces_its_traceback(tmp_path, digits_shards):
    run = tmp_path / "broken"
    # Two injected non-finite steps with max_nonfinite=2: the trainer raises FloatingPointError on every rank.
    proc = run_launch("train", "--cluster", "slurm", "--tasks-per-node", "2", "--time", "10", "--wait", "--",
                      *train_args(run, digits_shards, "train.steps=10", "train.max_nonfinite=2",
                                  "train.fault_nonfinite_steps=[1,2]"))
    assert proc.returncode == 1
    assert f"job {submitted_job_id(proc.stdout)} FAILED" in proc.stderr
    assert "Traceback" in proc.stderr and "FloatingPointError: 2 consecutive steps" in proc.stderr
    assert f"{run}/.submitit/" in proc.stderr  # where the full logs are


@pytest.mark.skipif(importlib.util.find_spec("pipeline.generate") is None,
                    reason="`python -m pipeline generate` (issue 6) has not landed yet")
def test_generation_array_equals_a_single_process_run_byte_for_byte(reference_run, tmp_path):
    generate = ["--checkpoint", str(reference_run[0]), "--num-samples", "24", "--shard-size", "8",
                "--batch-size", "8", "--seed", "7"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "pipeline", "generate", *generate, "--out", str(single)], cwd=REPO,
                   env=job_env(), check=True, capture_output=True, timeout=600)
    array = tmp_path / "array"
    proc = run_launch("generate", "--cluster", "slurm", "--array", "3", "--time", "10", "--wait", "--",
                      *generate, "--out", str(array))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "submitted 3 job(s) to slurm" in proc.stdout
    single_shards = sorted(p.name for p in single.glob("shard-*.tar"))
    assert len(single_shards) == 3 and sorted(p.name for p in array.glob("shard-*.tar")) == single_shards
    for name in single_shards:
        assert (array / name).read_bytes() == (single / name).read_bytes(), name
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (single, array)]
    assert [s["sha256"] for s in manifests[0]["shards"]] == [s["sha256"] for s in manifests[1]["shards"]]
