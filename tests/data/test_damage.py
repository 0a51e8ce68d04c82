"""Damaged shard sets: the strict reader resynchronises, counts exactly what it lost, delivers nothing twice;
the folder is checked against its manifest under `verify`. Expected values come from Python's own `tarfile`
reading the undamaged shard, never from the reader under test."""
import io
import json
import logging
import shutil
import tarfile

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data import shards
from pipeline.data.loader import LoaderError, StreamingLoader
from pipeline.evaluation import EvaluationError
from pipeline.evaluation.shardset import read_image_set

CLASSES = list("0123456789")


def write_set(folder, images, per_shard=6, count=18, labels=None, class_names=CLASSES):
    """`count` real digits in shards of `per_shard`, written by the project's writer."""
    labels = [i % 10 for i in range(count)] if labels is None else labels
    with shards.ShardWriter(folder, max_count=per_shard) as writer:
        for i in range(count):
            writer.add(shards.make_sample(i, shards.encode_png(images[i]), labels[i], {"source_index": i}))
    shards.write_manifest(folder, shards.make_manifest(source="test", image_size=(8, 8), channels=1,
                                                       class_names=class_names, shards=writer.records))
    return folder


@pytest.fixture
def small_set(tmp_path, digits_uint8):
    return write_set(tmp_path / "set", digits_uint8[0])


def members_of(data):
    """(name, header offset, data offset, size) of each member, as the stdlib reads the tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


def offsets(data, name):
    """(header offset, data offset) of the member `name`."""
    return next((header, start) for n, header, start, _ in members_of(data) if n == name)


def read(data, spec):
    """Keys the strict reader delivers from `data`, and its report (a cut is damage too)."""
    report, got = shards.ShardReport(spec), []
    try:
        for sample in shards.read_shard(io.BytesIO(data), spec, report):
            got.append(sample["__key__"])
    except EOFError as exn:
        report.damage.append(str(exn))
    return got, report


def keys(ids):
    return [f"{i:09d}" for i in ids]


def loader_keys(folder, **kw):
    loader = StreamingLoader(folder, **{"batch_size": 4, "resolution": 8, "channels": 1, "shuffle_buffer": 1,
                                        "max_bad_fraction": 1.0, **kw})
    got = [k for batch in loader for k in batch.keys]
    return sorted(got), loader.stats["bad"]


# ---------------------------------------------------------------- the tar reader
@pytest.mark.parametrize("member", ["png", "cls", "json"])
def test_a_corrupt_header_costs_its_member_only(small_set, member):
    spec = shards.shard_specs(small_set)[1]  # samples 6..11
    data = bytearray(open(spec.path, "rb").read())
    original = bytes(data)
    members = members_of(original)
    index = next(i for i, m in enumerate(members) if m[0] == f"000000008.{member}")
    name, header, skipped = members[index][0], members[index][1], members[index + 1][1] - members[index][1]
    data[header + 3] ^= 0x55  # a letter of the member's name: the checksum no longer matches
    expected = [(n, original[d:d + size]) for n, _, d, size in members if n != name]
    problems = []
    assert list(shards.tar_members(io.BytesIO(bytes(data)), problems)) == expected
    assert problems == [f"corrupt tar header at byte {header}: {skipped} bytes skipped to the next valid header"]
    got, report = read(bytes(data), spec)
    lost = [] if member == "json" else [8]  # json is metadata: the sample is still whole without it
    assert got == keys(i for i in range(6, 12) if i not in lost) and report.lost == len(lost)
    if lost:
        assert f"000000008 (no {member} member)" in report.summary()


def test_a_zeroed_header_and_a_damaged_end_block_are_resynchronised(small_set):
    spec = shards.shard_specs(small_set)[0]
    original = open(spec.path, "rb").read()
    members = members_of(original)
    data = bytearray(original)
    header = offsets(original, "000000001.png")[0]
    data[header:header + 512] = bytes(512)
    end = members[-1][2] + 512  # the first end-of-archive block
    data[end + 100] = 7
    got, report = read(bytes(data), spec)
    assert got == keys([0, 2, 3, 4, 5]) and report.lost == 1
    assert report.damage == [f"corrupt tar header at byte {header}: 1024 bytes skipped to the next valid header",
                             f"corrupt tar header at byte {end}, no valid header after it"]


def test_cuts_at_every_block_lose_exactly_the_samples_they_cut(small_set):
    spec = shards.shard_specs(small_set)[2]  # samples 12..17
    original = open(spec.path, "rb").read()
    members = members_of(original)
    for cut in range(0, len(original) + 1, 256):
        # a sample survives when its png and cls lie wholly before the cut (json is metadata)
        whole = {n.split(".")[0] for n, _, d, s in members if d + s <= cut}
        survivors = [k for k in keys(range(12, 18)) if {f"{k}.png", f"{k}.cls"} <= {n for n, _, d, s in members
                                                                                     if d + s <= cut}]
        got, report = read(original[:cut], spec)
        assert got == survivors and report.lost == 6 - len(survivors), cut
        assert set(got) <= whole
        assert (report.damage == []) == (cut >= members[-1][2] + 1024), cut  # one end block suffices


def test_missing_end_blocks_lose_nothing(small_set, caplog):
    spec = shards.shard_specs(small_set)[2]
    original = open(spec.path, "rb").read()
    end = members_of(original)[-1][2] + 512  # just after the last member's data
    open(spec.path, "wb").write(original[:end])
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        got, bad = loader_keys(small_set, verify="off")
    assert got == keys(range(18)) and bad == 0
    assert "shard-000002.tar (0 lost)" in caplog.text and "end-of-archive" in caplog.text


# ---------------------------------------------------------------- samples: labels, keys, duplicates
def test_labels_outside_the_manifest_classes_never_reach_the_model(tmp_path, digits_uint8):
    folder = write_set(tmp_path / "a", digits_uint8[0], count=7, labels=[3, 10, -2, 4, 9, -1, 5])
    with tarfile.open(folder / "shard-000001.tar") as tar:  # sample 6: a label that is not a number
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(folder / "shard-000001.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            data = b"five" if member.name.endswith(".cls") else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    loader = StreamingLoader(folder, batch_size=7, resolution=8, channels=1, shuffle_buffer=1,
                             max_bad_fraction=1.0, verify="off")
    (batch,) = list(loader)
    assert batch.keys == keys([0, 3, 4, 5]) and batch.labels.tolist() == [3, 4, 9, -1]
    assert loader.stats["bad"] == 3
    unlabeled = write_set(tmp_path / "b", digits_uint8[0], count=4, labels=[-1, 2, -1, -1], class_names=[])
    assert loader_keys(unlabeled) == (keys([0, 2, 3]), 1)


def test_repeated_and_foreign_samples_are_never_delivered_twice(small_set, caplog):
    specs = shards.shard_specs(small_set)
    original = open(specs[0].path, "rb").read()
    members = members_of(original)
    sample_1 = original[members[3][1]:members[6][1]]  # the three members of sample 1
    doubled = original[:members[6][1]] + sample_1 + original[members[6][1]:]
    got, report = read(doubled, specs[0])
    assert got == keys(range(6)) and report.lost == 0 and "000000001 repeated" in report.summary()
    # shard 1 replaced by a copy of shard 0 (same size, so only the keys tell)
    shutil.copy(specs[0].path, specs[1].path)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        got, bad = loader_keys(small_set, world_size=2, rank=0, verify="off")
        other, other_bad = loader_keys(small_set, world_size=2, rank=1, verify="off")
    assert sorted(got + other) == keys([*range(6), *range(12, 18)]) and bad + other_bad == 6
    assert "is not a sample id of this shard (6..11)" in caplog.text


# ---------------------------------------------------------------- the folder against its manifest
def test_verify_policies(small_set, tmp_path):
    specs = shards.shard_specs(small_set)
    shutil.copy(specs[0].path, small_set / "shard-000007.tar")
    for level in ("size", "sha256"):
        with pytest.raises(LoaderError, match=rf"\(verify={level}\): shard-000007.tar: in the folder but not in "
                                              "its manifest. Re-create"):
            loader_keys(small_set, verify=level)
    assert loader_keys(small_set, verify="off") == (keys(range(18)), 0)
    (small_set / "shard-000007.tar").unlink()
    data = bytearray(open(specs[1].path, "rb").read())
    data[offsets(bytes(data), "000000006.png")[1] + 30] ^= 0x01  # inside sample 6's png: same size
    open(specs[1].path, "wb").write(bytes(data))
    got, bad = loader_keys(small_set, verify="size")  # the stat cannot see it; the png decoder can
    assert got == keys(i for i in range(18) if i != 6) and bad == 1
    with pytest.raises(LoaderError, match=r"shard-000001.tar: sha256 [0-9a-f]{12}\.\.\. differs"):
        loader_keys(small_set, verify="sha256")
    with pytest.raises(LoaderError, match="verify one of"):
        loader_keys(small_set, verify="md5")


def test_verify_is_a_config_key(tmp_path):
    assert load_config(overrides=["data.verify=sha256"]).data.verify == "sha256"
    assert load_config().data.verify == "size"
    with pytest.raises(ConfigError, match="data.verify.*md5"):
        load_config(overrides=["data.verify=md5"])


MALFORMED = {
    "num_samples": (lambda m: m["shards"][0].update(num_samples=-1), r"shards\[0\].num_samples -1 is not an integer"),
    "count as text": (lambda m: m["shards"][1].update(num_samples="6"), r"shards\[1\].num_samples '6'"),
    "bytes": (lambda m: m["shards"][0].update(bytes=None), r"shards\[0\].bytes None"),
    "sha256": (lambda m: m["shards"][0].update(sha256="abc"), r"shards\[0\].sha256 'abc' is not 64"),
    "path": (lambda m: m["shards"][0].update(name="../x.tar"), r"shards\[0\].name '../x.tar' is not a plain"),
    "twice": (lambda m: m["shards"][1].update(name="shard-000000.tar"),
              r"shards\[1\].name 'shard-000000.tar' is listed twice"),
    "channels": (lambda m: m.update(channels=2), "channels 2 is not 1 or 3"),
    "image_size": (lambda m: m.update(image_size=[8]), r"image_size \[8\] is not \[height, width\]"),
    "class_names": (lambda m: m.update(class_names="0123"), "class_names '0123' is not a list"),
    "total": (lambda m: m.update(num_samples=17), r"num_samples 17 is not the sum over its shards \(18\)"),
    "overlap": (lambda m: m["shards"][1].update(first_id=3),
                "shards shard-000000.tar and shard-000001.tar claim the same sample ids"),
    "format": (lambda m: m.update(format="tfrecord"), "format 'tfrecord' is not"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_values_are_clear_errors(small_set, case):
    edit, message = MALFORMED[case]
    manifest = json.loads((small_set / "manifest.json").read_text())
    edit(manifest)
    (small_set / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(shards.ManifestError, match=rf"manifest.json: {message}"):
        loader_keys(small_set)
    with pytest.raises(EvaluationError, match=message):
        read_image_set(small_set)


def test_evaluation_reads_through_the_same_strict_reader(small_set):
    assert read_image_set(small_set).ids.tolist() == list(range(18))
    spec = shards.shard_specs(small_set)[1]
    data = bytearray(open(spec.path, "rb").read())
    data[offsets(bytes(data), "000000007.cls")[0] + 2] ^= 0x10
    open(spec.path, "wb").write(bytes(data))
    with pytest.raises(EvaluationError, match=r"shard-000001.tar is damaged \(1 sample\(s\) lost: 000000007 "
                                              r"\(no cls member\)"):
        read_image_set(small_set)


def test_sha256_check_of_a_cut_shard_whose_manifest_size_was_edited_to_match(small_set):
    path = small_set / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[:4096])  # cut inside the archive
    manifest = json.loads((small_set / "manifest.json").read_text())
    manifest["shards"][1]["bytes"] = 4096
    (small_set / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoaderError, match=r"shard-000001.tar: sha256 [0-9a-f]{12}\.\.\. differs"):
        loader_keys(small_set, verify="sha256")
    assert loader_keys(small_set, verify="size") == (keys([*range(6), 6, *range(12, 18)]), 5)
