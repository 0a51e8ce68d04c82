"""The prepared GPU script runs end to end: its smoke mode (every stage, the same command lines, toy sizes) on
this CPU, so that a typo, a missing file or test id, or a benchmark that breaks on its arguments fails here
rather than in the few minutes a GPU is lent for."""
import csv
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("install", "train_bench", "generate_bench", "kernels_bench", "tests", "adaln_bench", "group_norm_bench")
CSVS = ("kernels.csv", "adaln.csv", "group_norm.csv", "train_throughput.csv", "train_profile.csv",
        "generate_throughput.csv", "generate_profile.csv")


def test_the_gpu_suite_runs_every_stage_in_smoke_mode(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "GPU_SUITE_SMOKE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WHEELS": str(tmp_path / "no-wheels")}  # the wheels need the network: that stage only says it skipped
    env.pop("TRITON_INTERPRET", None)  # the script must set what its stages need itself
    done = subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (out / "stages.log").read_text().splitlines()
    summary = log[log.index("=== summary") + 1:]  # also printed, line by line, as each stage ends
    assert summary == [line for line in done.stdout.splitlines() if line.split()[0] in STAGES]
    assert [line.split()[0] for line in summary] == list(STAGES)
    assert all(line.split()[1] == "rc=0" for line in summary), summary
    assert "skipped" in summary[0] and "collected" in summary[4]  # install skipped; the GPU run's test ids exist
    assert "commit" in log[0]  # the environment heads the log
    assert [line.split()[1] for line in log if line.startswith("===")] == [*STAGES, "summary"]
    # the device tool brings back at most 8 files from its output folder
    assert sorted(p.name for p in out.iterdir()) == sorted([*CSVS, "stages.log"])
    for name in CSVS:
        rows = list(csv.DictReader((out / name).open(newline="")))
        assert rows, name
        for row in rows:
            assert row["device"].startswith("CPU") and row["commit"] and row["date"], (name, row)
    contenders = {row["contender"] for row in csv.DictReader((out / "train_throughput.csv").open(newline=""))}
    assert contenders == {"trainer", "+train.channels_last=true", "+train.channels_last=true train.fused_norm=true",
                          "+train.channels_last=true train.fused_norm=true train.compile=true", "plain"}  # every switch off, each switch set, and the plain loop, in one run
    assert {row["contender"] for row in csv.DictReader((out / "train_profile.csv").open(newline=""))} \
        == contenders - {"plain"}


def make_wheel(folder: Path, name: str, version: str, requires=(), tag="py3-none-any") -> None:
    with zipfile.ZipFile(folder / f"{name}-{version}-{tag}.whl", "w") as wheel:
        wheel.writestr(f"{name}-{version}.dist-info/METADATA", "".join(
            [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"] + [f"Requires-Dist: {r}\n" for r in requires]))


def test_the_wheel_check_names_what_the_gpu_machine_would_lack(tmp_path):
    check = ["bash", "benchmarks/gpu_wheels.sh", "--check", str(tmp_path)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    make_wheel(tmp_path, "deepspeed", "0.19.8", ["hjson", "torch>=2.0.0", 'pytest<8; extra == "dev"'])
    make_wheel(tmp_path, "webdataset", "1.0.2", ["braceexpand", "numpy"])  # numpy and torch: on the GPU image
    make_wheel(tmp_path, "submitit", "1.5.4", ["cloudpickle>=1.2.1"])
    make_wheel(tmp_path, "hjson", "3.1.0")
    done = subprocess.run(check, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout.startswith("braceexpand (needed by the wheels) is neither in")
    assert len(done.stdout.splitlines()) == 1  # an extra's requirement (pytest) is not needed
    make_wheel(tmp_path, "braceexpand", "0.1.7", tag="cp311-cp311-manylinux2014_x86_64")  # not for Python 3.12
    done = subprocess.run(check, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "does not install on CPython 3.12" in done.stdout
    (tmp_path / "braceexpand-0.1.7-cp311-cp311-manylinux2014_x86_64.whl").unlink()
    make_wheel(tmp_path, "braceexpand", "0.1.7")
    done = subprocess.run(check, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
