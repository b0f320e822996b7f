"""fastdae.data.folder: 16-bit greyscale PNGs are scaled to 8 bits, not clipped to white;
an unreadable image is an ImageFileError naming the file; a file gone since the index was read is
named too."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastdae.data import ImageFolder
from fastdae.data.folder import ImageFileError, read_rgb8


@pytest.fixture(autouse=True)
def index_cache(tmp_path_factory, monkeypatch):
    """Folder indexes go to a per-test directory, not ~/.cache."""
    path = tmp_path_factory.mktemp("index")
    monkeypatch.setenv("FASTDAE_INDEX_DIR", str(path))
    return path


def test_sixteen_bit_grey_pngs_load_scaled_not_clipped_to_white(tmp_path):
    wide = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(wide).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # Pillow opens it as 16/32-bit integers
    want = np.rint(wide / 257.0).astype(np.uint8)
    assert np.array_equal(read_rgb8(tmp_path / "deep.png"), np.repeat(want[..., None], 3, axis=-1))
    image, _ = ImageFolder(tmp_path, size=8)[0]
    expected = torch.from_numpy(want).float() / 127.5 - 1
    assert torch.equal(image[0], expected) and float(image.mean()) < 0.1  # not near-white (+1)


def test_an_unreadable_image_is_an_image_file_error_naming_the_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = ImageFolder(tmp_path, size=8)
    with pytest.raises(ImageFileError, match=r"cannot read image file .*broken\.png"):
        ds[0]
    if os.geteuid() != 0:  # root reads any file
        (tmp_path / "broken.png").unlink()
        Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
        (tmp_path / "secret.png").chmod(0)
        with pytest.raises(ImageFileError, match=r"secret\.png.*Permission denied"):
            ImageFolder(tmp_path, size=8)[1]


def test_an_image_removed_under_a_cached_index_is_named_not_a_traceback(tmp_path, monkeypatch):
    for k in range(3):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(tmp_path / f"{k}.png")
    ds = ImageFolder(tmp_path, size=8)
    (tmp_path / "1.png").unlink()  # between the index and the fingerprint
    with pytest.raises(ImageFileError, match=r"changed while it was read: 1\.png"):
        ds.identity()
