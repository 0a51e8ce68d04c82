"""End to end on a real 2-node SLURM (tests/slurm/start.sh): real sbatch/srun/scontrol/sacct, one slurmd per
node in its own network namespace, the real trainer talking gloo over TCP between the nodes."""
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import complete_checkpoints
from pipeline.data.cache import ShardCache
from pipeline.data.shards import shard_specs
from tests.launch.conftest import REPO, job_env, run_launch, train_args
from tests.net.servers import FaultProxy, Nginx

pytestmark = pytest.mark.usefixtures("slurm_cluster")

STEPS = 40
TRAIN = ("train.steps=40", "train.ckpt_every=20")
TWO_NODES = ("--nodes", "2", "--tasks-per-node", "1")


def submitted_job_id(stdout: str) -> str:
    found = re.search(r"submitted \d+ job\(s\) to slurm: (\S+)", stdout)
    assert found, stdout
    return found.group(1).split(",")[0]


def logged_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def final_weights(run) -> tuple[str, dict]:
    ckpt = complete_checkpoints(run)[-1]
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return ckpt.name, states["module"]


def assert_same_weights(run, reference_run) -> None:
    """Same world size, same data, same noise: equal up to fp32 reduction-order noise."""
    reference_step, reference = final_weights(reference_run)
    step, weights = final_weights(run)
    assert step == reference_step == f"step-{STEPS:07d}"
    assert reference.keys() == weights.keys()
    for name in reference:
        assert torch.allclose(reference[name], weights[name], atol=1e-6, rtol=1e-5), name


def accounting(job_id: str, fields: str, allocations_only: bool = False) -> dict[str, list[str]]:
    """sacct rows of a job (and its steps unless allocations_only), keyed by JobID."""
    command = ["sacct", "-n", "-P", "-j", job_id, "-o", f"JobID,{fields}", *(["-X"] if allocations_only else [])]
    rows = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
    return {row.split("|")[0]: row.split("|")[1:] for row in rows}


def node_states() -> dict[str, str]:
    """sinfo's state of every node, e.g. {"node1": "idle", "node2": "completing"}."""
    rows = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, check=True).stdout
    return dict(row.split() for row in rows.splitlines())


def task_log(run, job_id: str, rank: int) -> str:
    return (run / ".submitit" / f"{job_id}_{rank}_log.out").read_text()


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, digits_shards):
    """An uninterrupted training job on 2 nodes x 1 task (gloo between the nodes' namespaces), submitted like a
    user does and waited for. One data-loader unit per rank (num_workers 0, the default)."""
    run = tmp_path_factory.mktemp("slurm") / "two-nodes"
    proc = run_launch("train", "--cluster", "slurm", *TWO_NODES, "--time", "10", "--wait", "--",
                      *train_args(run, digits_shards, *TRAIN))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return run, proc.stdout


def test_two_node_job_equals_one_process_on_the_same_global_batch(two_node_run, tmp_path, digits_shards):
    run, stdout = two_node_run
    job_id = submitted_job_id(stdout)
    assert f"squeue -j {job_id}" in stdout and f"{run}/.submitit/{job_id}_0_log.out" in stdout
    assert "'rank': 0, 'world_size': 2" in stdout and "'rank': 1, 'world_size': 2" in stdout
    assert logged_steps(run) == list(range(1, STEPS + 1))
    assert [c.name for c in complete_checkpoints(run)] == ["step-0000020", "step-0000040"]
    # `--wait` returns once every task wrote its result; the batch script ends a moment later.
    wait_until(lambda: accounting(job_id, "State", allocations_only=True)[job_id][0] != "RUNNING", 120,
               f"sacct to show job {job_id} ended")
    rows = accounting(job_id, "State,NNodes,NodeList,NTasks")
    assert rows[job_id][:3] == ["COMPLETED", "2", "node[1-2]"], rows
    assert rows[f"{job_id}.0"] == ["COMPLETED", "2", "node[1-2]", "2"], rows  # the srun step: 1 task per node
    assert "task 0/2 on node1" in task_log(run, job_id, 0) and "task 1/2 on node2" in task_log(run, job_id, 1)

    # One process, the same global batch: 2 micro-batches accumulated, read by 2 loader workers, which are the
    # same 2 loader units (same shards, same shuffle) that the 2 ranks were; ids, timesteps and noise follow.
    single = tmp_path / "one-process"
    subprocess.run([sys.executable, "-m", "pipeline", "train",
                    *train_args(single, digits_shards, *TRAIN, "train.grad_accum=2", "data.num_workers=2")],
                   cwd=REPO, env=job_env(), check=True, capture_output=True, timeout=900)
    init = initial_weights(single)
    for load in (lambda r: final_weights(r)[1], lambda r: load_file(r / "export" / "latest.safetensors")):
        nodes, one = load(run), load(single)
        assert nodes.keys() == one.keys() and one.keys() <= init.keys()
        # The suite's criterion (tests/train/test_distributed.py): the gap is fp32 reduction-order noise, tiny
        # next to the distance training moved the weights; other data or noise would be of that distance.
        gap = sum((nodes[n] - one[n]).pow(2).sum() for n in one).sqrt()
        travelled = sum((one[n] - init[n]).pow(2).sum() for n in one).sqrt()
        assert travelled > 0.01, "training did not move the weights: the comparison would prove nothing"
        assert gap < 1e-3 * travelled, f"2 nodes vs 1 process: gap {gap:.3g}, travelled {travelled:.3g}"


def initial_weights(run) -> dict:
    """The weights a run starts from, rebuilt as the trainer builds them (seeded before the model)."""
    from pipeline.config import load_config
    from pipeline.factory import build_model

    config = load_config(run / "config.yaml")
    torch.manual_seed(config.train.seed)
    return {k: v.float() for k, v in build_model(config).state_dict().items()}


def test_asking_for_more_nodes_than_the_cluster_has_is_one_line_and_exit_2(tmp_path):
    run = tmp_path / "too-big"
    proc = run_launch("train", "--cluster", "slurm", "--nodes", "3", "--", "--out", str(run))
    assert proc.returncode == 2
    assert proc.stderr == "error: --nodes 3: the cluster has 2 node(s) (node1, node2); ask for at most 2\n"
    assert not run.exists()


def test_preempted_two_node_job_is_requeued_and_resumes_to_the_same_weights(two_node_run, tmp_path,
                                                                           digits_shards):
    run = tmp_path / "preempted"
    proc = run_launch("train", "--cluster", "slurm", *TWO_NODES, "--time", "10", "--",
                      *train_args(run, digits_shards, *TRAIN, "train.keep_last=5"))  # keeps the pre-emption one
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
    log0, log1 = task_log(run, job_id, 0), task_log(run, job_id, 1)
    stopped = int(re.search(r"stopped by signal \S+ at step (\d+)", log0).group(1))
    assert "requeueing through submitit" in log0 and "on node1" in log0
    assert "task 1: checkpointed; rank 0 requeues the job" in log1 and "on node2" in log1
    # Every rank of both nodes wrote its part of the checkpoint taken at the signal, and the job resumed there.
    ckpt = run / "checkpoints" / f"step-{stopped:07d}"
    assert (ckpt / "COMPLETE").is_file() and stopped < STEPS
    assert sorted(p.name for p in ckpt.glob("trainer_state-rank*.pt")) == ["trainer_state-rank00000.pt",
                                                                          "trainer_state-rank00001.pt"]
    assert f"resumed from {ckpt} at step {stopped}" in log0
    assert logged_steps(run) == list(range(1, STEPS + 1))  # no step lost or repeated across the requeue
    assert_same_weights(run, two_node_run[0])


def node_task_pids(node: str, job_id: str) -> list[int]:
    """The job's processes on one node (the submitit task and the pipeline command it runs), not slurmstepd."""
    listed = subprocess.run(["ip", "netns", "pids", f"slurm-{node}"], capture_output=True, text=True, check=True)
    pids = []
    for pid in map(int, listed.stdout.split()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in environ and b"python" in command:
            pids.append(pid)
    return pids


def test_a_node_that_dies_while_checkpointing_ends_the_job_and_a_rerun_resumes(two_node_run, tmp_path,
                                                                               digits_shards):
    run = tmp_path / "node-failure"
    command = ["train", "--cluster", "slurm", *TWO_NODES, "--time", "10", "--collective-timeout", "60", "--",
               *train_args(run, digits_shards, "train.steps=40", "train.ckpt_every=10")]
    proc = run_launch(*command)
    assert proc.returncode == 0, proc.stderr[-4000:]
    job_id = submitted_job_id(proc.stdout)
    checkpoints = run / "checkpoints"
    wait_until(lambda: (checkpoints / "step-0000010" / "COMPLETE").exists(), 300, "the step-10 checkpoint")
    victims = node_task_pids("node2", job_id)
    assert len(victims) == 2, victims  # the submitit task and its `pipeline train` child
    # Crash node2 the moment the step-20 checkpoint starts to be written (rank 0 creates its folder; it cannot
    # be marked COMPLETE before node2's rank has written its part and joined two barriers).
    wait_until(lambda: (checkpoints / "step-0000020").exists(), 300, "the step-20 checkpoint to start", 0.01)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    job = submitit.SlurmJob(folder=run / ".submitit", job_id=job_id, tasks=[0, 1])
    wait_until(job.done, 180, f"job {job_id} to end after node2 died")
    print(f"job ended {time.time() - killed_at:.1f} s after node2's tasks were killed")
    assert accounting(job_id, "State", allocations_only=True)[job_id] == ["FAILED"]
    rank0_err = (run / ".submitit" / f"{job_id}_0_log.err").read_text()
    # gloo words the dead peer as "reset" or "closed" depending on which side of the TCP close it saw first
    lost_peer = "Connection reset by peer" in rank0_err or "Connection closed by peer" in rank0_err
    assert "in save_checkpoint" in rank0_err and lost_peer, rank0_err[-3000:]
    assert not (checkpoints / "step-0000020" / "COMPLETE").exists()  # the interrupted checkpoint does not count
    assert [c.name for c in complete_checkpoints(run)] == ["step-0000010"]

    rerun = run_launch(*command[:command.index("--")], "--wait", *command[command.index("--"):])
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]
    rerun_id = submitted_job_id(rerun.stdout)
    assert f"resumed from {checkpoints / 'step-0000010'} at step 10" in task_log(run, rerun_id, 0)
    assert logged_steps(run) == list(range(1, STEPS + 1))
    assert_same_weights(run, two_node_run[0])


def controller_address() -> str:
    """The address at which every node reaches this machine (the test cluster's bridge), from the running
    cluster's own config: `SlurmctldHost[0] = HOST(ADDRESS)`."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"SlurmctldHost\[0\]\s*=\s*\S+\((\S+)\)", config)
    assert found, "no SlurmctldHost address in `scontrol show config`"
    return found.group(1)


def test_two_nodes_read_shards_over_http_through_node_local_caches_to_the_same_weights(two_node_run, tmp_path,
                                                                                       digits_shards):
    nginx = Nginx(tmp_path / "nginx")
    shutil.copytree(digits_shards, nginx.www / "digits")
    proxy = FaultProxy(nginx.port, host=controller_address())  # the nodes' namespaces reach it over the bridge
    try:
        run = tmp_path / "http"
        # $SLURMD_NODENAME expands in each task, on its node: one cache folder per node, as a node-local disk is
        proc = run_launch("train", "--cluster", "slurm", *TWO_NODES, "--time", "10", "--wait", "--",
                          *train_args(run, f"{proxy.url}/digits", *TRAIN, "data.num_workers=2",
                                      f"data.cache_dir={tmp_path}/cache-$SLURMD_NODENAME"))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        gets = {path: count for path, count in proxy.requests.items() if path.endswith(".tar")}
    finally:
        proxy.stop()
        nginx.stop()
    # Same data, order and noise as the run from local files (2 loader workers per rank change nothing).
    assert_same_weights(run, two_node_run[0])
    cached = {node: {p.name for p in (tmp_path / f"cache-{node}").glob("*.tar")} for node in ("node1", "node2")}
    specs = {f"/digits/{Path(s.path).name}": ShardCache.entry_name(s) for s in shard_specs(digits_shards)}
    # Each node downloaded each shard its 2 readers needed once (4 readers: 4 reads per shard without the cache);
    # shard 0 also had its first bytes read by train's and the loader's start checks on each of the 2 ranks.
    starts = {path: 4 if path.endswith("shard-000000.tar") else 0 for path in specs}
    assert all(cached.values()) and len(gets) >= 2
    for path, entry in specs.items():
        assert gets.get(path, 0) - starts[path] == sum(entry in names for names in cached.values()), (path, gets)


def test_a_two_task_job_on_one_node_that_raises_surfaces_its_traceback(tmp_path, digits_shards):
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
def test_generation_array_spread_over_both_nodes_equals_one_process_byte_for_byte(two_node_run, tmp_path):
    generate = ["--checkpoint", str(two_node_run[0]), "--num-samples", "24", "--shard-size", "8",
                "--batch-size", "8", "--seed", "7"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "pipeline", "generate", *generate, "--out", str(single)], cwd=REPO,
                   env=job_env(), check=True, capture_output=True, timeout=600)
    array = tmp_path / "array"
    # The job before may still hold or be releasing a node (a `--wait` returns when the tasks have written their
    # results, the batch script ends a moment later); LLN can only spread the tasks over nodes that are free.
    wait_until(lambda: set(node_states().values()) == {"idle"}, 120, "every node to be idle")
    proc = run_launch("generate", "--cluster", "slurm", "--array", "3", "--time", "10", "--wait", "--",
                      *generate, "--out", str(array))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "submitted 3 job(s) to slurm" in proc.stdout
    array_id = submitted_job_id(proc.stdout).split("_")[0]
    # slurmdbd records asynchronously: right after `--wait` a task's row can still be missing (one CI run saw
    # {'node1'} while slurmctld's log had allocated node1, node2, node1)
    wait_until(lambda: [row[0] for row in accounting(array_id, "State", allocations_only=True).values()]
               == ["COMPLETED"] * 3, 120, f"sacct to record the 3 tasks of array {array_id} as completed")
    tasks = accounting(array_id, "NodeList,Submit,Start,End", allocations_only=True)
    nodes = {row[0] for row in tasks.values()}
    assert nodes == {"node1", "node2"}, tasks  # the cluster spreads the array tasks (LLN), as a busy one would
    single_shards = sorted(p.name for p in single.glob("shard-*.tar"))
    assert len(single_shards) == 3 and sorted(p.name for p in array.glob("shard-*.tar")) == single_shards
    for name in single_shards:
        assert (array / name).read_bytes() == (single / name).read_bytes(), name
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (single, array)]
    assert [s["sha256"] for s in manifests[0]["shards"]] == [s["sha256"] for s in manifests[1]["shards"]]
