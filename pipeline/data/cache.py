"""A node-local cache of remote shards: a node fetches each shard over the network once, not once per reader.

Every loader worker of every rank reads every shard's bytes (the global sample order needs them; see
docs/ARCHITECTURE.md), so without a cache a remote set crosses the network ranks x workers times per epoch.
With `data.cache_dir` on a node-local disk, the first reader of the node that needs a shard downloads it whole
while the others wait on the entry's file lock, and all of them read that copy: once per node, and later epochs
and resumes read nothing remote while the copy is kept.

- Entries are named by the manifest's sha256 when it gives one, and the download is hashed and sized as it is
  written, so a stale or wrong copy is never used. A shard without a manifest record is named by a hash of its
  URL, so one replaced at the same URL is not noticed while its copy is kept.
- Writes are atomic (a temporary file, renamed); an entry is used only when it is complete and of the
  manifest's size.
- With a size limit, the least recently used entries are removed first. A reader that holds one open keeps
  reading it (POSIX).
- A shard that cannot be cached is streamed as without a cache and counted exactly the same. That is one whose
  download fails after the retries or whose bytes are not the manifest's; a full disk stops caching for the
  process.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator

from pipeline.data import urls
from pipeline.data.shards import ShardSpec
from pipeline.data.shardset import LoaderError

logger = logging.getLogger(__name__)
PARTIAL_PREFIX = ".fetch-"  # a download in progress (or left by a killed process); never read
STALE_PARTIAL_S = 3600  # a download nobody wrote to for this long was left by a killed process


def node_folder(path: str | os.PathLike) -> str:
    """`path` with `~` and environment variables expanded where this process runs (`$SLURM_TMPDIR/shards` is
    the task's node-local folder, not the submitting host's); an unset variable is refused."""
    expanded = os.path.expandvars(os.path.expanduser(str(path)))
    if "$" in expanded:
        raise LoaderError(f"cache folder {str(path)!r}: an environment variable in it is not set here")
    return expanded


class ShardMismatch(Exception):
    """The downloaded bytes are not the shard the manifest describes (size or sha256)."""


class CacheDiskError(Exception):
    """The cache's own disk refused a write (full, read-only). Not an OSError: it must not pass for a failed
    download, which is retried."""


class _HashingWriter:
    """A write-only file that counts and hashes what goes through it."""

    def __init__(self, out: BinaryIO):
        self.out, self.size, self.digest = out, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        try:
            return self.out.write(data)
        except OSError as exn:
            raise CacheDiskError(str(exn)) from exn


class ShardCache:
    """Local copies of remote shards in `folder`, at most `max_bytes` of them (None: no limit)."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int | None = None):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.disabled = False  # set when the disk refused a write: streaming is then the better choice

    @staticmethod
    def entry_name(shard: ShardSpec) -> str:
        if shard.sha256:
            return f"sha256-{shard.sha256}.tar"
        return f"url-{hashlib.sha256(shard.path.encode()).hexdigest()[:32]}-{urls.file_name(shard.path)}"

    def open(self, shard: ShardSpec, retries: int = urls.DEFAULT_RETRIES,
             timeout_s: float = urls.DEFAULT_TIMEOUT_S) -> BinaryIO | None:
        """The local copy of `shard`, open for reading (fetched now if there is none), or None when it cannot be
        cached: the caller then streams the shard."""
        if self.disabled:
            return None
        entry = self.folder / self.entry_name(shard)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with self._locked(entry):  # one fetch per node; the others wait for it, then read the copy
                for _ in range(2):  # another process's eviction may remove the entry between check and open
                    if not self._usable(entry, shard) and not self._fetch(shard, entry, retries, timeout_s):
                        return None
                    with contextlib.suppress(FileNotFoundError):
                        os.utime(entry)  # recently used: evicted last
                        return open(entry, "rb")  # once open, removing the entry no longer matters (POSIX)
                return None
        except OSError as exn:
            self._give_up(exn)
            return None

    def _give_up(self, exn: BaseException) -> None:
        """The cache's own disk failed (full, read-only, no such folder): stream from now on, in this process."""
        logger.warning("shard cache %s unusable (%s): reading shards from their source", self.folder, exn)
        self.disabled = True

    @contextlib.contextmanager
    def _locked(self, entry: Path) -> Iterator[None]:
        # Lock files are never removed: removing one while another process waits on it would let two in.
        with open(entry.with_name(entry.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _usable(entry: Path, shard: ShardSpec) -> bool:
        try:
            size = entry.stat().st_size
        except FileNotFoundError:
            return False
        return shard.bytes is None or size == shard.bytes

    def _fetch(self, shard: ShardSpec, entry: Path, retries: int, timeout_s: float) -> bool:
        """Download `shard` into `entry`, retrying a failed download; whether it is there now."""
        for attempt in range(1 + retries):
            started = time.monotonic()
            try:
                size = self._download(shard, entry, timeout_s)
            except ShardMismatch as exn:  # the server has these bytes: another try would get the same
                logger.warning("not caching %s: %s; reading it from the source", shard.path, exn)
                return False
            except urls.RemoteReadError as exn:
                if attempt == retries:
                    logger.warning("not caching %s after %d tries (%s); reading it from the source", shard.path,
                                   1 + retries, exn)
                    return False
                time.sleep(urls.RETRY_BACKOFF_S[min(attempt, len(urls.RETRY_BACKOFF_S) - 1)])
                continue
            except (CacheDiskError, OSError) as exn:
                self._give_up(exn)
                return False
            logger.debug("cached %s: %d bytes in %.2f s", shard.path, size, time.monotonic() - started)
            self._evict(keep=entry)
            self._remove_stale_partials()
            return True
        return False

    def _download(self, shard: ShardSpec, entry: Path, timeout_s: float) -> int:
        """Write the shard's bytes to a temporary file, check them against the manifest, rename into place."""
        handle, partial = tempfile.mkstemp(dir=self.folder, prefix=PARTIAL_PREFIX)
        try:
            with os.fdopen(handle, "wb") as out:
                written = _HashingWriter(out)
                urls.copy_to(shard.path, written, timeout_s)
            if shard.bytes is not None and written.size != shard.bytes:
                raise ShardMismatch(f"{written.size} bytes, manifest says {shard.bytes}")
            if shard.sha256 and written.digest.hexdigest() != shard.sha256:
                raise ShardMismatch(f"sha256 {written.digest.hexdigest()[:12]}... differs from the manifest's "
                                    f"{shard.sha256[:12]}...")
            os.replace(partial, entry)
            return written.size
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used entries (never `keep`) until the cache fits its limit."""
        if self.max_bytes is None:
            return
        entries = []
        for path in self.folder.glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):  # another process may evict at the same time
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path != keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                total -= size

    def _remove_stale_partials(self) -> None:
        now = time.time()
        for path in self.folder.glob(PARTIAL_PREFIX + "*"):
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > STALE_PARTIAL_S:
                    path.unlink()
