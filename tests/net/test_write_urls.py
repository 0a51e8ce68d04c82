"""`prepare` writes shard sets to HTTP (real nginx, PUT) and to upload commands (pipe:), manifest last,
byte-identical to a local set and idempotent; `--out` forms that cannot be written are refused in one line."""
import os

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data.loader import StreamingLoader


def prepare(out, *extra) -> int:
    return main(["prepare", "--source", "digits", "--out", str(out), "--shard-size", "300", "--no-progress", *extra])


def same_files(folder, reference) -> bool:
    names = sorted(p.name for p in reference.iterdir())
    return (sorted(p.name for p in folder.iterdir()) == names
            and all((folder / n).read_bytes() == (reference / n).read_bytes() for n in names))


def puts(nginx) -> int:
    return sum(" \"PUT " in line for line in (nginx.root / "access.log").read_text().splitlines())


def test_prepare_uploads_over_http_put_once_and_reads_back(nginx, digits_shards, capsys):
    url = f"{nginx.url}/uploaded/digits"
    assert prepare(url) == 0
    assert same_files(nginx.www / "uploaded" / "digits", digits_shards)  # every shard and the manifest, whole
    uploads = puts(nginx)
    assert uploads == 7  # 6 shards + manifest
    capsys.readouterr()
    assert prepare(url) == 0  # the same set is there already: nothing uploaded again
    assert "up to date" in capsys.readouterr().out and puts(nginx) == uploads
    (nginx.www / "uploaded" / "digits" / "shard-000004.tar").write_bytes(b"cut")  # a damaged remote shard ...
    assert prepare(url) == 0 and same_files(nginx.www / "uploaded" / "digits", digits_shards)  # ... is rewritten
    keys = [k for b in StreamingLoader(url, batch_size=500, resolution=8, channels=1, shuffle_buffer=1) for k in b.keys]
    assert sorted(keys) == [f"{i:09d}" for i in range(1797)]


def test_prepare_refuses_a_different_set_at_the_url(nginx, tmp_path, capsys):
    url = f"{nginx.url}/other/digits"
    assert prepare(url) == 0
    np.savez(tmp_path / "small.npz", images=np.zeros((3, 4, 4), np.uint8))
    argv = ["prepare", "--source", "npz", "--path", str(tmp_path / "small.npz"), "--out", url, "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and url in err and "--overwrite" in err
    assert main([*argv, "--overwrite"]) == 0


def test_prepare_into_an_upload_command_writes_the_manifest_last(tmp_path, digits_shards):
    sink, log = tmp_path / "sink", tmp_path / "uploads.log"
    sink.mkdir()
    assert prepare(f"pipe:echo {{name}} >> {log} && cat > {sink}/{{name}}") == 0
    assert same_files(sink, digits_shards)
    assert log.read_text().split() == [f"shard-{i:06d}.tar" for i in range(6)] + ["manifest.json"]


@pytest.mark.parametrize("argv", [
    ["prepare", "--source", "digits", "--out", "s3://bucket/set"],
    ["prepare", "--source", "digits", "--out", "pipe:cat > here.tar"],
    ["generate", "--checkpoint", "no-such-run", "--num-samples", "4", "--out", "pipe:cat > here.tar"],
    ["generate", "--checkpoint", "no-such-run", "--num-samples", "4", "--out", "gs://bucket/set"],
])
def test_out_forms_that_cannot_be_written_are_refused_in_one_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and argv[-1] in err
    assert os.listdir(tmp_path) == []  # no folder named after the URL or command


def test_unreachable_http_destination_is_one_line(capsys):
    assert prepare("http://127.0.0.1:9/set") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "http://127.0.0.1:9/set/manifest.json" in err


def test_a_failed_upload_is_one_line_and_leaves_no_manifest(nginx, proxy, capsys):
    url = f"{proxy.url}/refused/digits"  # the proxy answers PUT with 501: nothing reaches nginx
    assert prepare(url) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{url}/shard-000000.tar" in err and "501" in err
    assert not (nginx.www / "refused").exists()
