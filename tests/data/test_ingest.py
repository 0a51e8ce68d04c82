import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data import shards
from pipeline.data.ingest import FASHION_MNIST_DIR, PrepareError, load_source, prepare
from pipeline.data.loader import StreamingLoader, decode_image
from tests.data.helpers import denormalise, png_pixels, read_shard_folder


def assert_round_trip(folder, images, labels):
    """Every source image comes back bit-exact with its label: from the raw tars AND through the loader."""
    images = images[..., None] if images.ndim == 3 else images  # (N, H, W, C)
    n, h, w, c = images.shape
    manifest = shards.read_manifest(folder)
    assert (manifest["num_samples"], manifest["image_size"], manifest["channels"]) == (n, [h, w], c)
    raw = read_shard_folder(folder)
    assert len(raw) == n
    for key, sample in raw.items():
        index = sample["json"]["source_index"]
        assert key == f"{index:09d}"  # ingest keeps source order: sample id == source index
        assert np.array_equal(png_pixels(sample["png"]).reshape(h, w, c), images[index])
        assert sample["cls"] == labels[index]
    if h != w:
        return  # the loader yields square images: the raw check above is the whole round trip
    for sample in raw.values():
        index = sample["json"]["source_index"]
        assert np.array_equal(decode_image(sample["png"], h, c), images[index].transpose(2, 0, 1))
    seen = 0
    for batch in StreamingLoader(folder, batch_size=97, resolution=h, channels=c, shuffle_buffer=50):
        pixels = denormalise(batch.images)
        for key, image, label in zip(batch.keys, pixels, batch.labels.tolist()):
            index = int(key)
            assert np.array_equal(image, images[index].transpose(2, 0, 1)) and label == labels[index]
            seen += 1
    assert seen == n


def test_digits_round_trip(tmp_path, digits_uint8):
    images, labels = digits_uint8
    manifest, wrote = prepare("digits", tmp_path / "d", shard_size=500, progress=False)
    assert wrote and len(manifest["shards"]) == 4 and manifest["class_names"] == [str(i) for i in range(10)]
    assert "255 / 16" in manifest["source"]["pixel_mapping"]
    assert_round_trip(tmp_path / "d", images, labels)


def test_digits_mapping_documented_values(digits_uint8):
    from pipeline.data.ingest import digits_to_uint8

    assert digits_to_uint8(np.array([0, 1, 8, 15, 16])).tolist() == [0, 16, 128, 239, 255]


def read_idx_independently(path, header):
    return np.frombuffer(gzip.open(path).read()[header:], np.uint8)


@pytest.fixture(scope="module")
def fashion_subset(tmp_path_factory):
    """The first 300 real Fashion-MNIST test images and labels as IDX files: images plain, labels gzipped."""
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip(f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist")
    images = read_idx_independently(f"{FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:300]
    labels = read_idx_independently(f"{FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz", 8)[:300]
    folder = tmp_path_factory.mktemp("fashion")
    head = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
    (folder / "t10k-images-idx3-ubyte").write_bytes(head + images.tobytes())
    label_head = (0x801).to_bytes(4, "big") + len(labels).to_bytes(4, "big")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(label_head + labels.tobytes()))
    return folder, images, labels.astype(np.int64)


def test_fashion_mnist_round_trip(tmp_path, fashion_subset):
    folder, images, labels = fashion_subset
    manifest, _ = prepare("fashion-mnist", tmp_path / "f", path=str(folder), split="test", shard_size=128,
                          progress=False)
    assert manifest["class_names"][9] == "Ankle boot" and manifest["source"]["split"] == "test"
    assert_round_trip(tmp_path / "f", images, labels)


def test_fashion_mnist_default_path_train_split(fashion_subset):
    """The Debian package's real files at the default path: 60000 training images (read, not written: 30 s)."""
    source = load_source("fashion-mnist")
    assert (source.num_samples, source.image_size, source.channels) == (60000, (28, 28), 1)
    first_image, first_label, _ = next(source.items())
    train = read_idx_independently(f"{FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz", 16)
    assert np.array_equal(first_image, train[:784].reshape(28, 28))
    assert first_label == read_idx_independently(f"{FASHION_MNIST_DIR}/train-labels-idx1-ubyte.gz", 8)[0]


def test_fashion_mnist_missing_files_error(tmp_path):
    with pytest.raises(PrepareError, match="t10k-images-idx3-ubyte"):
        prepare("fashion-mnist", tmp_path / "f", path=str(tmp_path), split="test", progress=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 12 + b"\x01")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 4)
    with pytest.raises(PrepareError, match="IDX header says"):
        prepare("fashion-mnist", tmp_path / "f", path=str(tmp_path), split="test", progress=False)


def save_classed_folder(root, images, labels, ext, class_names):
    for i, (image, label) in enumerate(zip(images, labels)):
        target = root / class_names[label] / f"img{i:04d}.{ext}"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target)


def test_folder_round_trip_with_classes(tmp_path, digits_uint8):
    images, labels = digits_uint8[0][:120], digits_uint8[1][:120]
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    save_classed_folder(tmp_path / "src", images, labels, "png", names)
    manifest, _ = prepare("folder", tmp_path / "out", path=str(tmp_path / "src"), shard_size=50, progress=False)
    assert manifest["class_names"] == sorted(names)
    files = sorted(p.relative_to(tmp_path / "src").as_posix() for p in (tmp_path / "src").rglob("*.png"))
    # source order is the sorted relative path; the class index follows the sorted class names
    order = [int(f.split("img")[1][:4]) for f in files]
    expected_labels = [sorted(names).index(names[labels[i]]) for i in order]
    assert_round_trip(tmp_path / "out", images[order], np.array(expected_labels))
    assert read_shard_folder(tmp_path / "out")["000000000"]["json"]["path"] == files[0]


def test_folder_round_trip_rgb_jpeg_without_classes(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (10, 6, 3), dtype=np.uint8)).save(src / f"p{i:02d}.jpg", quality=80)
    decoded = np.stack([np.asarray(Image.open(src / f"p{i:02d}.jpg").convert("RGB")) for i in range(12)])
    manifest, _ = prepare("folder", tmp_path / "out", path=str(src), progress=False)
    assert manifest["class_names"] == [] and manifest["image_size"] == [10, 6]
    assert_round_trip(tmp_path / "out", decoded, np.full(12, -1))


def test_folder_errors_name_the_file(tmp_path, digits_uint8):
    src = tmp_path / "src"
    save_classed_folder(src, digits_uint8[0][:4], [0, 1, 0, 1], "png", ["a", "b"])
    Image.fromarray(digits_uint8[0][5]).save(src / "loose.png")
    with pytest.raises(PrepareError, match="loose.png sits at the top"):
        prepare("folder", tmp_path / "out", path=str(src), progress=False)
    (src / "loose.png").unlink()
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(src / "b" / "odd.png")
    with pytest.raises(PrepareError, match="odd.png: size 8x9 differs"):
        prepare("folder", tmp_path / "out", path=str(src), progress=False)
    (src / "b" / "odd.png").unlink()
    png = (src / "a" / "img0000.png").read_bytes()
    for damage, data in {"cut": png[:len(png) // 2], "not an image": b"hello", "empty": b""}.items():
        (src / "b" / "bad.png").write_bytes(data)
        with pytest.raises(PrepareError, match=r"bad.png: not a readable image \(.*\); remove or replace it"):
            prepare("folder", tmp_path / "out", path=str(src), progress=False)
        assert not (tmp_path / "out").exists(), damage  # nothing written
    assert main(["prepare", "--source", "folder", "--path", str(src), "--out", str(tmp_path / "out")]) == 2


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW", "npy"])
def test_array_round_trip(tmp_path, layout):
    rng = np.random.default_rng(5)
    channels = 1 if layout in ("NHW", "npy") else 3
    images = rng.integers(0, 256, (40, 12, 12, channels), dtype=np.uint8)
    labels = rng.integers(0, 4, 40)
    if layout == "npy":
        np.save(tmp_path / "a.npy", images[..., 0])
        path, labels = tmp_path / "a.npy", np.full(40, -1)
    elif layout == "NCHW":
        np.savez(tmp_path / "a.npz", x=images.transpose(0, 3, 1, 2), y=labels)
        path = tmp_path / "a.npz"
    else:
        np.savez(tmp_path / "a.npz", images=images[..., 0] if layout == "NHW" else images, labels=labels)
        path = tmp_path / "a.npz"
    prepare("npz", tmp_path / "out", path=str(path), shard_size=16, progress=False)
    assert_round_trip(tmp_path / "out", images, labels)


def test_array_errors(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((3, 4, 4), np.float32))
    with pytest.raises(PrepareError, match="uint8"):
        prepare("npz", tmp_path / "out", path=str(tmp_path / "f.npz"), progress=False)
    np.savez(tmp_path / "k.npz", pixels=np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(PrepareError, match="no array named images or x"):
        prepare("npz", tmp_path / "out", path=str(tmp_path / "k.npz"), progress=False)
    np.save(tmp_path / "s.npy", np.zeros((3, 4, 4, 5), np.uint8))
    with pytest.raises(PrepareError, match="not NHW, NHWC or NCHW"):
        prepare("npz", tmp_path / "out", path=str(tmp_path / "s.npy"), progress=False)


def shard_stats(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(folder).iterdir()}


def test_rerun_is_idempotent_and_refuses_other_data(tmp_path, capsys):
    out = str(tmp_path / "d")
    assert main(["prepare", "--source", "digits", "--out", out, "--shard-size", "400", "--no-progress"]) == 0
    assert "wrote 1797 samples" in capsys.readouterr().out
    before = shard_stats(out)
    assert main(["prepare", "--source", "digits", "--out", out, "--shard-size", "400", "--no-progress"]) == 0
    assert "up to date, nothing rewritten" in capsys.readouterr().out
    assert shard_stats(out) == before

    np.save(tmp_path / "other.npy", np.zeros((5, 8, 8), np.uint8))
    other = ["prepare", "--source", "npz", "--path", str(tmp_path / "other.npy"), "--out", out, "--no-progress"]
    assert main(other) == 2
    assert "already holds a different data set" in capsys.readouterr().err
    assert shard_stats(out) == before
    assert main(other + ["--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-000000.tar"]  # the 4 stale shards are gone
    assert shards.read_manifest(out)["num_samples"] == 5


def test_rerun_repairs_damaged_shard_and_reshards(tmp_path):
    out = tmp_path / "d"
    prepare("digits", out, shard_size=400, progress=False)
    (out / "shard-000002.tar").write_bytes(b"garbage")
    _, wrote = prepare("digits", out, shard_size=400, progress=False)
    assert wrote and shards.verify_shards(out) == []
    manifest, wrote = prepare("digits", out, shard_size=1000, progress=False)
    assert wrote and len(manifest["shards"]) == 2 and sorted(os.listdir(out))[-1] == "shard-000001.tar"


def test_out_folder_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="not a shard folder"):
        prepare("digits", tmp_path, progress=False)
    prepare("digits", tmp_path, progress=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # --overwrite never deletes what it did not write
