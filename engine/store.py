"""The run folder: atomic writes, artifacts with sha256, the manifest (written last), and the lock.

Layout: ``RUN_DIR/manifest.json``, ``RUN_DIR/audit.jsonl``, ``RUN_DIR/artifacts/...`` (safetensors and JSON
only), ``RUN_DIR/export/``. No pickle anywhere.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from podar.schemas.errors import CheckpointError
from podar.schemas.records import ArtifactRecord, RunManifest

from . import faults

__all__ = ["ArtifactKey", "RunStore", "RunLock", "atomic_write_bytes", "manifest_mac", "sha256_file",
           "sort_safetensors_metadata", "utc_now"]

MANIFEST = "manifest.json"
AUDIT = "audit.jsonl"
LOCK = "run.lock"
ARTIFACTS = "artifacts"
EXPORT = "export"
DENSE_REFERENCE = "artifacts/dense_reference"  # the pruned layers' weights before pruning, in parts

_CHUNK_BYTES = 1 << 20  # hashing reads 1 MiB at a time
_FILE_MODE = 0o644  # mkstemp creates 0600; run folders are meant to be read by auditors
_NAME_MAX = 255  # bytes per file or folder name (Linux, macOS)


def manifest_mac(manifest: RunManifest, key: bytes) -> str:
    """HMAC-SHA256 under ``key`` of the manifest's canonical JSON without its ``mac``."""
    body = manifest.model_dump(mode="json", exclude={"mac"})
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def utc_now() -> str:
    """UTC ISO-8601 timestamp with microseconds, e.g. 2026-11-30T06:21:44.123456+00:00."""
    return datetime.now(UTC).isoformat()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, fault_point: str = "write:artifact") -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        faults.hit(fault_point)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is fsynced and moved over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _FILE_MODE)
        faults.hit("write:artifact")
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        if tmp_path.exists():
            tmp_path.unlink()
        raise


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite, in place, the metadata map of a safetensors file's header in sorted key order. safetensors writes
    it in hash-map order, which differs from one call to the next, so equal content would give other bytes (and
    another sha256) whenever the map has two keys or more; the sorted text has the same length."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
        text = header.decode("utf-8")
        meta = json.loads(text).get("__metadata__")
        if not meta or len(meta) < 2:
            return
        written = json.dumps(meta, separators=(",", ":"), ensure_ascii=False)
        ordered = json.dumps(dict(sorted(meta.items())), separators=(",", ":"), ensure_ascii=False)
        at = text.find(f'"__metadata__":{written}')
        if at < 0 or len(written) != len(ordered):  # a header layout this function does not know: leave it
            return
        start = len(text[: at + len('"__metadata__":')].encode("utf-8"))
        f.seek(8 + start)
        f.write(ordered.encode("utf-8"))


@dataclass(frozen=True)
class ArtifactKey:
    """What an artifact is, from which the store alone decides its path: the stage that wrote it, what it holds
    (``kind``: masks, weights, baseline, ...), the pruning round and layer group, and a name within those."""

    stage: str
    kind: str
    round: int | None = None
    group: int | None = None
    name: str | None = None

    def relpath(self) -> str:
        """``artifacts/<kind>/[<stage>_][round000_][group000_][<name>].safetensors`` (Pruning's own: no stage)."""
        parts = [] if self.stage == "pruning" else [self.stage]
        if self.round is not None:
            parts.append(f"round{self.round:03d}")
        if self.group is not None:
            parts.append(f"group{self.group:03d}")
        if self.name:
            parts.append(self.name)
        return f"{ARTIFACTS}/{self.kind}/{'_'.join(parts)}.safetensors"


class RunLock:
    """Keeps a second process out of a run folder: an OS lock (``flock``) on ``run.lock``, which the kernel lets go
    when its holder dies, and in the file the holder's pid, host and start time for messages. A lock file whose
    OS lock is free is stale (its holder is gone) unless it names a live process on this host (a holder that does
    not take the OS lock): then the folder counts as locked too."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self.held = False
        self.took_over: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(3):
            fd = self._open()
            if not self._try_lock(fd):
                holder = self._read_holder(fd)
                os.close(fd)
                raise CheckpointError(self._locked_message(holder))
            if os.fstat(fd).st_ino != _inode(self.path):  # released and removed while we waited: take the new one
                os.close(fd)
                continue
            previous = self._read_holder(fd)
            if previous is not None and previous.get("pid") != os.getpid() and self._alive(previous):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                raise CheckpointError(self._locked_message(previous))
            # a lock file left by a holder that is gone: named in the log as taken over
            self.took_over = previous if previous is not None else (
                {"unreadable": True} if os.fstat(fd).st_size else None)
            self._write_holder(fd)
            self._fd, self.held = fd, True
            return
        raise CheckpointError(f"could not take the lock '{self.path}' (other processes race for it)")

    def release(self) -> None:
        if self.held and self._fd is not None:
            self.path.unlink(missing_ok=True)  # before letting go: a waiter then sees a new file (inode check)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd, self.held = None, False

    def holder_alive(self) -> str | None:
        """'pid P on host H since T' when a live process holds this run folder's lock (probes, takes nothing)."""
        if self.held or not self.path.is_file():
            return None if not self.held else f"pid {os.getpid()} (this process)"
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            holder = self._read_holder(fd)
            if self._try_lock(fd):
                fcntl.flock(fd, fcntl.LOCK_UN)
                if holder is None or not self._alive(holder):
                    return None
            return _describe(holder)
        finally:
            os.close(fd)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if self.path.is_symlink():
                raise CheckpointError(f"lock '{self.path}' is a symbolic link; a run folder holds plain files") from e
            raise CheckpointError(f"cannot create the lock '{self.path}': {e.strerror} (is the run folder "
                                  "read-only, or full?); choose a writable --run-dir") from e

    @staticmethod
    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    @staticmethod
    def _read_holder(fd: int) -> dict[str, Any] | None:
        try:
            data = os.pread(fd, 4096, 0)
            holder = json.loads(data.decode()) if data else None
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def _write_holder(fd: int) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)

    def _locked_message(self, holder: dict[str, Any] | None) -> str:
        return (f"run folder '{self.path.parent}' is locked by {_describe(holder)}; wait for it to end, or remove "
                f"'{self.path}' if that process is gone")

    @staticmethod
    def _alive(holder: Mapping[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # cannot see another host's processes: assume alive
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _describe(holder: Mapping[str, Any] | None) -> str:
    if not holder:
        return "a live process whose details cannot be read"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"


class RunStore:
    """Reads and writes one run folder. Only the main process writes (``is_main``)."""

    def __init__(self, run_dir: str | Path, *, is_main: bool = True, key: bytes | None = None) -> None:
        for part in Path(run_dir).parts:
            if len(os.fsencode(part)) > _NAME_MAX:
                raise CheckpointError(f"run folder '{run_dir}': the name '{part[:32]}…' is {len(os.fsencode(part))} "
                                      f"bytes long; a file system allows {_NAME_MAX} bytes per name: choose a shorter "
                                      "--run-dir")
        self.run_dir = Path(run_dir).resolve()
        self.is_main = is_main
        self.key = key  # PODAR_AUDIT_KEY: the manifest carries an HMAC under it
        self.lock = RunLock(self.run_dir)
        self.write_seconds = 0.0  # time spent writing artifacts and manifests (checkpoint cost)
        self.write_bytes = 0

    # ------------------------------------------------------------ paths
    @property
    def manifest_path(self) -> Path:
        return self.run_dir / MANIFEST

    @property
    def audit_path(self) -> Path:
        return self.run_dir / AUDIT

    @property
    def export_dir(self) -> Path:
        return self.run_dir / EXPORT

    def artifact_path(self, rel: str) -> Path:
        """The file of a path relative to the run folder; CheckpointError for a path that leaves the folder."""
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts:
            raise CheckpointError(f"artifact path '{rel}' is not a plain path inside the run folder '{self.run_dir}'")
        return self.run_dir / rel

    @property
    def dense_reference_dir(self) -> Path:
        return self.run_dir / DENSE_REFERENCE

    @property
    def scratch_dir(self) -> Path:
        """Where unrecorded scratch files live while they are written (each is unlinked once mapped)."""
        return self.run_dir

    def prepare(self) -> None:
        """Create the folder (and ``artifacts/``); CheckpointError naming the folder when it cannot be."""
        try:
            (self.run_dir / ARTIFACTS).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create the run folder '{self.run_dir}': {e.strerror}; choose a writable "
                                  "--run-dir") from e

    def foreign_entries(self) -> list[str]:
        """What the folder holds besides what a podar run leaves before its first checkpoint (its lock, dense
        reference parts, temporary files): a new run goes only into a folder where this is empty."""
        if not self.run_dir.is_dir():
            return []
        out = []
        for path in sorted(self.run_dir.rglob("*")):
            rel = path.relative_to(self.run_dir)
            if path.is_dir() and not path.is_symlink() and str(rel) in (ARTIFACTS, DENSE_REFERENCE):
                continue
            if rel.name.startswith(".") and rel.name.endswith(".tmp"):
                continue
            if str(rel) == LOCK or (str(rel.parent) == DENSE_REFERENCE and path.is_file() and not path.is_symlink()):
                continue
            out.append(str(rel))
        return out

    def unrecorded_files(self, manifest: RunManifest) -> list[str]:
        """Files in the folder that neither the manifest records nor the run keeps by name (relative paths)."""
        own = {MANIFEST, AUDIT, LOCK, "config.yaml", "report.json", "report.md"}
        out = []
        for path in sorted(self.run_dir.rglob("*")):
            rel = str(path.relative_to(self.run_dir))
            if path.is_file() and rel not in manifest.artifacts and rel not in own and not rel.startswith("plots/"):
                out.append(rel)
        return out

    # ------------------------------------------------------------ manifest
    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> RunManifest:
        if not self.has_manifest():
            raise CheckpointError(f"'{self.manifest_path}' does not exist: not a podar run folder")
        try:
            return RunManifest.model_validate_json(self.manifest_path.read_text())
        except ValueError as e:
            raise CheckpointError(f"'{self.manifest_path}' is not a valid run manifest: {e}") from e

    def write_manifest(self, manifest: RunManifest) -> None:
        if not self.is_main:
            return
        if self.key is not None:
            manifest.mac = None
            manifest.mac = manifest_mac(manifest, self.key)
        data = manifest.model_dump_json(indent=2).encode()
        started = time.perf_counter()
        atomic_write_bytes(self.manifest_path, data, fault_point="write:manifest")
        self.write_seconds += time.perf_counter() - started
        self.write_bytes += len(data)

    # ------------------------------------------------------------ artifacts
    def save_tensors(self, key: ArtifactKey, tensors: Mapping[str, torch.Tensor], *,
                     metadata: Mapping[str, str] | None = None) -> ArtifactRecord:
        """Write a safetensors artifact atomically where ``key`` says; returns its record (sha256, size)."""
        rel = key.relpath()
        path = self.artifact_path(rel)
        if not self.is_main:  # only the main process writes the run folder: the others note what it writes
            return ArtifactRecord(path=rel, sha256="", bytes=0, stage=key.stage, kind=key.kind, round=key.round,
                                  group=key.group)
        started = time.perf_counter()
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        with atomic_path(path) as tmp:
            save_file(contiguous, str(tmp), metadata=dict(metadata or {}))
            sort_safetensors_metadata(tmp)
        self.write_seconds += time.perf_counter() - started
        self.write_bytes += path.stat().st_size
        return self.record(rel, stage=key.stage, kind=key.kind, round=key.round, group=key.group)

    def record(self, rel: str, *, stage: str, kind: str, round: int | None = None, group: int | None = None
               ) -> ArtifactRecord:
        path = self.artifact_path(rel)
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"artifact '{rel}' was not written to '{path}' as a regular file")
        return ArtifactRecord(path=rel, sha256=sha256_file(path), bytes=path.stat().st_size, stage=stage, kind=kind,
                              round=round, group=group)

    def load_recorded(self, key: ArtifactKey, recorded: Mapping[str, ArtifactRecord]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str], ArtifactRecord] | None:
        """(tensors, metadata, record) of the artifact ``key`` names when ``recorded`` (a manifest's artifacts)
        holds it and its file still has the recorded sha256; None otherwise (never an unrecorded file)."""
        record = recorded.get(key.relpath())
        if record is None:
            return None
        path = self.artifact_path(record.path)
        if path.is_symlink() or not path.is_file() or sha256_file(path) != record.sha256:
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {}), record

    # ------------------------------------------------------------ export
    def begin_export(self) -> Path:
        """An empty staging folder beside ``export/``; ``finish_export`` moves it into place."""
        tmp = self.run_dir / ".export.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def finish_export(self, staging: Path, *, stage: str) -> list[ArtifactRecord]:
        """Replace ``export/`` by ``staging`` and return a record (sha256, size) of every file in it."""
        final = self.export_dir
        for path in staging.rglob("*"):  # readable by others, as every file of the run folder (save_file: 0600)
            os.chmod(path, 0o755 if path.is_dir() else _FILE_MODE)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        return [self.record(str(p.relative_to(self.run_dir)), stage=stage, kind="export")
                for p in sorted(final.rglob("*")) if p.is_file()]

    def load_tensors(self, record: ArtifactRecord, *, verify: bool = True) -> dict[str, torch.Tensor]:
        """Read a safetensors artifact, refusing it when missing or when its sha256 differs."""
        path = self.artifact_path(record.path)
        if not path.is_file():
            raise CheckpointError(f"artifact '{record.path}' is missing from '{self.run_dir}'")
        if verify:
            actual = sha256_file(path)
            if actual != record.sha256:
                raise CheckpointError(
                    f"artifact '{record.path}' has sha256 {actual[:16]}…, the manifest records "
                    f"{record.sha256[:16]}…: the file was changed or corrupted"
                )
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"artifact '{record.path}' cannot be read as safetensors: {e}") from e
