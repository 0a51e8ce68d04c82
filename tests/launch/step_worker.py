"""A small real program that follows `pipeline train`'s stop/resume contract, for fast launcher tests.

It counts `--steps` steps of `--step-seconds` each, keeping its step in OUT/state-RANK.json. On SIGUSR1/SIGUSR2/
SIGTERM it finishes the current step, saves and exits with 75; run again, it resumes from the saved step. Every
start appends one JSON line to OUT/starts-RANK.jsonl with the rank variables it was given, and every stop/finish
one line to OUT/events-RANK.jsonl with the signals it received (so a test sees double deliveries).
`--fail` raises an exception with a recognisable message instead. `--no-handler` installs no signal handler and
saves after every step, like `pipeline generate` (finished shards are kept): a stop signal simply ends it.
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                  "OMP_NUM_THREADS")


def append_line(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def save_step(path: Path, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for state and records")
    parser.add_argument("--steps", type=int, default=10, help="steps to run in total")
    parser.add_argument("--step-seconds", type=float, default=0.1, help="duration of one step")
    parser.add_argument("--fail", action="store_true", help="raise instead of running")
    parser.add_argument("--no-handler", action="store_true", help="die on stop signals; save after every step")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = os.environ["RANK"]
    state = out / f"state-{rank}.json"
    step = json.loads(state.read_text())["step"] if state.exists() else 0
    received: list[int] = []
    for sig in () if args.no_handler else (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    append_line(out / f"starts-{rank}.jsonl", {"step": step, **{k: os.environ.get(k) for k in RANK_VARIABLES}})
    if args.fail:
        raise ValueError(f"step_worker rank {rank} was asked to fail")
    while step < args.steps:
        time.sleep(args.step_seconds)
        step += 1
        if args.no_handler:
            save_step(state, step)
        if received:
            save_step(state, step)
            append_line(out / f"events-{rank}.jsonl", {"stopped_at": step, "signals": received})
            return 75
    save_step(state, step)
    append_line(out / f"events-{rank}.jsonl", {"finished_at": step, "signals": received})
    return 0


if __name__ == "__main__":
    sys.exit(main())
