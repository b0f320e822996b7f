"""The folder index: the images under a root in compact arrays, cached under ~/.cache/fastdae/index
(never in the data folder) and reused while the folder's fingerprint holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastdae.data.config import IMAGE_SUFFIXES, DataError


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------
class ImageFileError(DataError):
    """An image file or folder that cannot be read or used (the message names it): a file error of the
    user's data, which the command line reports in one line, not a bug."""


class ImageFileTypeError(ImageFileError, TypeError):
    """Images of a type fastdae does not read (e.g. int32 arrays): a TypeError too, for callers that catch that."""


INDEX_VERSION = 2  # bump when the index file's layout changes (2: directory ctimes too)
STAT_CHUNK = 1 << 16  # files stat'ed per chunk of offsets when fingerprinting a folder
RACY_SECONDS = 2.0  # a directory changed this recently may change again within its mtime's tick


def index_dir() -> Path:
    """Where folder indexes are cached: $FASTDAE_INDEX_DIR, else ~/.cache/fastdae/index (never the data folder)."""
    return Path(os.environ.get("FASTDAE_INDEX_DIR", Path.home() / ".cache" / "fastdae" / "index"))


@dataclass
class FolderIndex:
    """The images under a root, in compact arrays (no Python object per image):
    names: utf-8 relative paths concatenated, uint8 (total bytes,); offsets: int64 (N + 1,), name i
    is names[offsets[i]:offsets[i + 1]]; labels: int32 (N,); classes: the class folder names;
    dirs / dir_mtimes / dir_ctimes: every directory walked (relative, "" is the root), its st_mtime_ns
    and st_ctime_ns, which decide whether a cached index still describes the tree."""

    names: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    classes: list[str]
    dirs: list[str]
    dir_mtimes: np.ndarray
    dir_ctimes: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return self.names[self.offsets[i] : self.offsets[i + 1]].tobytes().decode()

    @classmethod
    def scan(cls, root: Path) -> FolderIndex:
        """Walks root with os.scandir (no stat per file, no image opened): a directory's images in sorted
        name order, then its subdirectories in sorted order, depth first; names starting with "." are
        skipped and symlinked directories are not followed."""
        names, offsets, labels = bytearray(), array("q", [0]), array("i")  # compact while building too
        classes: list[str] = []
        top_file = None  # the first image directly in root, if any
        dirs, mtimes, ctimes = [], [], []
        stack = [""]
        while stack:
            rel = stack.pop()
            dirs.append(rel)
            try:
                st = os.stat(root / rel)
                with os.scandir(root / rel) as it:
                    entries = sorted(
                        (e.name, e.is_dir(follow_symlinks=False)) for e in it if not e.name.startswith(".")
                    )
            except OSError as e:
                raise ImageFileError(f"image folder {root}: cannot list {root / rel}: {e.strerror or e}") from None
            mtimes.append(st.st_mtime_ns)
            ctimes.append(st.st_ctime_ns)
            subdirs = []
            for name, is_dir in entries:
                path = f"{rel}/{name}" if rel else name
                if is_dir:
                    subdirs.append(path)
                    continue
                if not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                if not rel:
                    top_file = top_file or name
                else:  # a class folder's subtree is walked in one piece, so its files are contiguous
                    top = rel.split("/", 1)[0]
                    if top_file is not None:
                        raise ImageFileError(
                            f"image folder {root} mixes images at the top level ({top_file}) with "
                            f"class subfolders ({top}/); use one layout"
                        )
                    if not classes or classes[-1] != top:
                        classes.append(top)
                names += path.encode()
                offsets.append(len(names))
                labels.append(len(classes) - 1 if rel else 0)
            stack.extend(reversed(subdirs))
        if not labels:
            raise ImageFileError(f"image folder {root} contains no {'/'.join(IMAGE_SUFFIXES)} files")
        return cls(
            np.frombuffer(bytes(names), dtype=np.uint8),
            np.frombuffer(offsets, dtype=np.int64),
            np.frombuffer(labels, dtype=np.int32),
            classes,
            dirs,
            np.asarray(mtimes, dtype=np.int64),
            np.asarray(ctimes, dtype=np.int64),
        )

    def is_current(self, root: Path) -> bool:
        """True while every walked directory keeps its mtime and ctime: adding, removing or renaming an
        entry changes its directory's mtime (POSIX), so the names and labels here are still the tree's.
        The ctime is what catches an mtime set back afterwards (os.utime, touch -d, rsync -t, tar x):
        the kernel sets ctime to now on every such change, and no system call sets it back."""
        try:
            for d, m, c in zip(self.dirs, self.dir_mtimes.tolist(), self.dir_ctimes.tolist(), strict=True):
                st = os.stat(root / d)
                if (st.st_mtime_ns, st.st_ctime_ns) != (m, c):
                    return False
        except (OSError, ValueError):  # ValueError: an index file whose arrays disagree in length
            return False
        return True

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:  # np.savez would add .npz to a name without it
                np.savez(
                    f,
                    names=self.names,
                    offsets=self.offsets,
                    labels=self.labels,
                    dir_mtimes=self.dir_mtimes,
                    dir_ctimes=self.dir_ctimes,
                    meta=np.frombuffer(
                        json.dumps({"version": INDEX_VERSION, "classes": self.classes, "dirs": self.dirs}).encode(),
                        dtype=np.uint8,
                    ),
                )
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old index or the new one
        finally:
            tmp.unlink(missing_ok=True)  # after a failed write (e.g. a full disk); gone after os.replace

    @classmethod
    def load(cls, path: Path) -> FolderIndex | None:
        """The index saved at path, or None when it is absent, unreadable or of another version."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                if meta.get("version") != INDEX_VERSION:
                    return None
                return cls(
                    z["names"],
                    z["offsets"],
                    z["labels"],
                    meta["classes"],
                    meta["dirs"],
                    z["dir_mtimes"],
                    z["dir_ctimes"],
                )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # JSONDecodeError is a ValueError
            return None

    @classmethod
    def cached(cls, root: Path, cache_dir: Path | None = None) -> FolderIndex:
        """The index of root: from the cache when every directory is unchanged, else scanned and saved.
        The cache file is named by the root's absolute path; a scan whose directories changed within
        RACY_SECONDS is not saved, since a later change in the same mtime tick would go unseen."""
        root = root.resolve()
        path = (cache_dir or index_dir()) / f"{hashlib.sha256(str(root).encode()).hexdigest()[:32]}.npz"
        index = cls.load(path)
        if index is not None and index.is_current(root):
            return index
        started = time.time_ns()
        index = cls.scan(root)
        if int(index.dir_mtimes.max()) < started - int(RACY_SECONDS * 1e9):
            try:
                index.save(path)
            except OSError:  # a read-only home: the index still works, it is just not cached
                pass
        return index
