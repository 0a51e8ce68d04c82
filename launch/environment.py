"""Rank wiring: turn submitit's JobEnvironment (SLURM or local variables) into torchrun-style variables.

The pipeline's trainer reads RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (as torchrun sets them;
LOCAL_WORLD_SIZE and NODE_RANK are set too) and hands them to `deepspeed.init_distributed`. Every task computes
the same values on its own, without talking to the others: the master is the first node of the allocation and
the port is a function of the job id and its requeue count (SLURM_RESTART_COUNT).
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

PORT_BASE = 20000
PORT_SPAN = 20000  # ports 20000-39999: above the well-known range, below Linux's ephemeral range (32768+ overlaps
# a little, but a collision needs the same port picked by a client socket on the same host at the same moment)


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int

    def as_env(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "NODE_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def master_port(job_id: str, restart_count: int = 0) -> int:
    """A port every task of one job agrees on. A requeued job (same id) gets a different one, so a socket of the
    previous run still in TIME_WAIT cannot make the rendezvous fail."""
    return PORT_BASE + zlib.crc32(f"{job_id}/{restart_count}".encode()) % PORT_SPAN


def restart_count() -> int:
    """How many times SLURM requeued this job (0 outside SLURM)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def ranks_from_job_environment(job_env) -> Ranks:
    """Ranks of the current task from a `submitit.JobEnvironment` (only valid inside a submitit job)."""
    num_nodes = max(1, job_env.num_nodes)
    if job_env.num_tasks % num_nodes:
        raise ValueError(f"{job_env.num_tasks} tasks do not split evenly over {num_nodes} nodes")
    # Local jobs run on this machine only; the loopback address avoids depending on the hostname resolving.
    master_addr = job_env.hostnames[0] if job_env.cluster == "slurm" else "127.0.0.1"
    return Ranks(
        rank=job_env.global_rank,
        local_rank=job_env.local_rank,
        world_size=job_env.num_tasks,
        local_world_size=job_env.num_tasks // num_nodes,
        node_rank=job_env.node,
        master_addr=master_addr,
        master_port=master_port(job_env.job_id, restart_count()),
    )


def child_environment(ranks: Ranks, project_root: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the pipeline process a task runs: the rank variables, the project importable, and one
    CPU thread per allotted CPU (SLURM_CPUS_PER_TASK) unless the user chose OMP_NUM_THREADS."""
    env = dict(os.environ if base is None else base)
    env.update(ranks.as_env())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", env.get("SLURM_CPUS_PER_TASK", "1"))
    env["PYTHONUNBUFFERED"] = "1"  # logs reach the submitit log files as they are written
    return env
