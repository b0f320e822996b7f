"""Datasets: procedural determinism, balance and ground truth; folder and array loading with every error."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastdae.data import (ArrayDataset, DataConfig, ImageFolder, ProceduralShapes, build_dataset,
                          dataset_fingerprint)


# ---------------------------------------------------------------------------------------------
# Procedural shapes
# ---------------------------------------------------------------------------------------------
def test_shapes_items_depend_only_on_seed_and_index():
    ds = ProceduralShapes(64, size=32, seed=3)
    order = [17, 3, 63, 0, 40]
    batch, labels = ds.images(order)
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.float32 and labels.dtype == torch.int64
    assert batch.min() >= -1 and batch.max() <= 1
    reversed_batch, _ = ds.images(order[::-1])
    other = ProceduralShapes(1000, size=32, seed=3)  # another length: items do not depend on it either
    for k, i in enumerate(order):
        image, label = ds[i]
        assert torch.equal(image, batch[k]) and torch.equal(image, reversed_batch[-1 - k])
        assert torch.equal(image, other[i][0]) and int(label) == int(labels[k])
    assert not torch.equal(ds[0][0], ds[1][0])
    assert not torch.equal(ds[0][0], ProceduralShapes(64, size=32, seed=4)[0][0])
    with pytest.raises(IndexError):
        ds[64]


def test_shapes_classes_are_balanced():
    n = 4000
    _, labels = ProceduralShapes(n, size=8).images(np.arange(n))
    counts = torch.bincount(labels, minlength=ProceduralShapes.num_classes)
    expected = n / ProceduralShapes.num_classes
    # binomial std is sqrt(n p (1 - p)) ~ 27 here; 5 std of slack
    assert ((counts - expected).abs() < 5 * (n * 0.25 * 0.75) ** 0.5).all(), counts


def test_shapes_describe_matches_the_rendering():
    ds = ProceduralShapes(50, size=32, seed=1)
    counts = set()
    for i in range(len(ds)):
        d = ds.describe(i)
        image, label = ds[i]
        assert d["label"] == int(label) == d["shapes"][0]["label"]
        assert d["shapes"][0]["type"] == ProceduralShapes.classes[d["label"]]
        counts.add(len(d["shapes"]))
        for s in d["shapes"]:
            (x, y), r = s["center"], s["radius"]
            assert r <= x <= 32 - r and r <= y <= 32 - r, "every shape lies inside the image"
        assert all(s["radius"] < d["shapes"][0]["radius"] for s in d["shapes"][1:])
        # the top (labelled) shape covers the pixel at its centre with its exact colour
        (x, y) = d["shapes"][0]["center"]
        pixel = (image[:, int(y), int(x)] + 1) * 127.5
        assert torch.allclose(pixel, torch.tensor(d["shapes"][0]["color"]) * 255, atol=1.0)
        corner = (image[:, 0, 0] + 1) * 127.5  # corners are background unless a shape reaches them
        if not any(np.hypot(s["center"][0], s["center"][1]) < 1.5 * s["radius"] + 1 for s in d["shapes"]):
            assert torch.allclose(corner, torch.tensor(d["background"]) * 255, atol=1.0)
    assert counts == {1, 2, 3}


def test_fingerprint_tracks_identity_and_content():
    fp = dataset_fingerprint(ProceduralShapes(20, seed=0))
    assert fp == dataset_fingerprint(ProceduralShapes(20, seed=0)) and len(fp) == 64
    assert fp != dataset_fingerprint(ProceduralShapes(20, seed=1))
    assert fp != dataset_fingerprint(ProceduralShapes(21, seed=0))


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------
def _png(path, h=8, w=8, seed=0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def test_image_folder_with_classes(tmp_path):
    a = _png(tmp_path / "cats" / "a.png", seed=1)
    b = _png(tmp_path / "dogs" / "sub" / "b.PNG", seed=2)
    Image.fromarray(a).save(tmp_path / "dogs" / "c.jpg", quality=95)
    Image.fromarray(a).convert("L").save(tmp_path / "cats" / "gray.png")  # converted to RGB
    ds = ImageFolder(tmp_path, size=8)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 4
    labels = {p.name: int(ds[k][1]) for k, p in enumerate(ds.files)}
    assert labels == {"a.png": 0, "gray.png": 0, "c.jpg": 1, "b.PNG": 1}
    image = ds[[p.name for p in ds.files].index("b.PNG")][0]
    assert image.shape == (3, 8, 8) and torch.equal(image, torch.from_numpy(b).permute(2, 0, 1).float() / 127.5 - 1)
    gray = ds[[p.name for p in ds.files].index("gray.png")][0]
    assert torch.equal(gray[0], gray[1])


def test_image_folder_flat_and_resize(tmp_path):
    _png(tmp_path / "x.png", h=10, w=20)
    _png(tmp_path / "y.png", h=16, w=12)
    ds = ImageFolder(tmp_path, size=8, resize=True)
    assert ds.classes == [] and [int(ds[i][1]) for i in range(2)] == [0, 0]
    assert all(ds[i][0].shape == (3, 8, 8) for i in range(2))
    assert ds[0][0].min() >= -1 and ds[0][0].max() <= 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="contains no"):
        ImageFolder(tmp_path / "empty")

    bad = tmp_path / "bad"
    _png(bad / "ok.png")
    (bad / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolder(bad)

    mixed = tmp_path / "mixed"
    _png(mixed / "a.png", 8, 8)
    _png(mixed / "b.png", 8, 9)
    with pytest.raises(ValueError, match=r"b\.png.*resize=True"):
        ImageFolder(mixed)
    with pytest.raises(ValueError, match=r"b\.png"):
        ImageFolder(mixed, size=8)
    with pytest.raises(ValueError, match="a.png"):
        ImageFolder(mixed, size=16)
    with pytest.raises(ValueError, match="resize=True needs"):
        ImageFolder(mixed, resize=True)

    layout = tmp_path / "layout"
    _png(layout / "top.png")
    _png(layout / "cls" / "a.png")
    with pytest.raises(ValueError, match="top.png"):
        ImageFolder(layout)

    late = tmp_path / "late"
    _png(late / "a.png")
    ds = ImageFolder(late)
    (late / "a.png").write_bytes((late / "a.png").read_bytes()[:60])  # truncated after the header was read
    with pytest.raises(ValueError, match="a.png"):
        ds[0]


# ---------------------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------------------
def test_array_dataset_sources(tmp_path):
    hwc = np.random.default_rng(0).integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", hwc)
    labels = np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "a.npz", images=hwc, labels=labels)
    expected = torch.from_numpy(hwc).permute(0, 3, 1, 2).float() / 127.5 - 1
    for ds in (ArrayDataset(tmp_path / "a.npy"), ArrayDataset(str(tmp_path / "a.npz")), ArrayDataset(hwc, labels)):
        assert len(ds) == 5 and ds.image_size == (6, 7)
        assert torch.equal(ds[3][0], expected[3])
    assert int(ArrayDataset(tmp_path / "a.npz")[2][1]) == 2 and int(ArrayDataset(tmp_path / "a.npy")[2][1]) == 0
    assert int(ArrayDataset(tmp_path / "a.npz", labels=labels[::-1].copy())[0][1]) == 0

    chw = torch.rand(4, 3, 5, 5) * 2 - 1
    ds = ArrayDataset(chw)
    assert ds.image_size == (5, 5) and torch.equal(ds[1][0], chw[1])


def test_array_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        ArrayDataset(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ArrayDataset(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ArrayDataset(np.full((2, 3, 4, 4), 255.0, np.float32))
    with pytest.raises(TypeError, match="int32"):
        ArrayDataset(np.zeros((2, 4, 4, 3), np.int32))
    with pytest.raises(ValueError, match="non-empty 4-d"):
        ArrayDataset(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(3, np.int64))
    np.savez(tmp_path / "x.npz", pictures=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="'images'.*pictures"):
        ArrayDataset(tmp_path / "x.npz")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match=".npy or .npz"):
        ArrayDataset(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        ArrayDataset(tmp_path / "nope.npy")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def test_build_dataset(tmp_path):
    ds = build_dataset(DataConfig(num_samples=10, size=16, seed=2))
    assert isinstance(ds, ProceduralShapes) and len(ds) == 10 and ds[0][0].shape == (3, 16, 16)
    _png(tmp_path / "imgs" / "a.png", 16, 16)
    assert len(build_dataset(DataConfig(name="folder", root=str(tmp_path / "imgs"), size=16))) == 1
    np.save(tmp_path / "a.npy", np.zeros((3, 16, 16, 3), np.uint8))
    assert len(build_dataset(DataConfig(name="array", root=str(tmp_path / "a.npy"), size=16))) == 3
    with pytest.raises(ValueError, match="DataConfig.size is 32"):
        build_dataset(DataConfig(name="array", root=str(tmp_path / "a.npy")))
    with pytest.raises(ValueError, match="name must be one of"):
        DataConfig(name="imagenet")
    with pytest.raises(ValueError, match="root is required"):
        DataConfig(name="folder")
