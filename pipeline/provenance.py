"""Where a result came from: the code's git commit, the library versions, the device and the command line.

Every run folder keeps a record of each start (`run_info.json`, beside config.yaml), so any number it holds
can be traced to the code and machine that produced it.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import torch

LIBRARIES = ("torch", "deepspeed", "triton", "webdataset", "numpy")
REPO = Path(__file__).resolve().parents[1]


def git_commit() -> dict:
    """The commit of this checkout and whether it has uncommitted changes (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def describe_environment(device: torch.device) -> dict:
    """One JSON-able record of the code, libraries, device, host and command line of this process."""
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **git_commit(), "versions": library_versions(), "device": device_description(device),
            "host": socket.gethostname(), "command": shlex.join(sys.orig_argv)}
