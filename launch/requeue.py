"""The callable every submitted task runs: a pipeline command as a child process, checkpointable by signal.

Why a child process: submitit's pre-emption handler (SIGUSR2, `JobEnvironment._handle_signals`) calls
`checkpoint()` on global rank 0 ONLY, then requeues the job and exits; the handlers of the other ranks do
nothing. A DeepSpeed checkpoint is collective, so it cannot be taken from inside that handler. Here each task
runs `python -m pipeline ...` as a child; on the signal the child finishes its step, checkpoints on all ranks and
exits with 75 (EX_TEMPFAIL). Only then does rank 0 run submitit's handler (pickle + `scontrol requeue`), and the
other ranks leave without a result file. The requeued job runs the same command: training resumes from the
newest checkpoint (`--resume auto`), generation skips finished shards. A command with no handler of its own
(generation keeps each finished shard) is simply ended by the signal; that is treated as a stop, too.

Signal delivery (verified on SLURM 22.05): SLURM signals every process of the job step, children included
(even in another session), so under SLURM the child already has the signal and is not sent it again. The local
executor signals only the task process, so there the signal is forwarded.
"""
from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import typing as tp
from pathlib import Path

import submitit

from launch.environment import child_environment, ranks_from_job_environment, restart_count
from pipeline.conventions import EXIT_REQUEUE

EXIT_CHECKPOINTED = EXIT_REQUEUE  # the pipeline stopped on a signal after checkpointing; run it again
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)  # the ones the pipeline checkpoints on
STDERR_TAIL_LINES = 80
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class PipelineCommandError(RuntimeError):
    """The pipeline command failed; the message carries its exit code and the end of its stderr (traceback)."""


def pipeline_command(subcommand: str, args: tp.Sequence[str]) -> list[str]:
    """`python -m pipeline SUBCOMMAND ARGS` with the interpreter that submits (the job runs the same one)."""
    return [sys.executable, "-m", "pipeline", subcommand, *args]


class ChildProcess:
    """Runs one command, copies its stderr through while keeping the last lines, and records stop signals."""

    def __init__(self, forward_signals: bool):
        self.forward_signals = forward_signals
        self.caught: list[int] = []
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._proc: subprocess.Popen | None = None

    def _on_signal(self, signum: int, frame: tp.Any) -> None:
        self.caught.append(signum)
        if self.forward_signals and self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signum)

    @contextlib.contextmanager
    def catching(self, signals: tp.Iterable[int]) -> tp.Iterator[None]:
        previous = {s: signal.signal(s, self._on_signal) for s in signals}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def run(self, command: list[str], env: dict[str, str], cwd: str) -> int:
        if self.caught:  # stopped before the child started: nothing new to checkpoint, just requeue
            return EXIT_CHECKPOINTED
        self._proc = subprocess.Popen(command, env=env, cwd=cwd, stderr=subprocess.PIPE)
        if self.caught and self.forward_signals:  # a signal that landed between fork and the assignment above
            self._proc.send_signal(self.caught[-1])
        copier = threading.Thread(target=self._copy_stderr, args=(self._proc.stderr,), daemon=True)
        copier.start()
        returncode = self._proc.wait()  # a handler interrupts the wait, runs, and the wait resumes (PEP 475)
        copier.join(timeout=10)
        return returncode

    def stopped_by_signal(self, returncode: int) -> bool:
        """The child stopped so that a rerun continues: it checkpointed (75), or a command without its own handler
        (e.g. resumable generation, which skips finished shards) was ended by the stop signal we saw."""
        return returncode == EXIT_CHECKPOINTED or (bool(self.caught) and -returncode in self.caught)

    def _copy_stderr(self, stream: tp.BinaryIO) -> None:
        for raw in iter(stream.readline, b""):
            sys.stderr.buffer.write(raw)
            sys.stderr.flush()
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self.stderr_tail.append(line.split("\r")[-1])  # of a progress bar, only its last state


class PipelineTask(submitit.helpers.Checkpointable):
    """One task of a job: run `command` with this task's rank variables; requeue after a checkpointed stop.

    Picklable (submitit ships it to the job). `requeues` counts how often the job was requeued by this task's
    rank 0 (it travels in the pickle that `checkpoint()` writes).
    """

    def __init__(self, command: list[str], workdir: str | None = None, env: dict[str, str] | None = None):
        if not command:
            raise ValueError("PipelineTask needs a non-empty command")
        self.command = list(command)
        self.workdir = os.path.abspath(workdir or os.getcwd())
        self.env = dict(env or {})  # extra variables for the command (e.g. the collective timeout)
        self.requeues = 0

    def __call__(self) -> dict[str, tp.Any]:
        job_env = submitit.JobEnvironment()
        ranks = ranks_from_job_environment(job_env)
        requeue_signal = job_env._usr_sig()
        submitit_handler = signal.getsignal(requeue_signal)  # installed by submitit before calling us
        child = ChildProcess(forward_signals=job_env.cluster != "slurm")
        print(f"[launch] task {ranks.rank}/{ranks.world_size} on {job_env.hostname}: {' '.join(self.command)}",
              flush=True)
        with child.catching(STOP_SIGNALS):
            env = {**child_environment(ranks, PROJECT_ROOT), **self.env}
            returncode = child.run(self.command, env=env, cwd=self.workdir)
        if returncode == 0:
            return {"rank": ranks.rank, "world_size": ranks.world_size, "returncode": 0,
                    "requeues": self.requeues, "slurm_restart_count": restart_count()}
        if child.stopped_by_signal(returncode):
            self._leave_for_requeue(child.caught, ranks.rank, requeue_signal, submitit_handler)
        tail = "\n".join(child.stderr_tail)
        raise PipelineCommandError(
            f"task {ranks.rank}: `{' '.join(self.command)}` exited with code {returncode}; "
            f"end of its stderr:\n{tail}")

    def _leave_for_requeue(self, caught: list[int], rank: int, requeue_signal: int,
                           submitit_handler: tp.Any) -> tp.NoReturn:
        """The child checkpointed and stopped. Leave WITHOUT a result file (the job is not finished): rank 0
        through submitit's handler, which pickles `checkpoint()`, requeues the whole job and exits."""
        if set(caught) == {signal.SIGTERM}:
            # SLURM pre-emption (PreemptMode=REQUEUE requeues the job itself) or scancel: do not requeue twice.
            print(f"[launch] task {rank}: checkpointed on SIGTERM; leaving the job to SLURM", flush=True)
            raise SystemExit(EXIT_CHECKPOINTED)
        if rank != 0:
            print(f"[launch] task {rank}: checkpointed; rank 0 requeues the job", flush=True)
            raise SystemExit(EXIT_CHECKPOINTED)
        if not callable(submitit_handler):
            raise PipelineCommandError("the pipeline stopped after checkpointing (exit 75), but no submitit "
                                       "requeue handler is installed (not running as a submitit job?)")
        print("[launch] task 0: checkpointed; requeueing through submitit", flush=True)
        signal.signal(requeue_signal, signal.SIG_IGN)  # a repeated signal must not requeue a second time
        submitit_handler(requeue_signal, None)  # checkpoint() + requeue + exit; raises if out of requeues
        raise SystemExit(EXIT_CHECKPOINTED)  # not reached unless the handler returned

    def checkpoint(self, *args: tp.Any, **kwargs: tp.Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 before requeueing: the same command resumes on its own."""
        self.requeues += 1
        return super().checkpoint(*args, **kwargs)
