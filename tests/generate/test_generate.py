"""Generation end to end on real trained tiny models: format, determinism across splits, conditioning."""
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from pipeline.data.shards import verify_shards
from pipeline.generation.plan import assigned_shards
from tests.generate.conftest import ENV, REPO
from tests.generate.helpers import FAST, generate, manifest, read_samples, shard_bytes


def export_hash(run_dir):
    with safe_open(str(run_dir / "export" / "latest.safetensors"), framework="pt") as f:
        return f.metadata()["model_hash"]


@pytest.mark.parametrize("num_tasks,world_size", [(1, 1), (3, 1), (2, 3), (5, 2)])
def test_tasks_and_ranks_cover_every_shard_once(num_tasks, world_size):
    total = 11
    taken = [s for k in range(num_tasks) for r in range(world_size)
             for s in assigned_shards(total, k, num_tasks, r, world_size)]
    assert sorted(taken) == list(range(total))
    assert assigned_shards(total, 1, 3) == [1, 4, 7, 10]  # task k of n takes k, k+n, ...


def test_output_is_a_verified_shard_set(uncond_run, tmp_path):
    out = tmp_path / "gen"
    assert generate(uncond_run, out, 20, "--shard-size", "8", "--seed", "5") == 0
    m = manifest(out)
    assert verify_shards(out) == []
    assert m["complete"] and m["num_samples"] == 20 and m["image_size"] == [8, 8] and m["channels"] == 1
    assert [(r["name"], r["first_id"], r["num_samples"], r["status"]) for r in m["shards"]] == [
        ("shard-000000.tar", 0, 8, "done"), ("shard-000001.tar", 8, 8, "done"), ("shard-000002.tar", 16, 4, "done")]
    assert m["generator"]["model_hash"] == export_hash(uncond_run)
    samples = read_samples(out)
    assert [s["id"] for s in samples] == list(range(20))
    assert all(s["image"].shape == (8, 8) and s["image"].dtype == np.uint8 for s in samples)
    assert {s["cls"] for s in samples} == {-1}  # unconditional
    meta = samples[3]["meta"]
    assert (meta["source_index"], meta["seed"], meta["sampler"], meta["steps"], meta["model_hash"]) == (
        3, 5, "ddim", 4, export_hash(uncond_run))
    assert len({s["image"].tobytes() for s in samples}) == 20  # distinct noise per sample id


def test_one_task_equals_three_tasks_and_other_batch_sizes(uncond_run, tmp_path):
    one, three = tmp_path / "one", tmp_path / "three"
    assert generate(uncond_run, one, 21, "--shard-size", "5", "--batch-size", "4") == 0
    for k in (2, 0, 1):  # any order: tasks run independently
        assert generate(uncond_run, three, 21, "--shard-size", "5", "--batch-size", "3",
                        "--task-index", str(k), "--num-tasks", "3") == 0
    assert len(shard_bytes(one)) == 5
    assert shard_bytes(one) == shard_bytes(three)
    assert manifest(one) == manifest(three)


def test_image_i_is_the_image_the_sampler_draws_for_id_i_alone(uncond_run, tmp_path):
    from pipeline.checkpoint import load_for_inference
    from pipeline.images import to_uint8
    from pipeline.generation.sampling import sample_images
    from pipeline.generation.settings import Sampling

    out = tmp_path / "gen"
    assert generate(uncond_run, out, 12, "--shard-size", "6", "--batch-size", "6", "--seed", "3") == 0
    inference = load_for_inference(uncond_run)
    for i in (0, 7, 11):  # one image at a time: no batch companions at all
        alone = sample_images(inference, [i], Sampling("ddim", 4, 0.0, 1.0, seed=3, classes=None))
        assert np.array_equal(read_samples(out)[i]["image"], to_uint8(alone)[0, :, :, 0])


def test_concurrent_ranks_write_one_complete_manifest(uncond_run, tmp_path):
    reference, out = tmp_path / "ref", tmp_path / "ranks"
    assert generate(uncond_run, reference, 24, "--shard-size", "3") == 0
    command = [sys.executable, "-m", "pipeline", "generate", "--checkpoint", str(uncond_run), "--out", str(out),
               "--num-samples", "24", "--shard-size", "3", *FAST]
    procs = [subprocess.Popen(command, cwd=REPO, env={**ENV, "RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    assert shard_bytes(out) == shard_bytes(reference)
    assert manifest(out) == manifest(reference)
    assert verify_shards(out) == []


def test_class_conditional_labels_and_guidance(cond_run, tmp_path):
    from pipeline.checkpoint import load_for_inference
    from pipeline.images import to_uint8
    from pipeline.generation.sampling import sample_images
    from pipeline.generation.settings import Sampling

    out = tmp_path / "guided"
    assert generate(cond_run, out, 8, "--classes", "3", "7", "--guidance", "2", "--sampler", "dpmpp") == 0
    samples = read_samples(out)
    assert [s["cls"] for s in samples] == [3, 7] * 4
    assert {(s["meta"]["guidance"], s["meta"]["sampler"]) for s in samples} == {(2.0, "dpmpp")}
    m = manifest(out)
    assert m["generator"]["classes"] == [3, 7] and m["class_names"] == [str(c) for c in range(10)]
    # Sample 5 alone, conditioned on class 7 with guidance 2, is the image in the shard. (A 30-step model's
    # class pathway is still too weak for guidance to change 8-bit pixels; the samplers' tests cover CFG.)
    alone = sample_images(load_for_inference(cond_run), [5], Sampling("dpmpp", 4, 0.0, 2.0, seed=0, classes=[3, 7]))
    assert np.array_equal(samples[5]["image"], to_uint8(alone)[0, :, :, 0])


def test_default_classes_cycle_over_all_classes(cond_run, tmp_path):
    assert generate(cond_run, tmp_path / "gen", 12) == 0
    assert [s["cls"] for s in read_samples(tmp_path / "gen")] == [i % 10 for i in range(12)]


def test_tasks_starting_at_once_all_claim_the_same_folder(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.generation.plan import SPEC_NAME, claim_folder

    spec = {"generator": {"model_hash": "abc", "seed": 0}, "num_samples": 10, "shard_size": 5}
    for attempt in range(20):
        out = tmp_path / f"gen{attempt}"
        with ThreadPoolExecutor(8) as pool:
            errors = [f.exception() for f in [pool.submit(claim_folder, out, spec) for _ in range(8)]]
        assert errors == [None] * 8
        assert sorted(p.name for p in out.iterdir()) == ["done", SPEC_NAME]


def test_fused_norm_is_recorded_in_the_spec_and_a_rerun_without_it_is_refused(uncond_run, tmp_path, capsys):
    """`generate --fused-norm` (on CPU the norms' torch ops run either way: the same images) records the switch,
    since on a GPU it moves the last bits; continuing that data set without it would mix two generators."""
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    assert generate(uncond_run, plain, 8, "--batch-size", "4") == 0
    assert generate(uncond_run, fused, 8, "--batch-size", "4", "--fused-norm") == 0
    assert shard_bytes(fused) != {} and [s["image"].tobytes() for s in read_samples(fused)] == \
        [s["image"].tobytes() for s in read_samples(plain)]
    assert manifest(fused)["generator"]["fused_norm"] is True and "fused_norm" not in manifest(plain)["generator"]
    capsys.readouterr()
    assert generate(uncond_run, fused, 8, "--batch-size", "4") != 0
    err = capsys.readouterr().err
    assert "holds samples generated with other settings" in err and "fused_norm" in err, err
    assert len(shard_bytes(fused)) == len(shard_bytes(plain))  # nothing written


def test_compiled_model_draws_the_same_images_on_cpu(uncond_run, tmp_path):
    """`generate --compile` (torch.compile of the model) must also work on CPU, and change speed, not images."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert generate(uncond_run, eager, 8, "--batch-size", "4") == 0
    assert generate(uncond_run, compiled, 8, "--batch-size", "4", "--compile") == 0
    a, b = read_samples(eager), read_samples(compiled)
    assert [s["id"] for s in a] == [s["id"] for s in b] == list(range(8))
    for x, y in zip(a, b):  # a reordered float sum may move a pixel across a rounding boundary, no more
        assert np.abs(x["image"].astype(int) - y["image"].astype(int)).max() <= 1
    assert manifest(compiled)["complete"]
