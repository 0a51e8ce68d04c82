"""`python -m launch {train,generate,encode} [options] -- <pipeline args>`: submit pipeline commands through submitit.

    python -m launch train --cluster slurm --nodes 2 --gpus-per-node 8 --time 240 -- \\
        --config configs/tiny.yaml --out runs/exp1
    python -m launch generate --array 8 --gpus-per-node 1 -- --checkpoint runs/exp1/export/latest.safetensors \\
        --num-samples 50000 --out gen/exp1

The submitit folder (job pickles, one log per task) goes to OUT/.submitit/, beside the checkpoints (hidden, so
that `pipeline generate` still sees OUT as its own folder). Jobs are requeued after a checkpoint when SLURM
signals the time limit or a pre-emption; see launch/requeue.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from launch.executors import CLUSTERS, Resources, make_executor, resolve_cluster, sbatch_script, submit
from launch.requeue import PipelineTask, pipeline_command
from pipeline.cli import OneLineParser, count, non_negative
from pipeline.conventions import COLLECTIVE_TIMEOUT_ENV
from pipeline.errors import PipelineError


TASK_SPLIT_FLAGS = ("--task-index", "--num-tasks")
SUBMITIT_DIR = ".submitit"  # under OUT; a dot name, which `pipeline generate` tolerates in its output folder


class LaunchError(PipelineError):
    """Bad launcher input (flags, cluster size, run folder): one line on stderr, exit 2, nothing submitted."""


def add_resource_arguments(parser: argparse.ArgumentParser, multi_task: bool) -> None:
    parser.add_argument("--cluster", choices=CLUSTERS, default="auto",
                        help="where to run: slurm, local processes on this machine, or auto (slurm when `sbatch` "
                             "is on PATH)")
    parser.add_argument("--time", type=count, default=60, metavar="MIN", help="time limit per job in minutes")
    parser.add_argument("--gpus-per-node", type=non_negative, default=0, metavar="G",
                        help="GPUs per node (training runs one task per GPU)")
    if multi_task:
        parser.add_argument("--nodes", type=count, default=1, metavar="N", help="number of nodes")
        parser.add_argument("--tasks-per-node", type=count, default=None, metavar="T",
                            help="tasks (processes) per node on CPU; with --gpus-per-node it must equal G")
        parser.add_argument("--collective-timeout", type=float, default=None, metavar="S",
                            help="seconds a collective waits for the other ranks before the job fails (a dead "
                                 "node ends the job instead of hanging it; default 600)")
    parser.add_argument("--cpus-per-task", type=count, default=None, metavar="C",
                        help="CPU cores per task (also OMP_NUM_THREADS of the task unless already set)")
    parser.add_argument("--mem", default=None, metavar="M", help="memory per node in SLURM syntax, e.g. 64G")
    parser.add_argument("--partition", default=None, metavar="P", help="SLURM partition")
    parser.add_argument("--account", default=None, metavar="A", help="SLURM account to charge")
    parser.add_argument("--qos", default=None, metavar="Q", help="SLURM quality of service")
    parser.add_argument("--constraint", default=None, metavar="C", help="SLURM node feature constraint")
    parser.add_argument("--job-name", default=None, help="job name shown by squeue (default: pipeline-COMMAND)")
    parser.add_argument("--signal-delay", type=non_negative, default=None, metavar="S",
                        help="seconds before the time limit at which the job is told to checkpoint and requeue "
                             "(default: 120, or a quarter of a time limit under 8 minutes)")
    parser.add_argument("--max-requeues", type=non_negative, default=3, metavar="K",
                        help="give up after the job hit its time limit this many times (pre-emptions do not count)")
    parser.add_argument("--setup", action="append", default=[], metavar="CMD",
                        help="shell line run in the job before the tasks (repeatable), e.g. 'module load cuda'")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sbatch script that would be submitted and exit (submits nothing)")
    parser.add_argument("--wait", action="store_true",
                        help="wait for the job to finish; exit 1 and print the traceback if it failed")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m launch", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Everything after `--` is passed to `python -m pipeline COMMAND`.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = sub.add_parser("train", help="submit one (multi-node, multi-task) training job")
    add_resource_arguments(train, multi_task=True)
    for name, what in (("generate", "generation"), ("encode", "encoding to latents")):  # the same shard split
        array = sub.add_parser(name, help=f"submit {what}, optionally as a job array")
        add_resource_arguments(array, multi_task=False)
        array.add_argument("--array", type=count, default=1, metavar="n",
                           help=f"split {what} over n array tasks (adds --task-index k --num-tasks n)")
        array.add_argument("--array-parallelism", type=count, default=None, metavar="p",
                           help="at most p array tasks run at once (SLURM only)")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, pipeline arguments): the pipeline's come after the first `--`."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def option_value(args: list[str], flag: str) -> str | None:
    """The value of `flag` in a pipeline argument list (`--flag V` or `--flag=V`), None when absent."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


def output_folder(pipeline_args: list[str]) -> Path:
    """OUT from the pipeline's `--out`: required, because a requeued job must resume in the same folder."""
    out = option_value(pipeline_args, "--out")
    if not out:
        raise LaunchError("the pipeline arguments need `--out DIR` (a requeued job resumes there, and the "
                          f"submitit logs go to DIR/{SUBMITIT_DIR})")
    return Path(out).resolve()


def resources_from_args(args: argparse.Namespace) -> Resources:
    gpus = args.gpus_per_node
    tasks = getattr(args, "tasks_per_node", None)
    return Resources(
        nodes=getattr(args, "nodes", 1),
        tasks_per_node=tasks if tasks is not None else max(gpus, 1),
        gpus_per_node=gpus,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        time_min=args.time,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        job_name=args.job_name or f"pipeline-{args.command}",
        signal_delay_s=args.signal_delay,
        setup=tuple(args.setup),
        array_parallelism=getattr(args, "array_parallelism", None),
    )


def cluster_nodes(partition: str | None) -> list[str]:
    """The node names of the SLURM partition (all partitions when None), as `sinfo` lists them."""
    command = ["sinfo", "-h", "-N", "-o", "%N", *(["-p", partition] if partition else [])]
    listed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if listed.returncode != 0:
        raise LaunchError(f"`{' '.join(command)}` failed: {listed.stderr.strip()}")
    return sorted(set(listed.stdout.split()))


def check_cluster_size(resources: Resources) -> None:
    """A job asking for more nodes than exist would wait in the queue forever (or be refused with a traceback)."""
    nodes = cluster_nodes(resources.partition)
    where = f"partition {resources.partition}" if resources.partition else "the cluster"
    if resources.nodes > len(nodes):
        raise LaunchError(f"--nodes {resources.nodes}: {where} has {len(nodes)} node(s) ({', '.join(nodes)}); "
                          f"ask for at most {len(nodes)}")


def check_world_divides_global_batch(out: Path, world_size: int) -> None:
    """Resuming a run keeps its global batch (micro_batch x ranks x grad_accum when its newest checkpoint was
    written): another number of ranks must divide it, or no micro-batch size could keep the training the same."""
    checkpoints = sorted((out / "checkpoints").glob("step-*/COMPLETE"))
    config_file = out / "config.yaml"
    if not checkpoints or not config_file.is_file():
        return  # a new run: its global batch follows from this world size
    import yaml

    saved_world = json.loads(checkpoints[-1].read_text())["world_size"]
    train = yaml.safe_load(config_file.read_text())["train"]
    per_rank_step = train["micro_batch"] * train["grad_accum"]
    global_batch = per_rank_step * saved_world
    if global_batch % (world_size * train["grad_accum"]):
        raise LaunchError(
            f"--nodes x --tasks-per-node = {world_size} ranks: {out} resumes a run whose global batch is "
            f"{global_batch} ({train['micro_batch']} x {saved_world} ranks x {train['grad_accum']} accumulation), "
            f"which {world_size} ranks x {train['grad_accum']} accumulation steps do not divide")


def build_tasks(args: argparse.Namespace, pipeline_args: list[str]) -> list[PipelineTask]:
    """One PipelineTask per job: training is one job; generation and encoding `--array n` jobs, task k of n each."""
    if args.command == "train":
        env = {}
        if args.collective_timeout is not None:
            if not args.collective_timeout > 0:
                raise LaunchError(f"--collective-timeout must be > 0 seconds, got {args.collective_timeout}")
            env[COLLECTIVE_TIMEOUT_ENV] = str(args.collective_timeout)
        return [PipelineTask(pipeline_command("train", pipeline_args), env=env)]
    if args.array == 1:
        return [PipelineTask(pipeline_command(args.command, pipeline_args))]
    given = [f for f in TASK_SPLIT_FLAGS if option_value(pipeline_args, f) is not None]
    if given:
        raise LaunchError(f"with --array the launcher sets {' and '.join(TASK_SPLIT_FLAGS)}; "
                          f"remove {', '.join(given)} from the pipeline arguments")
    return [PipelineTask(pipeline_command(args.command, [*pipeline_args, "--task-index", str(k),
                                                         "--num-tasks", str(args.array)]))
            for k in range(args.array)]


def describe(jobs: list, cluster: str, folder: Path, out: Path) -> str:
    first = jobs[0]
    lines = [f"submitted {len(jobs)} job(s) to {cluster}: {', '.join(j.job_id for j in jobs)}",
             f"  logs:     {first.paths.stdout}  (and .err; one pair per task)",
             f"  submitit: {folder}",
             f"  output:   {out}"]
    if cluster == "slurm":
        lines.append(f"  watch:    squeue -j {first.job_id.split('_')[0]}; sacct -j {first.job_id.split('_')[0]}")
    return "\n".join(lines)


def wait_for(jobs: list) -> int:
    """Wait for every job; print each failure (with the task's traceback) and return 1 if any failed."""
    failed = 0
    for job in jobs:
        try:
            results = job.results()
            print(f"job {job.job_id} finished: {results}")
        except Exception as error:  # submitit raises FailedJobError / UncompletedJobError with the logs
            failed += 1
            print(f"job {job.job_id} FAILED:\n{error}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    launcher_argv, pipeline_args = split_argv(argv)
    args = build_parser().parse_args(launcher_argv)
    try:
        return launch(args, pipeline_args)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def launch(args: argparse.Namespace, pipeline_args: list[str]) -> int:
    if not pipeline_args:
        raise LaunchError("give the pipeline arguments after `--`, e.g. "
                          "python -m launch train -- --config configs/tiny.yaml --out runs/x")
    out = output_folder(pipeline_args)
    folder = out / SUBMITIT_DIR
    try:
        resources = resources_from_args(args)
    except ValueError as error:
        raise LaunchError(str(error)) from None
    tasks = build_tasks(args, pipeline_args)
    if args.command == "train":
        check_world_divides_global_batch(out, resources.num_tasks)
    if args.dry_run:
        print(sbatch_script(folder, resources, array_size=len(tasks) if len(tasks) > 1 else None))
        print(f"# each task runs: {' '.join(tasks[0].command)}", file=sys.stderr)
        return 0
    try:
        cluster = resolve_cluster(args.cluster)
        if cluster == "slurm":
            check_cluster_size(resources)
        executor = make_executor(cluster, folder, resources, max_requeues=args.max_requeues)
    except (ValueError, RuntimeError) as error:
        raise LaunchError(str(error)) from None
    jobs = submit(executor, tasks)
    print(describe(jobs, cluster, folder, out), flush=True)
    return wait_for(jobs) if args.wait else 0
