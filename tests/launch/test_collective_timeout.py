"""A rank whose peer stops answering (a frozen or unreachable node) fails after the collective timeout instead of
waiting forever: real gloo, two processes, the trainer's own `init_distributed`."""
import subprocess
import sys

import pytest

from pipeline.config import ConfigError
from pipeline.train import COLLECTIVE_TIMEOUT_ENV, collective_timeout, free_port
from tests.launch.conftest import REPO, job_env

# Rank 1 freezes itself right after the rendezvous (as a node that hangs would); rank 0 then all-reduces.
RANK_SCRIPT = """
import os, signal, time, torch
from pipeline.train import init_distributed
rank, world, _ = init_distributed()
print("initialised", flush=True)
if rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
start = time.time()
try:
    torch.distributed.all_reduce(torch.ones(1))
except Exception as error:
    print(f"failed after {time.time() - start:.1f} s: {type(error).__name__}", flush=True)
    # os._exit, not sys.exit: with the peer still frozen, gloo's threads can abort the interpreter's shutdown
    # ("terminate called without an active exception", SIGABRT; seen once in CI), which is not what is tested
    os._exit(3)
"""


def test_a_collective_with_a_frozen_peer_fails_after_the_timeout():
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env={**job_env(), "PYTHONPATH": str(REPO), COLLECTIVE_TIMEOUT_ENV: "5",
                                   "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for rank in (0, 1)]
    try:
        out, _ = procs[0].communicate(timeout=600)  # without the bound, rank 0 would wait for its peer forever
        assert procs[0].returncode == 3, out[-3000:]
        assert "initialised" in out and "failed after" in out, out[-3000:]
        seconds = float(out.split("failed after ")[1].split(" s")[0])
        assert seconds >= 4, out[-3000:]  # it waited for the peer (not an unrelated error), then gave up
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # SIGKILL ends the stopped rank too
            proc.wait(timeout=60)


@pytest.mark.parametrize("value", ["abc", "0", "-3"])
def test_a_bad_collective_timeout_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, value)
    with pytest.raises(ConfigError, match=f"{COLLECTIVE_TIMEOUT_ENV}='{value}'"):
        collective_timeout()


def test_the_collective_timeout_defaults_to_600_seconds(monkeypatch):
    monkeypatch.delenv(COLLECTIVE_TIMEOUT_ENV, raising=False)
    assert collective_timeout().total_seconds() == 600
