"""Small file helpers shared by the trainer, the latent cache and the exports: atomic writes (temp
name in the same folder, fsync, rename; the temp is removed on any failure, ENOSPC included), JSON
objects read back, sha256 of files, an exclusive lock file (flock) and this process's torch.distributed rank."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

_HASH_CHUNK = 1 << 20
_LOCK_POLL_S = 0.2  # how often a waiter retries a held lock


def temp_name(path: Path) -> Path:
    """`.name.tmp<pid>` next to path: hidden, unique per process, same filesystem (so rename is atomic)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove(path: Path) -> None:
    """Remove a file or a folder tree (nothing if absent)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path (file or folder) to write; on success it replaces `path` in one rename, on
    any exception it is removed and the exception propagates. Readers see the old or the new `path`."""
    path = Path(path)
    tmp = temp_name(path)
    remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            fsync_file(tmp)
        elif path.is_dir():  # os.replace onto a non-empty folder fails: the old one goes first
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())


def read_json_object(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in a file fastdae wrote; None when it is absent or unreadable, or is no longer
    one (edited: bad JSON or UTF-8, nesting deep enough for a RecursionError, another type)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def exclusive_lock(
    path: Path, busy: Callable[[str], str], timeout: float = 0.0, error: type[Exception] = FileExistsError
) -> Iterator[None]:
    """Hold an flock on the file `path` (created, holding this pid, removed on exit): the OS releases it
    when its holder dies, so a killed holder never blocks the next one. Held by another process for
    longer than `timeout` seconds (0: at once): error(busy(the holder's pid, "" when it wrote none))."""
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock_by(fd, deadline)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise error(busy(pid)) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else the holder removed the file as we opened it: lock the new one
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiter then opens (and locks) a new file
        os.close(fd)


def _flock_by(fd: int, deadline: float) -> None:
    """An exclusive flock on fd, polled until `deadline` (time.monotonic); BlockingIOError after it."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(_LOCK_POLL_S)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, (0, 1) outside it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
