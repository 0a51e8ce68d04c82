"""`generate --out` to an HTTP folder (real nginx, PUT) and to an upload command: the destination gets the same
bytes as a local run, the manifest last and listing uploaded shards only; a rerun resumes from the local state
folder, checked against the destination (a shard missing there is uploaded again, not regenerated)."""
import json

import pytest

from tests.generate.helpers import generate, shard_bytes
from tests.net.servers import Nginx


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    server = Nginx(tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


def puts(nginx) -> int:
    return sum(" \"PUT " in line for line in (nginx.root / "access.log").read_text().splitlines())


@pytest.fixture(scope="module")
def local_set(uncond_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "gen"
    assert generate(uncond_run, out, 8, "--shard-size", "4") == 0
    return out


def test_generate_to_http_resumes_against_the_destination(uncond_run, local_set, nginx, tmp_path, capsys):
    url, remote, state = f"{nginx.url}/gen", nginx.www / "gen", tmp_path / "state"
    assert generate(uncond_run, url, 8, "--shard-size", "4", "--state", str(state)) == 0
    assert shard_bytes(remote) == shard_bytes(local_set)
    manifest = json.loads((remote / "manifest.json").read_text())
    assert manifest == json.loads((local_set / "manifest.json").read_text()) and manifest["complete"]
    assert (remote / "generation.json").is_file()
    uploads = puts(nginx)
    capsys.readouterr()
    assert generate(uncond_run, url, 8, "--shard-size", "4", "--state", str(state)) == 0
    assert "wrote 0 shard(s), 2 already done" in capsys.readouterr().out
    assert puts(nginx) == uploads + 2  # generation.json and the manifest only
    (remote / "shard-000001.tar").unlink()  # lost at the destination: uploaded again from the state folder
    assert generate(uncond_run, url, 8, "--shard-size", "4", "--state", str(state)) == 0
    assert "wrote 0 shard(s)" in capsys.readouterr().out and shard_bytes(remote) == shard_bytes(local_set)


def test_generate_into_an_upload_command(uncond_run, local_set, tmp_path):
    sink, log = tmp_path / "sink", tmp_path / "uploads.log"
    sink.mkdir()
    out = f"pipe:echo {{name}} >> {log} && cat > {sink}/{{name}}"
    assert generate(uncond_run, out, 8, "--shard-size", "4", "--state", str(tmp_path / "state")) == 0
    assert shard_bytes(sink) == shard_bytes(local_set)
    assert (sink / "manifest.json").read_bytes() == (local_set / "manifest.json").read_bytes()
    assert log.read_text().split() == ["generation.json", "shard-000000.tar", "shard-000001.tar", "manifest.json"]


def test_tasks_sharing_a_state_folder_build_one_remote_manifest(uncond_run, local_set, nginx, tmp_path):
    url, remote, state = f"{nginx.url}/tasks", nginx.www / "tasks", str(tmp_path / "state")
    assert generate(uncond_run, url, 8, "--shard-size", "4", "--state", state, "--task-index", "1",
                    "--num-tasks", "2") == 0
    first = json.loads((remote / "manifest.json").read_text())
    assert [r["name"] for r in first["shards"]] == ["shard-000001.tar"] and not first["complete"]
    assert generate(uncond_run, url, 8, "--shard-size", "4", "--state", state, "--task-index", "0",
                    "--num-tasks", "2") == 0
    assert json.loads((remote / "manifest.json").read_text()) == json.loads((local_set / "manifest.json").read_text())
    assert shard_bytes(remote) == shard_bytes(local_set)
