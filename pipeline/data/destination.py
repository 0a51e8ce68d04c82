"""Where `prepare` (and `generate`) write a shard set: a local folder, an HTTP(S) folder, or an upload command.

`--out` forms:
- a local folder (or `file://FOLDER`);
- `http(s)://HOST/DIR`: each file is uploaded with HTTP PUT by curl (nginx's `dav_methods PUT`, WebDAV
  servers, a pre-signed object-store endpoint), and read back with GET/HEAD to resume;
- `pipe:COMMAND` with `{name}` where the file name goes; the command reads the file on stdin
  (`pipe:aws s3 cp - s3://bucket/fmnist/{name}`, `pipe:gsutil cp - gs://bucket/fmnist/{name}`). A command
  cannot be read back, so a rerun uploads again (the same bytes).
Anything else (`s3://...`, a `pipe:` command without `{name}`) is refused with one line.

Atomic for readers: a remote set is built locally first (the same code as a local one: `prepare` in a
temporary staging folder, `generate` in its state folder, see `Publisher`), then each shard is uploaded whole,
and `manifest.json`, the file that says which shards are there, goes last. An
HTTP PUT replaces the object only once the whole body has arrived (nginx writes a temporary file and renames
it; object stores do the same), so a reader sees the old object or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipeline.data import urls
from pipeline.data.shards import MANIFEST_NAME
from pipeline.errors import PipelineError

UPLOAD_RETRIES = 2  # curl's own retries of a failed upload (the file is re-sent from its start)


class DestinationError(PipelineError, ValueError):
    """An output location that cannot be written, or an upload that failed: the message names it."""


class Destination:
    """A remote folder files are uploaded into; `read` gives a file back, or None when absent or unreadable."""

    readable = False

    def __init__(self, location: str):
        self.location = location

    def put(self, name: str, source: Path) -> None:
        raise NotImplementedError

    def read(self, name: str) -> bytes | None:
        return None

    def size(self, name: str) -> int | None:
        return None

    def read_manifest(self) -> dict[str, Any] | None:
        data = self.read(MANIFEST_NAME)
        try:
            return None if data is None else json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a broken manifest describes nothing: the set is written again

    def holds(self, manifest: dict[str, Any]) -> bool:
        """Whether every shard the manifest lists is there with its recorded size (False when unreadable)."""
        return self.readable and all(self.size(r["name"]) == r["bytes"] for r in manifest["shards"])

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A local folder to build the set in; on a clean exit its files are uploaded, the manifest last."""
        with tempfile.TemporaryDirectory(prefix="pipeline-upload-") as stage:
            yield Path(stage)
            files = sorted(p for p in Path(stage).iterdir() if p.is_file() and not p.name.startswith("."))
            for path in sorted(files, key=lambda p: p.name == MANIFEST_NAME):
                self.put(path.name, path)

    def __str__(self) -> str:
        return self.location


class HttpFolder(Destination):
    """http(s)://HOST/DIR: PUT to upload, GET and HEAD to read back, all through curl with bounded waits."""

    readable = True

    def url(self, name: str) -> str:
        return urls.join(self.location, name)

    def curl(self, *args: str) -> subprocess.CompletedProcess:
        command = ["curl", "--connect-timeout", str(urls.CONNECT_TIMEOUT_S), "--speed-limit", "1",
                   "--speed-time", str(round(urls.DEFAULT_TIMEOUT_S)), "-s", "-S", "-L", *args]
        return subprocess.run(command, capture_output=True)

    def put(self, name: str, source: Path) -> None:
        done = self.curl("-f", "--retry", str(UPLOAD_RETRIES), "--retry-all-errors", "-T", str(source), self.url(name))
        if done.returncode != 0:
            raise DestinationError(f"upload of {source.name} to {self.url(name)} failed: {last_line(done)}")

    def _get(self, name: str, *args: str) -> subprocess.CompletedProcess | None:
        done = self.curl("-w", "\n%{http_code}", *args, self.url(name))
        body, _, code = done.stdout.rpartition(b"\n")
        if done.returncode == 0 and code == b"404":
            return None
        if done.returncode != 0 or not code.startswith(b"2"):
            reason = last_line(done) if done.returncode else f"HTTP {code.decode()}"
            raise DestinationError(f"cannot read {self.url(name)}: {reason}")
        done.stdout = body
        return done

    def read(self, name: str) -> bytes | None:
        done = self._get(name)
        return None if done is None else done.stdout

    def size(self, name: str) -> int | None:
        done = self._get(name, "-I")
        if done is None:
            return None
        lengths = [line.split(b":", 1)[1].strip() for line in done.stdout.splitlines()
                   if line.lower().startswith(b"content-length:")]
        return int(lengths[-1]) if lengths else None


class UploadCommand(Destination):
    """pipe:COMMAND with {name}: the command gets each file on stdin."""

    def put(self, name: str, source: Path) -> None:
        command = self.location[len("pipe:"):].replace(urls.NAME_SLOT, name)
        with open(source, "rb") as f:
            done = subprocess.run(command, shell=True, stdin=f, capture_output=True)
        if done.returncode != 0:
            raise DestinationError(f"upload command for {name} ({command!r}) failed: {last_line(done)}")


def last_line(done: subprocess.CompletedProcess) -> str:
    """What a failed command said last (curl repeats itself once per retry), or its exit status."""
    said = done.stderr.decode(errors="replace").strip().splitlines()
    return said[-1] if said else f"exit status {done.returncode}"


def remote(out: str | Path, flag: str = "--out") -> Destination | None:
    """The remote destination `out` names, or None for a local folder; one clear error for a form not handled."""
    out = str(out)
    kind = urls.scheme(out)
    if kind in ("", "file"):
        return None
    if kind in ("http", "https"):
        return HttpFolder(out)
    if kind == "pipe" and urls.NAME_SLOT in out:
        return UploadCommand(out)
    hint = ("put {name} where each file's name goes, e.g. 'pipe:aws s3 cp - s3://bucket/set/{name}'"
            if kind == "pipe" else "use a local folder, http(s)://HOST/DIR, or 'pipe:COMMAND {name}' "
            "(e.g. 'pipe:gsutil cp - gs://bucket/set/{name}')")
    raise DestinationError(f"{flag} {out!r} is not a destination this pipeline can write: {hint}")


def local_folder(out: str | Path, flag: str = "--out") -> Path:
    """`out` as a local folder; a remote form is refused with one line (for writers that stay local)."""
    if remote(out, flag) is not None:
        raise DestinationError(f"{flag} {str(out)!r}: this command writes to a local folder only")
    return Path(urls.local_path(out))


# ---------------------------------------------------------------- generation to a remote destination
UPLOADED_DIR = "uploaded"  # in the local state folder: one record per shard known to be at the destination


def state_folder(out: str, state: str | None) -> Path:
    """The local folder that holds a remote generation's state (spec, done records, shards, upload records);
    tasks that share the work must share it. Default: `generate-state/<name derived from the URL>`."""
    if state:
        return Path(state)
    import hashlib

    return Path("generate-state") / hashlib.sha256(out.encode()).hexdigest()[:16]


class Publisher:
    """Mirrors a local generation folder (`state`) to a remote destination: each finished shard is uploaded
    and an upload record written after it; the destination's manifest lists only uploaded shards and goes last.

    A shard counts as uploaded when its upload record matches its done record and, where the destination can
    be read back (HTTP), the file there has the recorded size; else it is uploaded (again)."""

    def __init__(self, target: Destination, state: Path):
        self.target, self.state = target, state
        (state / UPLOADED_DIR).mkdir(parents=True, exist_ok=True)

    def record_path(self, name: str) -> Path:
        return self.state / UPLOADED_DIR / (Path(name).stem + ".json")

    def uploaded(self, name: str, record: dict[str, Any]) -> bool:
        path = self.record_path(name)
        if not path.is_file() or json.loads(path.read_text()) != record:
            return False
        return not self.target.readable or self.target.size(name) == record["bytes"]

    def shard(self, record: dict[str, Any]) -> None:
        """Upload a finished shard (its done record given) unless it is already at the destination."""
        from pipeline.io import atomic_write_bytes

        if not self.uploaded(record["name"], record):
            self.target.put(record["name"], self.state / record["name"])
            atomic_write_bytes(self.record_path(record["name"]), json.dumps(record, sort_keys=True).encode())

    def file(self, name: str) -> None:
        self.target.put(name, self.state / name)

    def manifest(self, make) -> dict[str, Any]:
        """Upload `make(uploaded records)` as the manifest; again while other tasks added records meanwhile."""
        while True:
            listed = sorted(p.name for p in (self.state / UPLOADED_DIR).glob("*.json"))
            manifest = make([json.loads((self.state / UPLOADED_DIR / n).read_text()) for n in listed])
            with tempfile.TemporaryDirectory(prefix="pipeline-upload-") as stage:
                path = Path(stage) / MANIFEST_NAME
                path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
                self.target.put(MANIFEST_NAME, path)
            if sorted(p.name for p in (self.state / UPLOADED_DIR).glob("*.json")) == listed:
                return manifest
