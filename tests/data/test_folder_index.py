"""fastdae.data.folder_index: a cached index is not reused when an image was added or removed
and the directory's mtime set back afterwards (tar, rsync -t, touch -d): the ctime still moved."""

from __future__ import annotations

import os
import time

import pytest
from PIL import Image

from fastdae.data import ImageFolder


@pytest.fixture(autouse=True)
def index_cache(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.mktemp("index")
    monkeypatch.setenv("FASTDAE_INDEX_DIR", str(path))
    return path


def _aged_folder(root, n: int) -> None:
    """n images in root, the folder's mtime 10 s in the past (a scan of it is cached)."""
    root.mkdir()
    for k in range(n):
        Image.new("RGB", (8, 8), (10 * k, 0, 0)).save(root / f"{k}.png")
    past = time.time() - 10
    os.utime(root, (past, past))


def _restore_mtime(root, st: os.stat_result) -> None:
    os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(root).st_mtime_ns == st.st_mtime_ns


def test_an_image_added_or_removed_with_the_mtime_restored_is_seen(tmp_path, index_cache):
    root = tmp_path / "data"
    _aged_folder(root, 3)
    assert len(ImageFolder(root, size=8)) == 3 and len(list(index_cache.glob("*.npz"))) == 1  # cached
    st = os.stat(root)
    Image.new("RGB", (8, 8)).save(root / "3.png")
    _restore_mtime(root, st)
    assert len(ImageFolder(root, size=8)) == 4
    time.sleep(0.01)
    st = os.stat(root)
    (root / "0.png").unlink()
    _restore_mtime(root, st)
    ds = ImageFolder(root, size=8)
    assert [ds.path(i).name for i in range(len(ds))] == ["1.png", "2.png", "3.png"]
    assert ds.identity()["files"] and ds[0][0].shape == (3, 8, 8)  # no stale name left to stat or open
