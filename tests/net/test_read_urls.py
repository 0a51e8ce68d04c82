"""The loader and evaluate read shards from HTTP (real nginx), file:// and pipe: commands exactly as from local
files; dropped connections, server errors, stalls and failing commands are retried without duplicates, and
what cannot be read is counted as lost exactly."""
import json
import logging
import re
import shutil
import tarfile

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data import urls
from pipeline.data.loader import StreamingLoader
from pipeline.errors import PipelineError
from pipeline.evaluation.shardset import read_image_set

SHARDS = "shard-{000000..000005}.tar"


def make_loader(source, **kw):
    kw = {"num_workers": 0, "retries": 3, "max_bad_fraction": 0.0, **kw}
    return StreamingLoader(str(source), batch_size=128, resolution=8, channels=1, seed=5, shuffle_buffer=64, **kw)


def epoch(loader) -> tuple[list[str], np.ndarray]:
    batches = list(loader)
    return [k for b in batches for k in b.keys], np.concatenate([b.images.numpy() for b in batches])


def shard_keys(folder, name) -> list[str]:
    """Keys of one shard, read by the standard library's tarfile (not the code under test)."""
    with tarfile.open(folder / name) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar})


@pytest.fixture(scope="module")
def local_epoch(digits_shards):
    return epoch(make_loader(digits_shards))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_http_folder_and_pattern_give_the_local_batches(nginx, digits_shards, local_epoch, num_workers):
    if num_workers:
        local_epoch = epoch(make_loader(digits_shards, num_workers=num_workers))
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    for source in (f"{nginx.url}/digits", f"{nginx.url}/digits/{SHARDS}"):
        loader = make_loader(source, num_workers=num_workers)
        assert [s.num_samples for s in loader.config.shards] == [r["num_samples"] for r in manifest["shards"]]
        keys, images = epoch(loader)
        assert keys == local_epoch[0] and len(set(keys)) == manifest["num_samples"]
        np.testing.assert_array_equal(images, local_epoch[1])


def test_pattern_without_manifest_reads_with_unknown_counts(nginx, local_epoch, caplog):
    with caplog.at_level(logging.WARNING):
        loader = make_loader(f"{nginx.url}/bare/{SHARDS}")
    assert all(s.num_samples is None for s in loader.config.shards)
    assert "counts unknown" in caplog.text and f"{nginx.url}/bare/manifest.json" in caplog.text
    assert epoch(loader)[0] == local_epoch[0]


def test_file_url_and_pipe_commands_give_the_local_batches(digits_shards, local_epoch):
    for source in (f"file://{digits_shards}", f"file://{digits_shards}/{SHARDS}", f"pipe:cat {digits_shards}/{SHARDS}",
                   f"pipe:cat {digits_shards}/{{name}}"):
        loader = make_loader(source)
        assert None not in [s.num_samples for s in loader.config.shards], source  # manifest found beside
        assert epoch(loader)[0] == local_epoch[0], source


def test_dropped_connections_errors_and_stalls_are_retried_exactly(nginx, proxy, local_epoch):
    proxy.faults["/digits/shard-000001.tar"] = [("cut", 5_000), ("cut", 200_000)]  # mid-shard, twice
    proxy.faults["/digits/shard-000003.tar"] = [("status", 500)]
    proxy.faults["/digits/shard-000004.tar"] = [("stall", 6)]  # longer than timeout_s
    loader = make_loader(f"{proxy.url}/digits", timeout_s=1)
    keys, images = epoch(loader)
    assert keys == local_epoch[0]  # same samples, same order: nothing lost, nothing twice
    np.testing.assert_array_equal(images, local_epoch[1])
    assert loader.stats["bad"] == 0
    assert proxy.requests["/digits/shard-000001.tar"] == 3 and proxy.requests["/digits/shard-000003.tar"] == 2


# One reader only: every worker reads every shard of the global order (pipeline/data/loader.py), so with 2 workers
# the proxy's 3 faults would fall on whichever reads come first, a matter of timing.
@pytest.mark.parametrize("num_workers", [0])
def test_a_shard_failing_beyond_the_retries_counts_its_lost_samples(nginx, proxy, digits_shards, local_epoch,
                                                                     num_workers):
    proxy.faults["/digits/shard-000002.tar"] = [("cut", 100_000)] * 3
    loader = make_loader(f"{proxy.url}/digits", retries=2, max_bad_fraction=1.0, num_workers=num_workers)
    keys, _ = epoch(loader)
    lost_shard = set(shard_keys(digits_shards, "shard-000002.tar"))
    delivered = [k for k in keys if k in lost_shard]
    assert len(keys) == len(set(keys)) and set(keys) <= set(local_epoch[0])
    assert set(local_epoch[0]) - set(keys) <= lost_shard  # only that shard lost samples
    assert 0 < len(delivered) < len(lost_shard)  # what arrived before the cut is kept ...
    assert loader.stats == {"epoch": 0, "good": len(keys), "bad": len(lost_shard) - len(delivered)}  # ... the rest lost
    assert proxy.requests["/digits/shard-000002.tar"] == 3


def test_a_command_failing_part_way_is_retried(tmp_path, digits_shards):
    flaky = tmp_path / "flaky.sh"  # the first read of each .tar stops part-way and exits 3
    flaky.write_text('case "$1" in *.tar) m="$2/$(basename "$1")"; if [ ! -e "$m" ]; then : > "$m"; '
                     'head -c 50000 "$1"; exit 3; fi;; esac; exec cat "$1"\n')
    source = f"pipe:sh {flaky} {digits_shards}/shard-{{000000..000001}}.tar {tmp_path}"
    expected = epoch(make_loader(f"{digits_shards}/shard-{{000000..000001}}.tar"))[0]
    loader = make_loader(source)
    assert epoch(loader)[0] == expected and loader.stats["bad"] == 0
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]


def test_a_command_that_fails_after_its_first_bytes_passes_the_start_check(digits_shards, monkeypatch):
    # It failed part-way, which the reader retries; the start check only asks for first bytes. Made certain here
    # (the command has exited before the first read), it raced before: one CI run refused the flaky set above.
    open_url = urls.open_url

    def exited_before_the_first_read(*args, **kwargs):
        stream = open_url(*args, **kwargs)
        stream.proc.wait(30)  # 50000 bytes fit in the pipe's buffer
        return stream

    monkeypatch.setattr(urls, "open_url", exited_before_the_first_read)
    urls.check_readable(f"pipe:head -c 50000 {digits_shards}/shard-000000.tar; exit 3")
    with pytest.raises(PipelineError, match=re.escape("pipe:exit 3") + ".*exit status 3"):
        urls.check_readable("pipe:exit 3")


def test_unreachable_or_missing_shards_fail_at_start_naming_the_url(nginx):
    missing = f"{nginx.url}/digits/shard-{{000007..000008}}.tar"
    with pytest.raises(PipelineError, match=re.escape(f"{nginx.url}/digits/shard-000007.tar") + ".*404"):
        make_loader(missing)
    with pytest.raises(PipelineError, match=re.escape(f"{nginx.url}/nowhere/manifest.json") + ".*404"):
        make_loader(f"{nginx.url}/nowhere")
    closed = "http://127.0.0.1:9/digits/shard-000000.tar"  # the discard port: nothing listens on loopback
    with pytest.raises(PipelineError, match=re.escape(closed)):
        make_loader(closed)
    with pytest.raises(PipelineError, match=re.escape("pipe:exit 7") + ".*exit status 7"):
        make_loader("pipe:exit 7")


@pytest.fixture()
def broken_set(nginx, digits_shards):
    """The digits set on nginx with shard 3 deleted and shard 1 cut short by 1 KiB; its manifest unchanged."""
    broken = nginx.www / "broken"
    shutil.copytree(digits_shards, broken)
    (broken / "shard-000003.tar").unlink()
    whole = (broken / "shard-000001.tar").read_bytes()
    (broken / "shard-000001.tar").write_bytes(whole[:-1024])
    yield "/broken", len(whole)
    shutil.rmtree(broken)


def test_a_missing_or_resized_http_shard_is_refused_at_start_naming_it(nginx, broken_set):
    folder, whole = broken_set
    for source in (f"{nginx.url}{folder}", f"{nginx.url}{folder}/{SHARDS}"):  # folder; pattern + manifest beside
        with pytest.raises(PipelineError) as refused:
            make_loader(source)
        said = str(refused.value)
        assert f"shard-000003.tar: missing ({nginx.url}{folder}/shard-000003.tar: HTTP 404)" in said, said
        assert f"shard-000001.tar: {whole - 1024} bytes, manifest says {whole}" in said, said
        assert "data.verify=off" in said


def test_redirected_shards_are_checked_with_head_requests_only(nginx, broken_set):
    folder, whole = broken_set
    with pytest.raises(PipelineError) as refused:
        make_loader(f"{nginx.url}/moved{folder}")  # the manifest and each shard answer 301 -> {folder}/...
    assert f"shard-000001.tar: {whole - 1024} bytes, manifest says {whole}" in str(refused.value)
    log = (nginx.root / "access.log").read_text()
    for i in (1, 2, 4, 5):  # each shard's redirect followed with HEAD: no shard body sent for the check
        assert f'"HEAD {folder}/shard-{i:06d}.tar HTTP/1.1" 200' in log
        assert f'"GET {folder}/shard-{i:06d}.tar ' not in log


def test_a_server_refusing_head_is_read_and_its_losses_counted(nginx, proxy, broken_set, digits_shards):
    # Presigned URLs refuse HEAD: nothing can be checked at start, so the set is read, and what is not there is
    # counted lost exactly, as with data.verify=off on nginx itself.
    folder, _ = broken_set
    gone = set(shard_keys(digits_shards, "shard-000003.tar"))
    for source, verify in ((f"{proxy.url}{folder}", "size"), (f"{nginx.url}{folder}", "off")):
        loader = make_loader(source, verify=verify, retries=0, max_bad_fraction=1.0)
        keys, _ = epoch(loader)
        manifest_total = json.loads((digits_shards / "manifest.json").read_text())["num_samples"]
        assert gone.isdisjoint(keys) and len(keys) == len(set(keys))
        assert loader.stats["good"] == len(keys) and loader.stats["bad"] == manifest_total - len(keys)


def test_evaluate_reads_a_set_over_http(nginx, digits_shards):
    remote, local = read_image_set(f"{nginx.url}/digits"), read_image_set(digits_shards)
    assert remote.total == local.total == 1797
    assert remote.manifest == local.manifest
    assert remote.ids.tolist() == local.ids.tolist()
    np.testing.assert_array_equal(remote.images.numpy(), local.images.numpy())


def test_resume_over_http_gives_the_uninterrupted_batches(nginx, local_epoch):
    loader = make_loader(f"{nginx.url}/digits", num_workers=2)
    batches = iter(loader)
    head = [k for _, b in zip(range(5), batches) for k in b.keys]
    state = loader.state_dict()
    del batches
    resumed = make_loader(f"{nginx.url}/digits", num_workers=2)
    resumed.load_state_dict(state)
    rest = [k for b in resumed for k in b.keys]
    assert head + rest == epoch(make_loader(f"{nginx.url}/digits", num_workers=2))[0]


def test_evaluate_command_takes_urls(nginx, capsys):
    argv = ["evaluate", "--real", f"{nginx.url}/digits", "--fake", f"{nginx.url}/digits", "--num", "300"]
    assert main(argv) == 0
    assert f'"real": "{nginx.url}/digits"' in capsys.readouterr().out
    assert main(["evaluate", "--real", f"{nginx.url}/nothing", "--fake", f"{nginx.url}/digits"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{nginx.url}/nothing/manifest.json" in err and "404" in err
