"""The prepared GPU script runs end to end: its smoke mode (every stage, the same command lines, toy sizes) on
this CPU, so that a typo, a missing file or test id, or a benchmark that breaks on its arguments fails here
rather than in the few minutes a GPU is lent for."""
import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("install", "tests", "kernels_bench", "adaln_bench", "train_bench", "generate_bench")
CSVS = ("kernels.csv", "adaln.csv", "train_throughput.csv", "generate_throughput.csv")


def test_the_gpu_suite_runs_every_stage_in_smoke_mode(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "GPU_SUITE_SMOKE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WHEELS": str(tmp_path / "no-wheels")}  # the wheels need the network: that stage only says it skipped
    env.pop("TRITON_INTERPRET", None)  # the script must set what its stages need itself
    done = subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == list(STAGES)
    assert all(line.split()[1] == "rc=0" for line in summary), summary
    assert "skipped" in summary[0] and "collected" in summary[1]  # install skipped; the GPU run's test ids exist
    assert "commit" in (out / "env.txt").read_text()
    for name in CSVS:
        rows = list(csv.DictReader((out / name).open(newline="")))
        assert rows, name
        for row in rows:
            assert row["device"].startswith("CPU") and row["commit"] and row["date"], (name, row)
