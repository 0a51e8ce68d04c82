"""Build submitit executors (SLURM or local processes) from one description of the resources a job needs."""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import sys
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from submitit.slurm import slurm as submitit_slurm

CLUSTERS = ("auto", "slurm", "local")
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
MEM_PATTERN = re.compile(r"^\d+[KMGT]?$")


@dataclass(frozen=True)
class Resources:
    """What one job asks for. One task per GPU when GPUs are requested, else `tasks_per_node` tasks per node."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None  # SLURM syntax per node: 16G, 4000M
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "pipeline"
    signal_delay_s: int | None = None  # how long before the time limit the checkpoint signal comes; None:
    # 120 s, or a quarter of a limit shorter than 8 minutes
    setup: tuple[str, ...] = ()  # shell lines run before the tasks start (module load, source venv, ...)
    array_parallelism: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("nodes", "tasks_per_node", "time_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(f"one task per GPU: tasks_per_node ({self.tasks_per_node}) must equal "
                             f"gpus_per_node ({self.gpus_per_node})")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"cpus_per_task must be >= 1, got {self.cpus_per_task}")
        if self.mem is not None and not MEM_PATTERN.match(self.mem):
            raise ValueError(f"mem must look like 16G or 4000M (SLURM syntax), got {self.mem!r}")
        if self.signal_delay_s is None:
            object.__setattr__(self, "signal_delay_s", min(120, self.time_min * 15))
        if self.signal_delay_s < 0 or self.signal_delay_s >= self.time_min * 60:
            raise ValueError(f"signal_delay_s ({self.signal_delay_s}) must be in [0, time limit "
                             f"{self.time_min * 60} s)")
        if self.array_parallelism is not None and self.array_parallelism < 1:
            raise ValueError(f"array_parallelism must be >= 1, got {self.array_parallelism}")

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.tasks_per_node


def resolve_cluster(name: str) -> str:
    """`auto` means SLURM when `sbatch` is on PATH, else local processes."""
    if name not in CLUSTERS:
        raise ValueError(f"unknown cluster {name!r}; choose one of {', '.join(CLUSTERS)}")
    if name == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if name == "slurm" and not shutil.which("sbatch"):
        raise RuntimeError("--cluster slurm: `sbatch` is not on PATH (use --cluster local, or run on a login node)")
    return name


def setup_lines(resources: Resources) -> list[str]:
    """Shell lines run before the tasks: the user's, then make this checkout importable, because the job
    unpickles `launch.requeue.PipelineTask` wherever it starts (the project need not be pip-installed)."""
    pythonpath = f"export PYTHONPATH={shlex.quote(PROJECT_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}"
    return [*resources.setup, pythonpath]


def slurm_parameters(resources: Resources) -> dict:
    """submitit's SLURM parameters (sbatch names) for these resources."""
    params: dict = {
        "job_name": resources.job_name,
        "nodes": resources.nodes,
        "ntasks_per_node": resources.tasks_per_node,
        "time": resources.time_min,
        "signal_delay_s": resources.signal_delay_s,
        "stderr_to_stdout": False,
    }
    optional = {
        "gpus_per_node": resources.gpus_per_node or None,
        "cpus_per_task": resources.cpus_per_task,
        "mem": resources.mem,
        "partition": resources.partition,
        "account": resources.account,
        "qos": resources.qos,
        "constraint": resources.constraint,
        "array_parallelism": resources.array_parallelism,
        "setup": setup_lines(resources),
        "additional_parameters": dict(resources.extra) or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def local_parameters(resources: Resources) -> dict:
    if resources.nodes != 1:
        raise ValueError(f"--cluster local runs on this machine only: nodes must be 1, got {resources.nodes}")
    params: dict = {
        "tasks_per_node": resources.tasks_per_node,
        "gpus_per_node": resources.gpus_per_node,
        "timeout_min": resources.time_min,
        "signal_delay_s": resources.signal_delay_s,
    }
    if resources.setup:
        # submitit runs a local job through `sh -c` when given setup lines, and then signals the shell instead of
        # the job: pre-emption and cancel stop working. Prepare the environment in the launching shell instead.
        raise ValueError("--setup applies to SLURM jobs only; for --cluster local prepare the environment in the "
                         "shell that launches")
    return params


def make_executor(cluster: str, folder: Path, resources: Resources, max_requeues: int = 3) -> submitit.Executor:
    """An executor writing its pickles and logs to `folder`. `max_requeues` bounds requeues after time-outs
    (pre-emptions before 80% of the time limit do not count, as submitit decides)."""
    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder, max_num_timeout=max_requeues)
        executor.update_parameters(**slurm_parameters(resources))
    elif cluster == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=max_requeues)
        executor.update_parameters(**local_parameters(resources))
    else:
        raise ValueError(f"make_executor needs a resolved cluster (slurm or local), got {cluster!r}")
    return executor


@contextlib.contextmanager
def importable_project() -> tp.Iterator[None]:
    """While submitting, put this checkout on PYTHONPATH: local jobs (and SLURM jobs, which export the submitting
    environment by default) inherit it and can unpickle `launch.requeue.PipelineTask`."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, previous) if p)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


def submit(executor: submitit.Executor, tasks: tp.Sequence[tp.Callable]) -> list[submitit.Job]:
    """Submit one job per task (a job array on SLURM when there are several)."""
    with importable_project():
        return executor.submit_array(list(tasks)) if len(tasks) > 1 else [executor.submit(tasks[0])]


def sbatch_script(folder: Path, resources: Resources, array_size: int | None = None) -> str:
    """The sbatch script `make_executor("slurm", ...)` would submit (no SLURM needed, nothing written)."""
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params = slurm_parameters(resources)
    return submitit_slurm._make_sbatch_string(command=command, folder=folder, map_count=array_size, **params)
