"""Property-based corruption of a small real shard set (3 shards x 5 digits): whatever is done to the members,
the bytes, the shard files or the manifest, reading it through the loader (1 or 2 ranks, every `verify`
level) and through evaluation either ends in one PipelineError or delivers each sample at most once, reports
exactly as lost the samples it did not deliver, and decides `max_bad_fraction` on that true count.

The truth is taken from the (edited) manifest and the keys delivered, never from the reader's own counts."""
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.data import shards
from pipeline.data.loader import StreamingLoader, TooManyBadSamples
from pipeline.errors import PipelineError
from pipeline.evaluation.shardset import read_image_set

SHARDS, PER_SHARD = 3, 5
NAMES = [shards.SHARD_PATTERN % i for i in range(SHARDS)]
MEMBERS = 3 * PER_SHARD


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, digits_uint8):
    folder = tmp_path_factory.mktemp("fuzz") / "set"
    images, labels = digits_uint8
    with shards.ShardWriter(folder, max_count=PER_SHARD) as writer:
        for i in range(SHARDS * PER_SHARD):
            writer.add(shards.make_sample(i, shards.encode_png(images[i]), int(labels[i]), {"source_index": i}))
    shards.write_manifest(folder, shards.make_manifest(source="fuzz", image_size=(8, 8), channels=1,
                                                       class_names=[str(c) for c in range(10)], shards=writer.records))
    return folder


# ---------------------------------------------------------------- corruptions
shard = st.integers(0, SHARDS - 1)
member = st.integers(0, MEMBERS - 1)
fraction = st.floats(0, 1)
member_ops = st.one_of(
    st.tuples(st.just("remove member"), shard, member),
    st.tuples(st.just("duplicate member"), shard, member, member),
    st.tuples(st.just("rename member"), shard, member,
              st.sampled_from(["000000003.png", "000000007.cls", "000000099.png", "000000001.xyz", "junk"])),
    st.tuples(st.just("replace member"), shard, member, st.binary(max_size=40)),
)
byte_ops = st.one_of(
    st.tuples(st.just("flip header"), shard, member, st.integers(0, 511), st.integers(1, 255)),
    st.tuples(st.just("flip"), shard, fraction, st.integers(1, 255)),
    st.tuples(st.just("zero block"), shard, fraction),
    st.tuples(st.just("truncate"), shard, fraction),
    st.tuples(st.just("truncate at block"), shard, st.integers(0, 2 * MEMBERS + 2)),
)
shard_ops = st.one_of(
    st.tuples(st.just("remove shard"), shard),
    st.tuples(st.just("copy shard"), shard, shard),
    st.tuples(st.just("swap shards"), shard, shard),
    st.tuples(st.just("extra shard"), shard),
)
manifest_ops = st.one_of(
    st.tuples(st.just("count"), shard, st.integers(-2, 2), st.booleans()),
    st.tuples(st.just("first_id"), shard, st.integers(0, 20)),
    st.tuples(st.just("classes"), st.integers(0, 10)),
    st.tuples(st.just("drop record"), shard),
    st.tuples(st.just("value"), shard, st.sampled_from(["num_samples", "bytes", "sha256", "name"]),
              st.sampled_from([-1, "7", None, 1.5, True, "../x.tar", "0" * 64])),
    st.tuples(st.just("bytes"), shard, st.integers(-512, 512)),
)
corruptions = st.lists(st.one_of(member_ops, byte_ops, shard_ops, manifest_ops), min_size=1, max_size=3)


def edit_members(data: bytes, op: tuple) -> bytes:
    """The tar rebuilt by Python's tarfile after removing/duplicating/renaming/replacing one member."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    kind, _, k, *arg = op
    k %= len(members)
    info, content = members[k]
    if kind == "remove member":
        del members[k]
    elif kind == "duplicate member":
        members.insert(arg[0] % (len(members) + 1), (info, content))
    elif kind == "rename member":
        members[k] = (tarfile.TarInfo(arg[0]), content)
    else:
        members[k] = (tarfile.TarInfo(info.name), arg[0])
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, content in members:
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def edit_bytes(data: bytearray, op: tuple) -> bytearray:
    kind, _, *arg = op
    if kind == "flip header":
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
            headers = [m.offset for m in tar.getmembers()]
        data[headers[arg[0] % len(headers)] + arg[1]] ^= arg[2]
    elif kind == "flip" and data:
        data[min(int(arg[0] * len(data)), len(data) - 1)] ^= arg[1]
    elif kind == "zero block":
        start = int(arg[0] * len(data)) // 512 * 512
        data[start:start + 512] = bytes(len(data[start:start + 512]))
    elif kind == "truncate":
        del data[int(arg[0] * len(data)):]
    elif kind == "truncate at block":
        del data[arg[0] * 512:]
    return data


def edit_shards(folder: Path, op: tuple) -> None:
    kind, i, *arg = op
    if arg and arg[0] == i:
        return
    if kind == "remove shard":
        (folder / NAMES[i]).unlink(missing_ok=True)
    elif kind == "copy shard" and (folder / NAMES[i]).exists():
        shutil.copy(folder / NAMES[i], folder / NAMES[arg[0]])
    elif kind == "swap shards" and (folder / NAMES[i]).exists() and (folder / NAMES[arg[0]]).exists():
        (folder / NAMES[i]).rename(folder / "swap")
        (folder / NAMES[arg[0]]).rename(folder / NAMES[i])
        (folder / "swap").rename(folder / NAMES[arg[0]])
    elif kind == "extra shard" and (folder / NAMES[i]).exists():
        shutil.copy(folder / NAMES[i], folder / (shards.SHARD_PATTERN % 9))


def edit_manifest(manifest: dict, op: tuple) -> None:
    kind, *arg = op
    records = manifest["shards"]
    if kind == "classes":
        manifest["class_names"] = manifest["class_names"][:arg[0]]
        return
    if arg[0] >= len(records):
        return
    record = records[arg[0]]
    if kind == "count":
        record["num_samples"] = max(0, record["num_samples"] + arg[1])
        if arg[2]:
            manifest["num_samples"] = sum(r["num_samples"] for r in records)
    elif kind == "first_id":
        record["first_id"] = arg[1]
    elif kind == "drop record":
        del records[arg[0]]
        manifest["num_samples"] = sum(r["num_samples"] for r in records)
    elif kind == "value":
        record[arg[1]] = arg[2]
    elif kind == "bytes":
        record["bytes"] += arg[1]


def corrupt(pristine: Path, folder: Path, ops: list[tuple]) -> None:
    shutil.copytree(pristine, folder)
    order = {"member": 0, "byte": 1, "shard": 2, "manifest": 3}  # members are edited on whole tars
    for op in sorted(ops, key=lambda op: order[category(op)]):
        if category(op) in ("member", "byte"):
            path = folder / NAMES[op[1]]
            if not path.exists():
                continue
            data = path.read_bytes()
            path.write_bytes(edit_members(data, op) if category(op) == "member" else edit_bytes(bytearray(data), op))
        elif category(op) == "shard":
            edit_shards(folder, op)
        else:
            manifest = json.loads((folder / "manifest.json").read_text())
            edit_manifest(manifest, op)
            (folder / "manifest.json").write_text(json.dumps(manifest))


def category(op: tuple) -> str:
    kind = op[0]
    return ("member" if "member" in kind else "shard" if "shard" in kind
            else "byte" if kind in ("flip header", "flip", "zero block", "truncate", "truncate at block")
            else "manifest")


# ---------------------------------------------------------------- the property
def read_all(folder: Path, world_size: int, verify: str, max_bad_fraction: float = 1.0):
    """(keys, labels, bad count) over all ranks, or the PipelineError the loader raised."""
    keys, labels, bad = [], [], 0
    for rank in range(world_size):
        loader = StreamingLoader(folder, batch_size=4, resolution=8, channels=1, rank=rank, world_size=world_size,
                                 shuffle_buffer=1, max_bad_fraction=max_bad_fraction, verify=verify)
        for batch in loader:
            keys += batch.keys
            labels += batch.labels.tolist()
        bad += loader.stats["bad"]
    return keys, labels, bad


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=corruptions, world_size=st.sampled_from([1, 2]), verify=st.sampled_from(shards.VERIFY_LEVELS),
       threshold=st.floats(0, 0.5))
def test_no_corruption_loses_or_duplicates_a_sample_silently(pristine, ops, world_size, verify, threshold):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "set"
        corrupt(pristine, folder, ops)
        try:
            keys, labels, bad = read_all(folder, world_size, verify)
        except PipelineError as error:
            assert str(error) and "\n" not in str(error)  # one line
            event(f"refused: {type(error).__name__}")
            return
        manifest = shards.read_manifest(folder)
        ids = {shards.KEY_FORMAT % i for spec in shards.shard_specs(folder, manifest) for i in spec.ids}
        classes = len(manifest["class_names"])
        assert len(keys) == len(set(keys)), "a sample was delivered twice"
        assert set(keys) <= ids and all(-1 <= label < classes for label in labels)
        assert bad == len(ids) - len(keys), "reported lost != not delivered"
        event("read, some lost" if bad else "read, none lost")
        if world_size == 1:  # the threshold is decided on the true count
            too_many = bad > threshold * len(ids)
            try:
                read_all(folder, 1, verify, threshold)
                assert not too_many
            except TooManyBadSamples:
                assert too_many
            event(f"threshold exceeded: {too_many}")
        try:
            evaluated = read_image_set(folder)
        except PipelineError:
            event("evaluation refused")
            return
        assert sorted(evaluated.ids.tolist()) == sorted(map(int, ids))  # evaluation gets all or says no
