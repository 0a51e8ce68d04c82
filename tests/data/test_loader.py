import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import shards
from pipeline.data.ingest import prepare
from pipeline.data.loader import LoaderError, StreamingLoader, TooManyBadSamples, decode_image
from tests.data.helpers import denormalise, epoch_keys

REPO = Path(__file__).resolve().parents[2]
ALL_DIGIT_KEYS = sorted(f"{i:09d}" for i in range(1797))


@pytest.fixture(scope="module")
def three_shards_dir(tmp_path_factory):
    """Fewer shards (3) than 2 ranks x 2 workers: the loader must split by sample."""
    out = tmp_path_factory.mktemp("three") / "shards"
    prepare("digits", out, shard_size=700, progress=False)
    return out


@pytest.fixture(scope="module")
def one_shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "shards"
    prepare("digits", out, shard_size=2000, progress=False)
    return out


def digits_loader(folder, **kw):
    return StreamingLoader(folder, **{"batch_size": 64, "resolution": 8, "channels": 1, **kw})


def take(loader_iter, n):
    return [(b.keys, b.images, b.labels) for b in itertools.islice(loader_iter, n)]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for (keys_a, images_a, labels_a), (keys_b, images_b, labels_b) in zip(got, want):
        assert keys_a == keys_b and torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


# ---------------------------------------------------------------- split across processes and workers
@pytest.mark.parametrize("folder_fixture", ["digits_dir", "three_shards_dir"])
def test_two_processes_two_workers_see_every_sample_once_per_epoch(folder_fixture, request):
    folder = request.getfixturevalue(folder_fixture)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests/data/split_probe.py"), str(folder), "2", "2"],
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    for epoch in range(2):
        rank0, rank1 = results[0][epoch], results[1][epoch]
        assert rank0 and rank1 and not set(rank0) & set(rank1)  # both ranks work, on disjoint samples
        assert sorted(rank0 + rank1) == ALL_DIGIT_KEYS  # every sample exactly once
    assert results[0][0] != results[0][1]  # a new epoch, a new order


def test_fewer_shards_than_ranks_times_workers_does_not_hang(one_shard_dir):
    seen = []
    for rank in range(3):
        seen += epoch_keys(digits_loader(one_shard_dir, rank=rank, world_size=3, num_workers=2))
    assert sorted(seen) == ALL_DIGIT_KEYS
    stream = iter(digits_loader(one_shard_dir, rank=2, world_size=3, num_workers=2, resampled=True))
    assert [len(keys) for keys, _, _ in take(stream, 3)] == [64, 64, 64]


# ---------------------------------------------------------------- determinism and resume
def test_same_seed_same_batches_new_epoch_new_order(digits_dir):
    first, second = digits_loader(digits_dir, seed=5), digits_loader(digits_dir, seed=5)
    epochs_first = [take(iter(first), 100) for _ in range(2)]
    epochs_second = [take(iter(second), 100) for _ in range(2)]
    for a, b in zip(epochs_first, epochs_second):
        assert_same_batches(a, b)
    keys = [[k for keys, _, _ in epoch for k in keys] for epoch in epochs_first]
    assert sorted(keys[0]) == sorted(keys[1]) == ALL_DIGIT_KEYS and keys[0] != keys[1]
    assert epoch_keys(digits_loader(digits_dir, seed=6)) != keys[0]


def test_workers_are_deterministic(digits_dir):
    runs = [take(iter(digits_loader(digits_dir, seed=1, num_workers=2)), 100) for _ in range(2)]
    assert_same_batches(runs[0], runs[1])


def resumed(folder, state, n, **kw):
    loader = digits_loader(folder, **kw)
    loader.load_state_dict(json.loads(json.dumps(state)))  # the state survives a checkpoint as JSON
    return take(itertools.chain(loader, loader), n)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_batches_an_uninterrupted_run_would(digits_dir, num_workers):
    kw = {"seed": 3, "num_workers": num_workers, "shuffle_buffer": 300}
    uninterrupted = digits_loader(digits_dir, **kw)
    epoch0, epoch1 = take(iter(uninterrupted), 100), take(iter(uninterrupted), 100)
    # mid-epoch, and two batches before the end (one worker has finished by then)
    for stop in (7, len(epoch0) - 2):
        interrupted = digits_loader(digits_dir, **kw)
        head = take(iter(interrupted), stop)
        assert_same_batches(head, epoch0[:stop])
        assert_same_batches(resumed(digits_dir, interrupted.state_dict(), 200, **kw), epoch0[stop:] + epoch1)


def test_resume_of_resampled_stream_across_its_epochs(digits_dir):
    kw = {"seed": 2, "num_workers": 2, "resampled": True, "batch_size": 128}
    reference = take(iter(digits_loader(digits_dir, **kw)), 24)  # 12 x 128 per worker: past a resampled epoch
    interrupted = digits_loader(digits_dir, **kw)
    assert_same_batches(take(iter(interrupted), 17), reference[:17])
    state = interrupted.state_dict()
    assert state["cursor"]["epoch"] == 1
    assert_same_batches(resumed(digits_dir, state, 7, **kw), reference[17:])


def test_another_split_of_the_same_global_batch_continues_the_stream(digits_dir):
    """2 ranks x 2 workers x micro 25 -> 1 rank x 1 worker x micro 50 -> 1 rank x 2 workers x micro 25 x accum 2:
    the same global batches as an uninterrupted run, every key of the epoch exactly once across the changes."""
    kw = {"seed": 3, "shuffle_buffer": 300}
    reference = take(iter(digits_loader(digits_dir, batch_size=50, **kw)), 100)
    ranks = [digits_loader(digits_dir, batch_size=25, rank=r, world_size=2, num_workers=2, **kw) for r in range(2)]
    heads = [take(iter(loader), 7) for loader in ranks]  # 7 global batches
    assert all(ranks[0].state_dict()["cursor"] == loader.state_dict()["cursor"] for loader in ranks)
    for g in range(7):
        assert heads[0][g][0] + heads[1][g][0] == reference[g][0]  # rank r takes slot r of each global batch
    one = digits_loader(digits_dir, batch_size=50, **kw)
    one.load_state_dict(json.loads(json.dumps(ranks[1].state_dict())))
    middle = take(iter(one), 5)
    assert_same_batches(middle, reference[7:12])
    accum = digits_loader(digits_dir, batch_size=25, num_workers=2, grad_accum=2, **kw)
    accum.load_state_dict(one.state_dict())
    tail = [batch.keys for batch in accum]
    assert [a + b for a, b in zip(tail[::2], tail[1::2])] == [keys for keys, _, _ in reference[12:]]
    seen = [k for head in heads for keys, _, _ in head for k in keys] + \
        [k for keys, _, _ in middle for k in keys] + [k for keys in tail for k in keys]
    assert sorted(seen) == ALL_DIGIT_KEYS


def test_changed_order_restarts_the_saved_epoch(digits_dir, caplog):
    loader = digits_loader(digits_dir, seed=3)
    take(iter(loader), 3)
    take(iter(loader), 100)  # finish epoch 0, start epoch 1
    take(iter(loader), 4)
    other = digits_loader(digits_dir, seed=3, shuffle_buffer=10)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(loader.state_dict())
    assert "layout changed" in caplog.text
    assert sorted(epoch_keys(other)) == ALL_DIGIT_KEYS and other.stats["epoch"] == 1


# ---------------------------------------------------------------- decoding
def test_decoding_resolution_channels_and_flip(digits_dir, digits_uint8):
    images, _ = digits_uint8
    batch = next(iter(digits_loader(digits_dir, resolution=16, channels=3, batch_size=8)))
    assert batch.images.shape == (8, 3, 16, 16) and batch.images.dtype == torch.float32
    assert batch.images.min() >= -1 and batch.images.max() <= 1 and batch.labels.dtype == torch.int64
    assert torch.equal(batch.images[:, 0], batch.images[:, 2])  # gray replicated to RGB

    flips = Counter()
    for batch in digits_loader(digits_dir, hflip=True, seed=4):
        for key, image in zip(batch.keys, denormalise(batch.images)):
            original = images[int(key)]
            flipped = np.array_equal(image[0], original[:, ::-1]) and not np.array_equal(original, original[:, ::-1])
            assert flipped or np.array_equal(image[0], original)
            flips[flipped] += 1
    assert 0.4 < flips[True] / 1797 < 0.6


def test_decode_image_pad_and_resize(digits_dir, digits_uint8):
    png = shards.encode_png(digits_uint8[0][0])
    padded = decode_image(png, 12, 1, fit="pad")
    assert np.array_equal(padded[0, 2:10, 2:10], digits_uint8[0][0]) and padded[0, :2].max() == 0
    assert np.array_equal(decode_image(png, 4, 1, fit="pad")[0], digits_uint8[0][0][2:6, 2:6])
    resized = decode_image(png, 16, 1)
    assert resized.shape == (1, 16, 16) and abs(float(resized.mean()) - float(digits_uint8[0][0].mean())) < 8
    rgb = np.stack([np.full((4, 4), v, np.uint8) for v in (200, 100, 50)], axis=2)
    luma = 200 * 299 / 1000 + 100 * 587 / 1000 + 50 * 114 / 1000  # ITU-R 601-2, as Pillow's L
    assert np.abs(decode_image(shards.encode_png(rgb), 4, 1).astype(float) - luma).max() <= 1


# ---------------------------------------------------------------- bad data
def sample_set_with_bad_samples(folder, images):
    """100 real digits in 2 shards; sample 17 is not a PNG, 42 is a cut PNG, 63 has no png at all."""
    samples = []
    for i in range(100):
        sample = shards.make_sample(i, shards.encode_png(images[i]), i % 10, {"source_index": i})
        if i == 17:
            sample["png"] = b"not a png at all"
        elif i == 42:
            sample["png"] = sample["png"][:40]
        elif i == 63:
            del sample["png"]
        samples.append(sample)
    folder.mkdir()
    records = [shards.write_shard(folder / "shard-000000.tar", samples[:50]),
               shards.write_shard(folder / "shard-000001.tar", samples[50:])]
    shards.write_manifest(folder, shards.make_manifest(source="test", image_size=(8, 8), channels=1,
                                                       class_names=list("0123456789"), shards=records))
    return folder


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, caplog, digits_uint8):
    folder = sample_set_with_bad_samples(tmp_path / "bad", digits_uint8[0])
    loader = digits_loader(folder, max_bad_fraction=0.05, num_workers=2, batch_size=16)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        keys = epoch_keys(loader)
    assert sorted(keys) == sorted(f"{i:09d}" for i in range(100) if i not in (17, 42, 63))
    assert loader.stats == {"epoch": 0, "good": 97, "bad": 3}
    for key in ("000000017", "000000042", "000000063"):
        assert key in caplog.text


def test_too_many_bad_samples_is_a_clear_error(tmp_path, digits_uint8):
    folder = sample_set_with_bad_samples(tmp_path / "bad", digits_uint8[0])
    with pytest.raises(TooManyBadSamples, match=r"3 bad sample\(s\).*max_bad_fraction 0.02"):
        epoch_keys(digits_loader(folder, max_bad_fraction=0.02))


# A digit sample is 3 members of 1 header + 1 data block each: 3072 bytes. Cut inside a member, or
# exactly between samples (the tar then looks whole: only the manifest's count can tell).
CUTS = {"mid-member": 80 * 3072 + 700, "between-samples": 80 * 3072}


@pytest.fixture(params=sorted(CUTS))
def truncated_dir(digits_dir, tmp_path, request):
    folder = tmp_path / "truncated"
    shutil.copytree(digits_dir, folder)
    shard = folder / "shard-000004.tar"
    shard.write_bytes(shard.read_bytes()[: CUTS[request.param]])
    return folder


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard_counts_exactly_what_it_lost(truncated_dir, caplog, num_workers):
    loader = digits_loader(truncated_dir, max_bad_fraction=0.2, num_workers=num_workers, verify="off")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        keys = epoch_keys(loader)
    # shard 4 held samples 800..999; the 80 whole samples before the cut survive, not one fewer
    assert sorted(keys) == sorted(set(ALL_DIGIT_KEYS) - {f"{i:09d}" for i in range(880, 1000)})
    assert loader.stats == {"epoch": 0, "good": 1797 - 120, "bad": 120}
    assert "shard-000004.tar (120 lost)" in caplog.text and "000000880" in caplog.text


def test_truncated_shard_over_threshold_fails(truncated_dir):
    with pytest.raises(TooManyBadSamples, match="max_bad_fraction 0.01"):
        epoch_keys(digits_loader(truncated_dir, verify="off"))


def test_truncated_shard_is_refused_at_start_by_default(truncated_dir):
    size = (truncated_dir / "shard-000004.tar").stat().st_size
    with pytest.raises(LoaderError, match=rf"verify=size\): shard-000004.tar: {size} bytes, manifest says \d+\. "
                                          r".*data.verify=off"):
        digits_loader(truncated_dir)


def test_patterns_that_match_nothing_fail_at_start(tmp_path, digits_dir):
    with pytest.raises(LoaderError, match="matches no file"):
        digits_loader(str(tmp_path / "shard-{000000..000003}.tar"))
    with pytest.raises(LoaderError, match="matches no file"):
        digits_loader(str(tmp_path / "*.tar"))
    with pytest.raises(LoaderError, match="do not exist"):
        digits_loader(str(digits_dir / "shard-{000007..000012}.tar"))
    with pytest.raises(shards.ManifestError, match="no manifest.json"):
        digits_loader(tmp_path)


def test_brace_pattern_reads_the_named_shards(digits_dir):
    keys = epoch_keys(digits_loader(str(digits_dir / "shard-{000000..000001}.tar")))
    assert sorted(keys) == ALL_DIGIT_KEYS[:400]


def test_non_square_resolution_keeps_points_exact_and_pads_to_shape():
    point = np.array([[17, 240]], dtype=np.uint8)  # a 2-D point stored as a 1x2 grey image
    assert np.array_equal(decode_image(shards.encode_png(point), (1, 2), 1)[0], point)
    wide = decode_image(shards.encode_png(np.full((2, 2), 9, np.uint8)), (2, 4), 1, fit="pad")[0]
    assert wide.shape == (2, 4) and wide[:, 1:3].min() == 9 and wide[:, [0, 3]].max() == 0
