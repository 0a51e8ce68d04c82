"""Elastic resume through the real DeepSpeed engine (gloo, torchrun ranks): a run checkpointed at one world size
continues at another (2 -> 1 -> 2 -> 3 ranks, ZeRO 0 and ZeRO 3) to the weights, EMA and losses of an
uninterrupted run, every sample of the epoch in progress seen exactly once across the changes."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from pipeline.data import shards
from pipeline.train import free_port
from tests.train.conftest import FAST, REPO, read_log

NUM_SAMPLES, GLOBAL_BATCH = 66, 12  # 5.5 global batches per epoch: step 6 spans epochs 0 and 1
CHAIN = [(2, 1, 2), (1, 2, 4), (2, 1, 6), (3, 1, 8)]  # (ranks, grad_accum, train until step)
SETTINGS = [*FAST, "train.ckpt_every=1000", "train.min_lr_ratio=1.0", "train.grad_clip=0.5", "model.dropout=0.0",
            "data.shuffle_buffer=20"]  # a constant lr after warmup: stopping early does not change the schedule


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """66 real digits in 3 shards."""
    out = tmp_path_factory.mktemp("elastic") / "shards"
    digits = load_digits()
    with shards.ShardWriter(out, max_count=22) as writer:
        for i in range(NUM_SAMPLES):
            image = ((digits.images[i].astype(np.int64) * 255 + 8) // 16).astype(np.uint8)
            writer.add(shards.make_sample(i, shards.encode_png(image), int(digits.target[i]), {"source_index": i}))
    shards.write_manifest(out, shards.make_manifest(source="digits", image_size=(8, 8), channels=1,
                                                    class_names=[str(c) for c in range(10)], shards=writer.records))
    return out


def train(run_dir, data, ranks: int, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """The worker (Trainer.fit + key recording) on `ranks` torchrun ranks; records beside the run folder."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                f"--master_port={free_port()}"] if ranks > 1 else [sys.executable]
    prefix = f"{run_dir}.{len(list(run_dir.parent.glob(run_dir.name + '.*.weights.pt')))}"
    proc = subprocess.run([*launcher, "tests/train/elastic_worker.py", prefix, "--config", "configs/tiny.yaml",
                           "--out", str(run_dir), f"data.shards={data}", *SETTINGS, *overrides], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def records(run_dir) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.parent.glob(run_dir.name + ".*.rank*.json"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_shards):
    """Uninterrupted: 1 rank, ZeRO 0, the whole global batch as one micro-batch."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(run, small_shards, 1, f"train.micro_batch={GLOBAL_BATCH}", f"train.steps={CHAIN[-1][2]}")
    return run


def run_chain(root, data, zero_stage: int):
    """The same run, stopped and resumed at each world size of CHAIN; a copy of the run folder after the first
    segment is kept (as root/first) for the refusal tests."""
    run = root / "run"
    micro = GLOBAL_BATCH // (CHAIN[0][0] * CHAIN[0][1])  # the first segment's; later ones are re-derived
    for ranks, accum, steps in CHAIN:
        train(run, data, ranks, f"train.zero_stage={zero_stage}", f"train.micro_batch={micro}",
              f"train.grad_accum={accum}", f"train.steps={steps}")
        if steps == CHAIN[0][2]:
            shutil.copytree(run, root / "first")
    return run


@pytest.fixture(scope="module")
def chain0(tmp_path_factory, small_shards):
    return run_chain(tmp_path_factory.mktemp("chain0"), small_shards, 0)


@pytest.fixture(scope="module")
def chain3(tmp_path_factory, small_shards):
    return run_chain(tmp_path_factory.mktemp("chain3"), small_shards, 3)


CHAINS = pytest.mark.parametrize("chain_name", ["chain0", "chain3"])


def flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].flatten().float() for k in sorted(state)])


@CHAINS
def test_resume_at_other_world_sizes_matches_an_uninterrupted_run(chain_name, request, reference):
    chain = request.getfixturevalue(chain_name)
    # Adam divides by sqrt(v): fp32 summation-order differences grow a little over the steps (see
    # test_distributed.py); a lost, repeated or re-ordered sample, or a lost optimizer moment, moves the
    # weights by the size of a training step.
    ref_init = torch.load(reference.parent / "run.0.start.pt")
    for kind, load in (("weights", lambda r: torch.load(sorted(r.parent.glob("run.*.weights.pt"))[-1])),
                       ("ema", lambda r: load_file(str(r / "export" / "latest.safetensors")))):
        got, want = flat(load(chain)), flat(load(reference))
        travelled = (want - flat(ref_init)).norm()
        assert travelled > 0.01, "training did not move the weights: the comparison would prove nothing"
        assert (got - want).norm() < 1e-3 * travelled, f"{kind} differ by {(got - want).norm():.3g}"
    got, want = read_log(chain), read_log(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, CHAIN[-1][2] + 1))
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
    world_sizes = [r["world"] for r in records(chain) if r["rank"] == 0]
    assert world_sizes == [ranks for ranks, _, _ in CHAIN]


@CHAINS
def test_every_sample_of_the_epoch_is_seen_once_across_the_changes(chain_name, request, reference):
    chain = request.getfixturevalue(chain_name)
    by_step: dict[int, list] = {}
    for record in records(chain):  # each rank's micro-batches of a step, in global slot order
        for step, micro_batches in record["steps"].items():
            for accum, keys in enumerate(micro_batches):
                by_step.setdefault(int(step), []).append(((accum * record["world"] + record["rank"]), keys))
    stream = [key for step in sorted(by_step) for _, keys in sorted(by_step[step]) for key in keys]
    assert len(stream) == GLOBAL_BATCH * CHAIN[-1][2]
    assert sorted(stream[:NUM_SAMPLES]) == [f"{i:09d}" for i in range(NUM_SAMPLES)]  # epoch 0: each once
    assert len(set(stream[NUM_SAMPLES:])) == len(stream) - NUM_SAMPLES  # epoch 1 so far: no repeats
    (uninterrupted,) = records(reference)
    assert stream == [k for step in sorted(uninterrupted["steps"], key=int) for keys in uninterrupted["steps"][step]
                      for k in keys]


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def cli(run_dir, data, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m pipeline train` itself, as a user runs it (1 process)."""
    return subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", "configs/tiny.yaml", "--out",
                           str(run_dir), f"data.shards={data}", *SETTINGS, *overrides], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


def test_a_world_size_that_cannot_split_the_global_batch_is_refused(chain3, small_shards):
    proc = cli(chain3.parent / "first", small_shards, "train.zero_stage=3", "train.grad_accum=5", "train.steps=4")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: world size 1 x train.grad_accum 5 does not divide "
                                                           f"the global batch {GLOBAL_BATCH}")


def test_a_checkpoint_that_cannot_be_converted_is_refused_untouched(chain3, small_shards):
    # Intact on disk (sizes in COMPLETE and zip checksums agree, so resume selection accepts it) but holding an
    # optimizer file without its optimizer state, which ds_to_universal cannot convert.
    run = chain3.parent / "first"
    (ckpt,) = (run / "checkpoints").glob("step-*")
    unconvertible = ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = torch.load(unconvertible, weights_only=False)
    del state["optimizer_state_dict"]
    torch.save(state, unconvertible)
    meta = json.loads((ckpt / "COMPLETE").read_text())
    if "files" in meta:
        meta["files"][unconvertible.name] = unconvertible.stat().st_size
        (ckpt / "COMPLETE").write_text(json.dumps(meta))
    before = digest(ckpt)
    proc = cli(run, small_shards, "train.zero_stage=3", "train.steps=4")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {ckpt} has no universal conversion and cannot be converted"), last
    assert digest(ckpt) == before and sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == []
