"""Shard locations as URLs (webdataset's syntax), opened with webdataset's `gopen`, read with bounded retries.

Forms a shard reader accepts (training's `data.shards`, `evaluate --real/--fake`):
- a local folder with `manifest.json`, a local path or glob, `file://PATH`;
- a brace pattern (`.../shard-{000000..000009}.tar`) and several patterns joined by `::`;
- `http(s)://...` and every other scheme webdataset's gopen knows (`gs://`, `ais://`, ...);
- `pipe:COMMAND`, a command that writes the shard to stdout (`pipe:aws s3 cp s3://b/d/shard-000000.tar -`).
A remote *folder* is a URL that names no `.tar` (`http://host/data/fmnist`) or a `pipe:` command with `{name}`
where the file name goes (`pipe:gsutil cat gs://b/fmnist/{name}`); its `manifest.json` lists the shards.
For a pattern, the manifest is looked for beside the shards (the `.tar` name replaced by `manifest.json`);
without one the sample counts are unknown, and a shard cut short then counts as one lost sample.
`http_size` asks an http(s) server for a shard's size (HEAD), so a missing or resized shard is refused at
the start rather than counted as lost when the reader reaches it.

http(s) goes through curl, as in webdataset, but with bounded waits (a connect timeout; abort when no byte
arrives for `timeout_s`) and without curl's own retries: a retry here knows which samples were already
delivered. `read_retrying` re-reads a remote shard that failed part-way (a dropped connection, a command that
exits non-zero) up to `retries` times, skipping what was delivered, so no sample is delivered twice; when the
retries are used up the error goes to the caller, which counts the rest of the shard as lost.
"""
from __future__ import annotations

import contextlib
import glob
import importlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any, BinaryIO, Callable, Iterator, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

from pipeline.errors import PipelineError
from pipeline.lazy import lazy_import

wds = lazy_import("webdataset")  # webdataset imports torch: load it on first use, not for `--help`


def _gopen() -> Any:
    """webdataset's gopen module (`wds.gopen` is the function of the same name)."""
    return importlib.import_module("webdataset.gopen")

logger = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 10
DEFAULT_TIMEOUT_S = 30.0  # a remote read that receives nothing for this long counts as dropped
DEFAULT_RETRIES = 3
RETRY_BACKOFF_S = (0.2, 1.0, 2.0, 4.0)  # waits before retry 1, 2, 3 and later ones
TAR_NAME = re.compile(r"[^/\s'\"]+\.tar\b")  # a shard's file name inside a URL or command
NAME_SLOT = "{name}"
T = TypeVar("T")


class RemoteReadError(PipelineError, OSError):
    """A URL that cannot be read: the message names it and says why (HTTP status, exit status, curl's words)."""


# ---------------------------------------------------------------- what a location is
def scheme(url: str) -> str:
    """'' for a local path, else the URL's scheme ('pipe' for a command); a one-letter scheme is a drive."""
    if url.startswith("pipe:"):
        return "pipe"
    found = urlparse(url).scheme
    return found if len(found) > 1 else ""


def is_remote(url: str | os.PathLike) -> bool:
    return scheme(str(url)) not in ("", "file")


def local_path(url: str | os.PathLike) -> str:
    """A `file://` URL as a path; anything else unchanged."""
    url = str(url)
    return url2pathname(urlparse(url).path) if scheme(url) == "file" else url


def is_folder(url: str) -> bool:
    """Whether a remote location names a folder (a manifest lists its shards) rather than shard files."""
    if scheme(url) == "pipe":
        return NAME_SLOT in url
    return not url.rstrip("/").endswith(".tar") and "{" not in url and "::" not in url


def join(folder: str, name: str) -> str:
    """The location of file `name` inside a (remote or local) folder."""
    if scheme(folder) == "pipe":
        return folder.replace(NAME_SLOT, name)
    if is_remote(folder):
        return folder.rstrip("/") + "/" + name
    return os.path.join(folder, name)


def sibling(url: str, name: str) -> str | None:
    """`url` with its shard's file name replaced by `name` (where a manifest beside the shard is), if it has one."""
    found = list(TAR_NAME.finditer(url))
    if not found:
        return None
    last = found[-1]
    return url[:last.start()] + name + url[last.end():]


def file_name(url: str) -> str:
    """The shard's file name in a URL or command (the manifest's name for it)."""
    found = TAR_NAME.findall(url)
    return found[-1] if found else os.path.basename(url.rstrip("/"))


def expand(pattern: str) -> list[str]:
    """Braces and `::` (webdataset's expand_urls), then globs for local paths; missing local files are an error."""
    names, missing = [], []
    for expanded in wds.shardlists.expand_urls(pattern):
        if is_remote(expanded):
            names.append(expanded)
            continue
        expanded = local_path(expanded)
        if glob.has_magic(expanded):
            names += sorted(glob.glob(expanded))
        elif os.path.isfile(expanded):
            names.append(expanded)
        else:
            missing.append(expanded)
    if not names:
        raise RemoteReadError(f"shard pattern {pattern!r} matches no file (give a shard folder with manifest.json, "
                              "or a pattern such as DIR/shard-{000000..000009}.tar)")
    if missing:
        raise RemoteReadError(f"shard pattern {pattern!r}: {len(missing)} file(s) do not exist, e.g. {missing[0]}")
    return names


# ---------------------------------------------------------------- opening
def curl(url: str, mode: str = "rb", bufsize: int = 8192, timeout_s: float = DEFAULT_TIMEOUT_S, **_: Any):
    """webdataset's curl opener with bounded waits and no curl-level retries; HTTP errors fail (-f)."""
    bounded = ["curl", "--connect-timeout", str(CONNECT_TIMEOUT_S), "--speed-limit", "1",
               "--speed-time", str(max(1, round(timeout_s))), "-f", "-s", "-S", "-L"]
    if mode[0] == "r":
        return _gopen().Pipe([*bounded, url], mode=mode, bufsize=bufsize, ignore_status=[141, 23], stderr=subprocess.PIPE)
    if mode[0] == "w":
        return _gopen().Pipe([*bounded, "-T", "-", url], mode=mode, bufsize=bufsize, ignore_status=[141],
                    stderr=subprocess.PIPE)
    raise ValueError(f"{mode}: unknown mode")


def use_bounded_curl() -> None:
    """gopen_schemes is webdataset's dispatch table: every gopen in the process (also inside wds.WebDataset)
    then reads http(s) with bounded waits instead of curl's 30 retries of 2 s each."""
    _gopen().gopen_schemes.update(http=curl, https=curl)


def open_url(url: str, mode: str = "rb", timeout_s: float = DEFAULT_TIMEOUT_S) -> BinaryIO:
    if scheme(url) in ("http", "https"):
        return curl(url, mode, timeout_s=timeout_s)
    use_bounded_curl()
    try:
        return _gopen().gopen(local_path(url), mode)
    except ValueError as exn:  # gopen's word for an unknown scheme
        raise RemoteReadError(f"cannot open {url}: {exn}") from None


def failure(stream: Any, wait_s: float = 5.0) -> str | None:
    """Why a command stream failed (its exit status and error output), or None when it did not (yet)."""
    if not isinstance(stream, _gopen().Pipe):
        return None
    try:
        status = stream.proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        return None
    if status in (0, 141):
        return None
    said = stream.proc.stderr.read().decode(errors="replace").strip() if stream.proc.stderr else ""
    return f"exit status {status}" + (f": {said.splitlines()[-1]}" if said else "")


def close_quietly(stream: Any) -> None:
    """Close a stream; a command still running (its reader stopped early) is ended, and its status ignored."""
    if not isinstance(stream, _gopen().Pipe):
        stream.close()
        return
    stream.stream.close()
    if stream.proc.poll() is None:
        stream.proc.terminate()
        try:
            stream.proc.wait(5)
        except subprocess.TimeoutExpired:
            stream.proc.kill()
            stream.proc.wait()
    if stream.proc.stderr:
        stream.proc.stderr.close()
    stream.status = stream.proc.returncode  # Pipe.__del__ must not wait or raise again


@contextlib.contextmanager
def opened(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[BinaryIO]:
    """`url` open for reading; an error inside becomes a RemoteReadError when the command or curl failed."""
    try:
        stream = open_url(url, "rb", timeout_s)
    except OSError as exn:
        raise RemoteReadError(f"cannot open {url}: {exn}") from None
    try:
        yield stream
    except RemoteReadError:
        raise
    except Exception as exn:
        reason = failure(stream)
        if reason:
            raise RemoteReadError(f"{url}: {reason}") from exn
        raise
    finally:
        close_quietly(stream)


def copy_to(url: str, out: BinaryIO, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Write the whole content at `url` into `out`; a RemoteReadError naming the URL when it cannot be read
    completely."""
    try:
        with opened(url, timeout_s) as stream:
            shutil.copyfileobj(stream.stream if isinstance(stream, _gopen().Pipe) else stream, out, 1 << 20)
            reason = failure(stream, wait_s=timeout_s)
            if reason:
                raise RemoteReadError(f"{url}: {reason}")
    except RemoteReadError:
        raise
    except OSError as exn:
        raise RemoteReadError(f"{url}: {exn}") from None


def read_bytes(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
    """The whole content at `url`; a RemoteReadError naming the URL when it cannot be read completely."""
    buffer = io.BytesIO()
    copy_to(url, buffer, timeout_s)
    return buffer.getvalue()


def check_readable(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Fail now, with one line naming the URL, when its first bytes cannot be read (404, no host, bad command)."""
    try:
        with opened(url, timeout_s) as stream:
            # A command's pipe read directly: gopen's read raises when the command has already exited non-zero,
            # but one that fails after its first bytes failed part-way, which the reader retries.
            raw = stream.stream if isinstance(stream, _gopen().Pipe) else stream
            if not raw.read(512):
                raise RemoteReadError(f"{url}: {failure(stream, wait_s=timeout_s) or 'empty'}")
    except RemoteReadError:
        raise
    except OSError as exn:
        raise RemoteReadError(f"{url}: {exn}") from None


# ---------------------------------------------------------------- reading with retries
def read_retrying(url: str, parse: Callable[[BinaryIO], Iterator[T]], *, retries: int = DEFAULT_RETRIES,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[T]:
    """The items `parse(stream)` yields from `url`. A remote read that fails part-way is started again (up to
    `retries` times), skipping the items already delivered, so none is delivered twice; after the last try the
    error is raised. Local files are read once: reading a truncated file again would give the same."""
    delivered, attempts = 0, 1 + (retries if is_remote(url) else 0)
    for attempt in range(attempts):
        try:
            with opened(url, timeout_s) as stream:
                for index, item in enumerate(parse(stream)):
                    if index >= delivered:  # the items before were delivered by an earlier try
                        delivered += 1
                        yield item
            return
        except Exception as exn:  # a dropped connection, a failed command, a cut stream: all retried alike
            if attempt + 1 == attempts:
                raise
            wait = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
            logger.warning("reading %s failed after %d item(s) (%s: %s); retry %d of %d in %.1f s", url,
                           delivered, type(exn).__name__, exn, attempt + 1, retries, wait)
            time.sleep(wait)


# ---------------------------------------------------------------- remote shard sets
def read_manifest(where: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """The manifest at URL `where` (a `.../manifest.json`), checked like a local one."""
    from pipeline.data import shards  # deferred: shards is the format's owner and imports nothing from here

    try:
        manifest = json.loads(read_bytes(where, timeout_s))
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise shards.ManifestError(f"{where} is not valid JSON: {exn}") from None
    shards.check_manifest(manifest, where)
    return manifest


def remote_shards(pattern: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[tuple[str, dict[str, Any] | None]]:
    """(URL, its manifest record or None) of each shard of a remote pattern, the record from a manifest beside
    the shards; the first shard is opened once, so a wrong address fails here with one line naming it."""
    from pipeline.data.shards import MANIFEST_NAME

    found: list[tuple[str, dict[str, Any] | None]] = []
    records: dict[str | None, dict[str, dict[str, Any]]] = {}  # manifest location -> shard name -> record
    for url in expand(pattern):
        where = sibling(url, MANIFEST_NAME)
        if where not in records:
            records[where] = manifest_records(where, timeout_s)
        found.append((url, records[where].get(file_name(url))))
    check_readable(found[0][0], timeout_s)
    return found


def manifest_records(where: str | None, timeout_s: float) -> dict[str, dict[str, Any]]:
    """Shard name -> its record (num_samples, bytes, sha256) in the manifest at `where`; empty (and said so)
    when there is none."""
    reason = "no .tar name to put manifest.json in place of"
    if where is not None:
        try:
            return {r["name"]: r for r in read_manifest(where, timeout_s)["shards"]}
        except PipelineError as exn:
            reason = str(exn)
    logger.warning("no manifest beside the shards (%s): sample counts unknown, so a shard cut short counts as "
                   "one lost sample", reason)
    return {}


class _HeadRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect of a HEAD request with HEAD (urllib turns it into a GET, which starts sending the
    whole shard)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        follow = super().redirect_request(req, fp, code, msg, headers, newurl)
        if follow is not None and req.get_method() == "HEAD":
            follow.method = "HEAD"
        return follow


def http_size(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> int | None:
    """The size an http(s) server reports for `url` (a HEAD request), or None when it does not say: no
    Content-Length, or HEAD refused (presigned S3 GET URLs answer 403, some servers 405/501) or not answered.
    Only a definite "not there" (404, 410) is an error: the read itself decides everything uncertain."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.build_opener(_HeadRedirects).open(request, timeout=timeout_s) as reply:
            length = reply.headers.get("Content-Length")
    except urllib.error.HTTPError as exn:
        if exn.code in (404, 410):
            raise RemoteReadError(f"{url}: HTTP {exn.code}") from None
        return None
    except (OSError, ValueError):  # no answer in time, a refused connection: the reader's retries handle it
        return None
    return int(length) if length and length.isdigit() else None
