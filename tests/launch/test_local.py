"""The launcher on submitit's local executor: real processes, real signals, the real trainer for one run."""
import json
import sys

import pytest
import submitit

from launch.executors import Resources, make_executor, submit
from launch.requeue import PipelineTask
from tests.launch.conftest import STEP_WORKER, run_launch, train_args


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def worker_task(out, *args):
    return PipelineTask([sys.executable, str(STEP_WORKER), "--out", str(out), *args])


def test_two_local_tasks_get_torchrun_variables(tmp_path):
    executor = make_executor("local", tmp_path / "submitit", Resources(tasks_per_node=2, time_min=2))
    [job] = submit(executor, [worker_task(tmp_path, "--steps", "2", "--step-seconds", "0.01")])
    results = job.results()
    assert [r["rank"] for r in results] == [0, 1] and {r["returncode"] for r in results} == {0}
    starts = [read_lines(tmp_path / f"starts-{rank}.jsonl")[0] for rank in (0, 1)]
    assert [s["RANK"] for s in starts] == ["0", "1"] and [s["LOCAL_RANK"] for s in starts] == ["0", "1"]
    assert {s["WORLD_SIZE"] for s in starts} == {"2"} and {s["MASTER_ADDR"] for s in starts} == {"127.0.0.1"}
    assert len({s["MASTER_PORT"] for s in starts}) == 1  # both ranks agree without talking to each other


def start_job_with_time_limit_signal(tmp_path, *worker_args):
    # 1-minute limit, signal 50 s before it: the local controller sends SIGUSR2 ~10 s in, mid-run.
    executor = make_executor("local", tmp_path / "submitit",
                             Resources(tasks_per_node=2, time_min=1, signal_delay_s=50))
    [job] = submit(executor, [worker_task(tmp_path, "--steps", "120", "--step-seconds", "0.1", *worker_args)])
    return job


def test_time_limit_signal_checkpoints_requeues_and_resumes(tmp_path):
    results = start_job_with_time_limit_signal(tmp_path).results()
    assert all(r["requeues"] >= 1 for r in results), results
    for rank in (0, 1):
        events = read_lines(tmp_path / f"events-{rank}.jsonl")
        assert "stopped_at" in events[0] and 0 < events[0]["stopped_at"] < 120
        assert events[-1]["finished_at"] == 120
        assert all(len(e["signals"]) <= 1 for e in events)  # forwarded once, not twice
        resumed_from = [s["step"] for s in read_lines(tmp_path / f"starts-{rank}.jsonl")]
        assert resumed_from[0] == 0 and resumed_from[1] == events[0]["stopped_at"]


def test_a_command_without_signal_handler_is_requeued_and_continues(tmp_path):
    # Like `pipeline generate`: the stop signal ends the command, its finished work stays, the rerun skips it.
    results = start_job_with_time_limit_signal(tmp_path, "--no-handler").results()
    assert all(r["requeues"] >= 1 for r in results), results
    for rank in (0, 1):
        resumed_from = [s["step"] for s in read_lines(tmp_path / f"starts-{rank}.jsonl")]
        assert resumed_from[0] == 0 and 0 < resumed_from[1] < 120
        assert read_lines(tmp_path / f"events-{rank}.jsonl") == [{"finished_at": 120, "signals": []}]


def test_a_failing_command_surfaces_its_traceback(tmp_path):
    executor = make_executor("local", tmp_path / "submitit", Resources(time_min=2))
    [job] = submit(executor, [worker_task(tmp_path, "--fail")])
    with pytest.raises(submitit.core.utils.FailedJobError) as failure:
        job.result()
    message = str(failure.value)
    assert "exited with code 1" in message
    assert "Traceback" in message and "ValueError: step_worker rank 0 was asked to fail" in message


def test_cli_trains_two_local_tasks_with_the_real_trainer(tmp_path, digits_shards):
    run = tmp_path / "run"
    proc = run_launch("train", "--cluster", "local", "--tasks-per-node", "2", "--time", "10", "--wait", "--",
                      *train_args(run, digits_shards, "train.steps=4", "train.ckpt_every=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted 1 job(s) to local" in proc.stdout and f"{run}/.submitit" in proc.stdout
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert len(list((run / ".submitit").glob("*_1_log.out"))) == 1  # one log per task, beside the run
