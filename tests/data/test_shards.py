import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest

from pipeline.data import shards
from tests.data.helpers import png_pixels, read_shard_folder


def random_samples(n, shape=(16, 16), seed=0):
    rng = np.random.default_rng(seed)
    return [shards.make_sample(i, shards.encode_png(rng.integers(0, 256, shape, dtype=np.uint8)), i % 3,
                               {"source_index": i}) for i in range(n)]


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3)])
def test_encode_png_is_lossless(shape):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    expected = image[:, :, 0] if shape[-1] == 1 else image  # a 1-channel image is stored as L
    assert np.array_equal(png_pixels(shards.encode_png(image)), expected)


def test_encode_png_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        shards.encode_png(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        shards.encode_png(np.zeros((4, 4, 2), np.uint8))


def test_shard_writer_caps_by_count(tmp_path):
    with shards.ShardWriter(tmp_path, max_count=7) as writer:
        for sample in random_samples(50):
            writer.add(sample)
    assert [r["num_samples"] for r in writer.records] == [7] * 7 + [1]
    read = read_shard_folder(tmp_path)
    assert sorted(read) == [f"{i:09d}" for i in range(50)]
    assert read["000000049"]["shard"] == "shard-000007.tar" and read["000000049"]["cls"] == 49 % 3


def test_shard_writer_caps_by_bytes_and_records_true_size_and_hash(tmp_path):
    cap = 40 * 1024
    with shards.ShardWriter(tmp_path, max_count=1000, max_bytes=cap) as writer:
        for sample in random_samples(60, shape=(24, 24)):  # ~600 B of PNG: ~2.5 KiB per sample in the tar
            writer.add(sample)
    assert len(writer.records) > 1 and sum(r["num_samples"] for r in writer.records) == 60
    for record in writer.records:
        path = tmp_path / record["name"]
        assert os.path.getsize(path) == record["bytes"] <= cap
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    # each full shard was cut because one more sample would not fit: caps are tight, not arbitrary
    assert all(r["bytes"] > cap - 2 * 10240 for r in writer.records[:-1])


def test_same_samples_give_identical_shards(tmp_path):
    first = shards.write_shard(tmp_path / "a.tar", random_samples(5))
    second = shards.write_shard(tmp_path / "b.tar", random_samples(5))
    assert first["sha256"] == second["sha256"] and first["num_samples"] == 5


def test_failed_write_leaves_no_file(tmp_path):
    def broken():
        yield from random_samples(3)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        shards.write_shard(tmp_path / "shard-000000.tar", broken())
    assert os.listdir(tmp_path) == []


def test_manifest_round_trips_extra_keys(tmp_path):
    record = shards.write_shard(tmp_path / "shard-000000.tar", random_samples(4))
    manifest = shards.make_manifest(source={"kind": "generated"}, image_size=(16, 16), channels=1,
                                    class_names=["a", "b", "c"], shards=[{**record, "first_id": 0, "status": "done"}],
                                    generator={"sampler": "ddim", "steps": 50})
    shards.write_manifest(tmp_path, manifest)
    assert shards.read_manifest(tmp_path) == json.loads(json.dumps(manifest))
    assert shards.read_manifest(tmp_path)["generator"] == {"sampler": "ddim", "steps": 50}
    assert shards.read_manifest(tmp_path)["num_samples"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_read_manifest_errors_are_clear(tmp_path):
    with pytest.raises(shards.ManifestError, match="no manifest.json"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(shards.ManifestError, match="not valid JSON"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "x", "shards": []}))
    with pytest.raises(shards.ManifestError, match="missing key.*source"):
        shards.read_manifest(tmp_path)


@pytest.fixture
def small_set(tmp_path):
    with shards.ShardWriter(tmp_path, max_count=5) as writer:
        for sample in random_samples(12):
            writer.add(sample)
    shards.write_manifest(tmp_path, shards.make_manifest(source="test", image_size=(16, 16), channels=1,
                                                         class_names=[], shards=writer.records))
    return tmp_path


def test_verify_shards_passes_intact_folder(small_set):
    assert shards.verify_shards(small_set) == []


def test_verify_shards_detects_tampering(small_set):
    path = small_set / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first member's data: same size, different content
    path.write_bytes(bytes(data))
    problems = shards.verify_shards(small_set)
    assert len(problems) == 1 and "shard-000001.tar" in problems[0] and "sha256" in problems[0]


def test_verify_shards_detects_missing_shard_and_wrong_count(small_set):
    (small_set / "shard-000002.tar").unlink()
    manifest = shards.read_manifest(small_set)
    manifest["shards"][0]["num_samples"] = 6
    problems = shards.verify_shards(small_set, manifest)
    assert any("shard-000002.tar: missing" in p for p in problems)
    assert any("shard-000000.tar: 5 samples, manifest says 6" in p for p in problems)
    with pytest.raises(shards.ManifestError, match=r"num_samples 12 is not the sum over its shards \(13\)"):
        shards.write_manifest(small_set, manifest)


def stdlib_tar(path, fmt):
    """A tar written by Python's tarfile in `fmt`, with a directory, a long path and (pax) a non-ASCII name."""
    members = {"a" * 60 + "/" + "b" * 60 + ".png": b"\x89PNG" * 300, "000000001.cls": b"3", "d/x.json": b"{}"}
    if fmt == tarfile.PAX_FORMAT:
        members["é" * 120 + ".json"] = b'{"a": 1}'
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(_dir_info("d"))
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return list(members.items())


def _dir_info(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_reads_what_tarfile_writes(tmp_path, fmt):
    expected = stdlib_tar(tmp_path / "t.tar", fmt)
    with open(tmp_path / "t.tar", "rb") as stream:
        assert list(shards.tar_members(stream)) == expected


def test_tar_members_raises_on_every_truncation_and_on_corruption(tmp_path):
    shards.write_shard(tmp_path / "s.tar", random_samples(3))
    data = (tmp_path / "s.tar").read_bytes()
    end_of_members = sum(shards.sample_tar_bytes(s) for s in random_samples(3))
    for cut in range(0, end_of_members + 512, 100):
        with pytest.raises(EOFError):
            list(shards.tar_members(io.BytesIO(data[:cut])))
    assert len(list(shards.tar_members(io.BytesIO(data[:end_of_members + 512])))) == 9  # one zero block ends it
    corrupt = bytearray(data)
    corrupt[1024 + 5] ^= 0x20  # a letter of the second member's name: header checksum no longer matches
    with pytest.raises(shards.TarFormatError, match="corrupt tar header at byte 1024"):
        list(shards.tar_members(io.BytesIO(bytes(corrupt))))
