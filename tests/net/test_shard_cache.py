"""The node-local shard cache (`data.cache_dir`): every reader of a node (ranks x loader workers) gets a remote
shard from one download, and what they read is exactly what they read without the cache, whatever goes wrong
with the download, the copy or the cache's disk. Real nginx, the counting fault proxy in front of it."""
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.cache import ShardCache
from pipeline.data.shards import shard_specs
from pipeline.errors import PipelineError
from tests.net.test_read_urls import epoch, make_loader
from tests.train.conftest import read_log, run_training

SHARD_PATHS = [f"/digits/shard-{i:06d}.tar" for i in range(6)]


def shard_gets(proxy) -> dict[str, int]:
    return {path: count for path, count in proxy.requests.items() if path.endswith(".tar")}


def reads(each: int, starts: int) -> dict[str, int]:
    """GETs per shard: `each` reads of every shard, plus the first bytes of shard 0 that each loader's start
    check reads (`starts` loaders)."""
    return {**dict.fromkeys(SHARD_PATHS, each), SHARD_PATHS[0]: each + starts}


def assert_same_epoch(got, expected) -> None:
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])


def test_one_download_per_shard_serves_every_rank_and_worker_and_later_epochs(proxy, digits_shards, tmp_path):
    cache = tmp_path / "cache"
    for rank in (0, 1):  # two ranks of one node, each with 2 worker processes fetching side by side
        local = make_loader(digits_shards, rank=rank, world_size=2, num_workers=2)
        loader = make_loader(f"{proxy.url}/digits", rank=rank, world_size=2, num_workers=2, cache_dir=cache)
        for _ in range(2):  # epoch 2 (and rank 1) download nothing
            assert_same_epoch(epoch(loader), epoch(local))
            assert shard_gets(proxy) == reads(1, starts=rank + 1)
    specs = shard_specs(digits_shards)
    assert sorted(p.name for p in cache.glob("*.tar")) == sorted(ShardCache.entry_name(s) for s in specs)
    for spec in specs:  # content-addressed: the entry is the shard's bytes
        assert (cache / ShardCache.entry_name(spec)).read_bytes() == open(spec.path, "rb").read()

    proxy.reset()  # the same two ranks without the cache: every worker reads every shard
    for rank in (0, 1):
        epoch(make_loader(f"{proxy.url}/digits", rank=rank, world_size=2, num_workers=2))
    assert shard_gets(proxy) == reads(4, starts=2)


def test_a_pattern_with_a_manifest_beside_it_is_cached_by_content_too(nginx, digits_shards, tmp_path):
    cache = tmp_path / "cache"
    pattern = f"{nginx.url}/digits/shard-{{000000..000005}}.tar"
    assert_same_epoch(epoch(make_loader(pattern, cache_dir=cache)), epoch(make_loader(digits_shards)))
    assert sorted(p.name for p in cache.glob("*.tar")) == sorted(map(ShardCache.entry_name, shard_specs(digits_shards)))


def test_a_truncated_copy_is_fetched_again(proxy, digits_shards, tmp_path):
    cache = tmp_path / "cache"
    expected = epoch(make_loader(digits_shards))
    epoch(make_loader(f"{proxy.url}/digits", cache_dir=cache))
    entry = cache / ShardCache.entry_name(shard_specs(digits_shards)[2])
    entry.write_bytes(entry.read_bytes()[:5000])
    assert_same_epoch(epoch(make_loader(f"{proxy.url}/digits", cache_dir=cache)), expected)
    assert shard_gets(proxy) == {**reads(1, starts=2), SHARD_PATHS[2]: 2}


def test_a_failed_download_is_streamed_and_cached_by_a_later_epoch(proxy, digits_shards, tmp_path, caplog):
    cache = tmp_path / "cache"
    expected = epoch(make_loader(digits_shards))
    proxy.faults[SHARD_PATHS[2]] = [("status", 500)] * 2  # both tries of the download (retries=1)
    loader = make_loader(f"{proxy.url}/digits", cache_dir=cache, retries=1)
    with caplog.at_level(logging.WARNING):
        assert_same_epoch(epoch(loader), expected)
    assert f"not caching {proxy.url}{SHARD_PATHS[2]} after 2 tries" in caplog.text
    assert shard_gets(proxy)[SHARD_PATHS[2]] == 3  # 2 failed downloads, then one streamed read
    entry = cache / ShardCache.entry_name(shard_specs(digits_shards)[2])
    assert not entry.exists()
    epoch(loader)
    assert entry.exists() and shard_gets(proxy)[SHARD_PATHS[2]] == 4


def test_bytes_unlike_the_manifest_are_never_cached_and_read_as_without_a_cache(nginx, digits_shards, tmp_path,
                                                                                caplog):
    changed = nginx.www / "changed"  # shard 1 has one byte changed (same size): only its sha256 tells
    shutil.copytree(digits_shards, changed)
    data = bytearray((changed / "shard-000001.tar").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (changed / "shard-000001.tar").write_bytes(bytes(data))
    try:
        source, cache = f"{nginx.url}/changed", tmp_path / "cache"
        uncached = epoch(make_loader(source, max_bad_fraction=1.0))
        with caplog.at_level(logging.WARNING):
            assert_same_epoch(epoch(make_loader(source, max_bad_fraction=1.0, cache_dir=cache)), uncached)
        assert f"not caching {source}/shard-000001.tar: sha256" in caplog.text
        cached = sorted(p.name for p in cache.glob("*.tar"))
        assert len(cached) == 5 and ShardCache.entry_name(shard_specs(changed)[1]) not in cached
    finally:
        shutil.rmtree(changed)


def test_a_size_limit_keeps_the_most_recent_copies(nginx, digits_shards, tmp_path):
    cache = tmp_path / "cache"
    sizes = [s.bytes for s in shard_specs(digits_shards)]
    limit = int(2.5 * max(sizes))
    expected = epoch(make_loader(digits_shards))
    assert_same_epoch(epoch(make_loader(f"{nginx.url}/digits", cache_dir=cache, cache_bytes=limit)), expected)
    kept = [p.stat().st_size for p in cache.glob("*.tar")]
    assert 1 <= len(kept) <= 2 and sum(kept) <= limit


def test_a_copy_evicted_between_check_and_open_is_fetched_again(nginx, digits_shards, tmp_path, monkeypatch):
    from pipeline.data import cache as cache_module

    spec = shard_specs(digits_shards)[0]
    remote = replace(spec, path=f"{nginx.url}/digits/{Path(spec.path).name}")
    cache = ShardCache(tmp_path / "cache")
    cache.open(remote).close()
    entry = tmp_path / "cache" / ShardCache.entry_name(spec)
    utime = os.utime

    def evicted_first(path, *args):  # another process's eviction removes the copy right after the size check
        monkeypatch.setattr(cache_module.os, "utime", utime)
        Path(path).unlink()
        return utime(path, *args)

    monkeypatch.setattr(cache_module.os, "utime", evicted_first)
    with cache.open(remote) as copy:
        assert copy.read() == Path(spec.path).read_bytes()
    assert entry.exists() and not cache.disabled


def test_downloads_left_by_a_killed_process_are_removed_once_stale(nginx, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    stale, fresh = cache / ".fetch-killed", cache / ".fetch-in-progress"
    for partial in (stale, fresh):
        partial.write_bytes(b"half a shard")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    epoch(make_loader(f"{nginx.url}/digits", cache_dir=cache))
    assert not stale.exists() and fresh.exists()


def test_a_cache_that_cannot_be_written_falls_back_to_streaming(nginx, digits_shards, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    expected = epoch(make_loader(digits_shards))
    with caplog.at_level(logging.WARNING):
        assert_same_epoch(epoch(make_loader(f"{nginx.url}/digits", cache_dir=blocker / "cache")), expected)
    assert f"shard cache {blocker / 'cache'} unusable" in caplog.text


def test_the_cache_folder_expands_variables_where_the_loader_runs(nginx, tmp_path, monkeypatch):
    monkeypatch.setenv("NODE_TMP", str(tmp_path / "node"))
    epoch(make_loader(f"{nginx.url}/digits", cache_dir="$NODE_TMP/shards"))
    assert len(list((tmp_path / "node" / "shards").glob("*.tar"))) == 6
    monkeypatch.delenv("NODE_TMP")
    with pytest.raises(PipelineError, match=r"cache folder '\$NODE_TMP/shards': an environment variable"):
        make_loader(f"{nginx.url}/digits", cache_dir="$NODE_TMP/shards")


def test_training_from_http_through_the_cache_equals_training_from_local_files(proxy, digits_shards, tmp_path):
    steps = ["train.steps=4", "data.num_workers=2"]
    run_training(tmp_path / "local", digits_shards, *steps)
    cache = tmp_path / "cache"
    run_training(tmp_path / "remote", f"{proxy.url}/digits", *steps, f"data.cache_dir={cache}")
    losses = [[row["loss"] for row in read_log(tmp_path / run) if "loss" in row] for run in ("local", "remote")]
    assert len(losses[0]) == 4 and losses[1] == losses[0]
    # 4 steps read a few shards (in the epoch's permuted order): each downloaded once for the 2 workers; shard 0
    # also has the first bytes read by train's start check and by the loader's
    downloads = {**shard_gets(proxy)}
    downloads[SHARD_PATHS[0]] -= 2
    downloads = {path: count for path, count in downloads.items() if count}
    assert len(downloads) >= 2 and set(downloads.values()) == {1}, downloads
    assert len(list(cache.glob("*.tar"))) == len(downloads)
