"""Which shards a `data.shards` value names, and whether they are all there, without reading a sample.

A folder with a manifest, a local brace/glob pattern, or a URL (`pipeline.data.urls`); local shards are checked
against their manifest at level `verify`. No torch here: `train` checks the data before DeepSpeed starts.
"""
from __future__ import annotations

import os
from dataclasses import replace

from pipeline.data import shards as shard_format
from pipeline.data import urls
from pipeline.errors import PipelineError

ShardInfo = shard_format.ShardSpec  # a shard as its manifest describes it (path, count, ids, classes, size)


class LoaderError(PipelineError, ValueError):
    """The loader cannot start: a path or pattern matching nothing, or a bad argument."""


def resolve_shards(path: str | os.PathLike, verify: str = "size",
                   timeout_s: float = urls.DEFAULT_TIMEOUT_S) -> list[ShardInfo]:
    """Shards of a folder (from its manifest), of a brace/glob pattern, or of a URL (`pipeline.data.urls`),
    local ones checked against their manifest at level `verify`; a clear error if none exist or they
    disagree with the manifest."""
    path = urls.local_path(path)
    if urls.is_remote(path):
        found = remote_specs(path, timeout_s)
        problems = remote_problems(found, timeout_s) if verify != "off" else []
    elif os.path.isdir(path):
        manifest = shard_format.read_manifest(path)
        found = shard_format.shard_specs(path, manifest)
        missing = [s.path for s in found if not os.path.isfile(s.path)]
        if missing:
            raise LoaderError(f"{len(missing)} shard(s) listed in {path}/manifest.json are missing, e.g. {missing[0]}")
        if not found:
            raise LoaderError(f"the manifest in {path} lists no shards")
        problems = shard_format.verify_shards(path, manifest, verify)
    else:
        try:
            found = specs_from_manifests(urls.expand(path))
        except urls.RemoteReadError as exn:
            raise LoaderError(str(exn)) from None
        listed = [s for s in found if s.num_samples is not None and verify != "off"]
        problems = [p for p in (shard_format.check_shard_file(s, verify) for s in listed) if p]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LoaderError(f"shards of {path} do not match their manifest (verify={verify}): "
                          f"{'; '.join(problems[:3])}{more}. Re-create them (prepare / generate), or set "
                          "data.verify=off to read what is there (lost samples count against max_bad_fraction)")
    return found


def remote_specs(path: str, timeout_s: float) -> list[ShardInfo]:
    """Shards of a remote folder as its manifest describes them (ids and classes too, so the reader can
    check keys and labels); of a remote pattern with the counts, sizes and sha256 of manifests beside the
    shards."""
    if not urls.is_folder(path):
        return [ShardInfo(url) if record is None else ShardInfo(url, int(record["num_samples"]),
                                                               bytes=int(record["bytes"]), sha256=record["sha256"])
                for url, record in urls.remote_shards(path, timeout_s)]
    manifest = urls.read_manifest(urls.join(path, shard_format.MANIFEST_NAME), timeout_s)
    found = shard_format.shard_specs(path, manifest, join=urls.join)
    if not found:
        raise LoaderError(f"the manifest of {path} lists no shards")
    urls.check_readable(found[0].path, timeout_s)
    return found


def remote_problems(found: list[ShardInfo], timeout_s: float) -> list[str]:
    """How http(s) shards disagree with their manifest records, by one HEAD request each (16 at a time): a
    shard the server says is not there (404/410) or whose size differs. Sizes only, whatever the level: a
    sha256 needs every byte. A server that refuses HEAD (presigned S3 URLs) or gives no size is not a
    problem; `pipe:` and other schemes are not checked; the reader counts what then fails as lost."""
    from concurrent.futures import ThreadPoolExecutor

    def problem(spec: ShardInfo) -> str | None:
        try:
            size = urls.http_size(spec.path, timeout_s)
        except urls.RemoteReadError as exn:
            return f"{urls.file_name(spec.path)}: missing ({exn})"
        if size is not None and spec.bytes is not None and size != spec.bytes:
            return f"{urls.file_name(spec.path)}: {size} bytes, manifest says {spec.bytes}"
        return None

    checked = [s for s in found if urls.scheme(s.path) in ("http", "https")]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return [p for p in pool.map(problem, checked) if p]


def specs_from_manifests(names: list[str]) -> list[ShardInfo]:
    """Each local shard as a manifest beside it describes it; only its path when no manifest lists it (then
    its losses cannot be counted exactly)."""
    by_folder: dict[str, dict[str, ShardInfo]] = {}
    specs = []
    for name in names:
        folder = os.path.dirname(name) or "."
        if folder not in by_folder:
            try:
                by_folder[folder] = {os.path.basename(s.path): s for s in shard_format.shard_specs(folder)}
            except shard_format.ManifestError:
                by_folder[folder] = {}
        listed = by_folder[folder].get(os.path.basename(name))
        specs.append(ShardInfo(name) if listed is None else replace(listed, path=name))
    return specs
