"""Fast checks of the launcher without a cluster: the sbatch script, argument errors, rank wiring."""
import pytest
from submitit.slurm.slurm import SlurmJobEnvironment

from launch.cli import build_parser, build_tasks, main
from launch.environment import child_environment, master_port, ranks_from_job_environment
from launch.executors import Resources, local_parameters, resolve_cluster


def sbatch_lines(capsys, *argv: str) -> list[str]:
    assert main(list(argv)) == 0
    return capsys.readouterr().out.splitlines()


def test_dry_run_prints_a_multi_node_gpu_training_script(capsys, tmp_path):
    run = tmp_path / "exp1"
    lines = sbatch_lines(capsys, "train", "--cluster", "slurm", "--nodes", "2", "--gpus-per-node", "4",
                         "--cpus-per-task", "8", "--mem", "64G", "--time", "30", "--partition", "gpu",
                         "--account", "proj", "--qos", "high", "--constraint", "a100", "--signal-delay", "90",
                         "--setup", "module load cuda", "--dry-run",
                         "--", "--config", "configs/tiny.yaml", "--out", str(run))
    assert lines[0] == "#!/bin/bash"
    for expected in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=64G",
                     "--time=30", "--partition=gpu", "--account=proj", "--qos=high", "--constraint=a100",
                     "--signal=USR2@90", "--job-name=pipeline-train", f"--output={run}/.submitit/%j_0_log.out"]:
        assert f"#SBATCH {expected}" in lines, expected
    assert "module load cuda" in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert f"{run}/.submitit/%j_%t_log.out" in srun and srun.endswith(f"submitit.core._submit {run}/.submitit")
    assert not run.exists()  # a dry run writes nothing


def test_dry_run_of_a_generation_array(capsys, tmp_path):
    out = tmp_path / "gen"
    lines = sbatch_lines(capsys, "generate", "--array", "3", "--array-parallelism", "2", "--dry-run",
                         "--", "--checkpoint", "run/export/latest.safetensors", "--num-samples", "30",
                         "--out", str(out))
    assert "#SBATCH --array=0-2%2" in lines
    assert f"#SBATCH --output={out}/.submitit/%A_%a_0_log.out" in lines
    assert "#SBATCH --ntasks-per-node=1" in lines


def test_dry_run_on_cpu_uses_the_requested_tasks(capsys, tmp_path):
    lines = sbatch_lines(capsys, "train", "--tasks-per-node", "3", "--dry-run", "--", "--out", str(tmp_path / "r"))
    assert "#SBATCH --ntasks-per-node=3" in lines
    assert not any(line.startswith("#SBATCH --gpus") for line in lines)


@pytest.mark.parametrize("argv, message", [
    (["train", "--dry-run"], "after `--`"),
    (["train", "--dry-run", "--", "--config", "configs/tiny.yaml"], "--out DIR"),
    (["train", "--gpus-per-node", "4", "--tasks-per-node", "2", "--dry-run", "--", "--out", "r"],
     "tasks_per_node (2) must equal gpus_per_node (4)"),
    (["train", "--mem", "lots", "--dry-run", "--", "--out", "r"], "mem must look like 16G"),
    (["train", "--time", "1", "--signal-delay", "90", "--dry-run", "--", "--out", "r"], "signal_delay_s (90)"),
    (["generate", "--array", "2", "--dry-run", "--", "--out", "g", "--task-index", "0"],
     "remove --task-index"),
])
def test_bad_arguments_name_what_is_wrong(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("argv, message", [  # refused while parsing (argparse types from pipeline.cli)
    (["generate", "--array", "0", "--dry-run", "--", "--out", "g"], "argument --array: 0 is out of range"),
    (["train", "--nodes", "0", "--dry-run", "--", "--out", "r"], "argument --nodes: 0 is out of range (allowed: >= 1)"),
    (["train", "--time", "soon", "--dry-run", "--", "--out", "r"], "argument --time: 'soon' is not an integer"),
])
def test_bad_flag_values_are_one_line_at_parse(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_collective_timeout_reaches_the_task_and_must_be_positive(capsys, tmp_path):
    args = build_parser().parse_args(["train", "--collective-timeout", "45"])
    [task] = build_tasks(args, ["--out", str(tmp_path)])
    assert task.env == {"PIPELINE_COLLECTIVE_TIMEOUT_S": "45.0"}
    assert main(["train", "--collective-timeout", "0", "--dry-run", "--", "--out", str(tmp_path)]) == 2
    assert "--collective-timeout must be > 0" in capsys.readouterr().err


def test_resuming_at_a_world_size_that_does_not_divide_the_global_batch_is_refused(capsys, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000020").mkdir(parents=True)
    (run / "checkpoints" / "step-0000020" / "COMPLETE").write_text('{"step": 20, "world_size": 2}')
    (run / "config.yaml").write_text("train:\n  micro_batch: 16\n  grad_accum: 1\n")
    before = sorted(p.name for p in run.rglob("*"))
    assert main(["train", "--nodes", "3", "--dry-run", "--", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "3 ranks" in err and "global batch is 32" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written
    assert main(["train", "--nodes", "4", "--dry-run", "--", "--out", str(run)]) == 0  # 32 = 8 x 4


def test_local_cluster_refuses_several_nodes_and_setup_lines():
    with pytest.raises(ValueError, match="nodes must be 1"):
        local_parameters(Resources(nodes=2))
    with pytest.raises(ValueError, match="--setup applies to SLURM"):
        local_parameters(Resources(setup=("module load x",)))


def test_ranks_come_from_the_slurm_variables_of_a_two_node_job(monkeypatch):
    # What slurmstepd sets for global task 5 of 8 (4 per node), second node of "gpu[07-08]".
    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
                        "SLURM_NODEID": "1", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
                        "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(name, value)
    ranks = ranks_from_job_environment(SlurmJobEnvironment())
    assert (ranks.rank, ranks.local_rank, ranks.world_size, ranks.local_world_size, ranks.node_rank) == \
        (5, 1, 8, 4, 1)
    assert ranks.master_addr == "gpu07"  # first node of the allocation, the same on every task
    assert ranks.master_port == master_port("4242", 0)
    env = child_environment(ranks, "/project", base={"PYTHONPATH": "/other", "SLURM_CPUS_PER_TASK": "6"})
    assert env["RANK"] == "5" and env["LOCAL_RANK"] == "1" and env["WORLD_SIZE"] == "8"
    assert env["MASTER_ADDR"] == "gpu07" and env["PYTHONPATH"] == "/project:/other"
    assert env["OMP_NUM_THREADS"] == "6"


def test_master_port_is_stable_per_job_and_changes_on_requeue():
    assert master_port("4242", 0) == master_port("4242", 0)
    assert master_port("4242", 0) != master_port("4242", 1)
    ports = {master_port(str(job), 0) for job in range(1000)}
    assert len(ports) > 950 and all(20000 <= p < 40000 for p in ports)


def test_auto_picks_slurm_only_where_sbatch_is_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resolve_cluster("auto") == "local"
    with pytest.raises(RuntimeError, match="`sbatch` is not on PATH"):
        resolve_cluster("slurm")
    sbatch = tmp_path / "sbatch"
    sbatch.write_text("#!/bin/sh\n")
    sbatch.chmod(0o755)
    assert resolve_cluster("auto") == "slurm" and resolve_cluster("local") == "local"
