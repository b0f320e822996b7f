"""The decoded-image cache (fastdae.cache.images): bit-exact round trips, flips in the latent cache's
index space, and its identity rules (dataset, size, crop, corruption, resume)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastdae.cache import CacheError, LatentCache
from fastdae.cache.format import FlipView
from fastdae.cache.images import ImageCache, build_images, to_signed_unit
from fastdae.config import ConfigError, apply_overrides, preset
from fastdae.data import ImageFolder, ProceduralShapes, dataset_fingerprint
from tests.utils import build as build_latents
from tests.utils import content, encode_kl


def make_folder(root, n: int = 10, size: tuple[int, int] = (20, 14)) -> None:
    """n random RGB PNGs of size (W, H), not square, so resizing and cropping both matter."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:03d}.png")


def build(root, dataset, **kw) -> None:
    kw = {"batch_size": 4, "shard_size": 4, "progress": False, **kw}
    build_images(root, dataset, dataset_fingerprint=dataset_fingerprint(dataset), **kw)


def open_images(root, dataset, flip: bool = False) -> ImageCache:
    return ImageCache(root, dataset_fingerprint=dataset_fingerprint(dataset), flip=flip, image_size=dataset.image_size)


@pytest.fixture
def folder(tmp_path):
    make_folder(tmp_path / "imgs")
    return ImageFolder(tmp_path / "imgs", 12, cache_dir=tmp_path / "index")


@pytest.mark.parametrize("flip", [False, True])
def test_images_read_back_bit_for_bit_in_the_latent_cache_index_space(tmp_path, folder, flip):
    build(tmp_path / "images", folder)
    images = open_images(tmp_path / "images", folder, flip)
    view = FlipView(folder, flip)
    assert len(images) == len(view) == len(folder) * (2 if flip else 1)
    idx = list(range(len(view)))[::-1]  # every item, the flipped copies too, in a non-ascending order
    got, want = images.__getitems__(idx), view.__getitems__(idx)
    assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    # uint8=True (stage 2's read): the stored pixels, made the same floats by to_signed_unit
    fp = dataset_fingerprint(folder)
    raw = ImageCache(tmp_path / "images", dataset_fingerprint=fp, flip=flip, image_size=(12, 12), uint8=True)
    pixels = raw.__getitems__(idx)[0]
    assert pixels.dtype == torch.uint8 and torch.equal(to_signed_unit(pixels), want[0])
    # only n images are stored, whatever the flip
    assert LatentCache(tmp_path / "images").manifest["count"] == len(folder)


def test_procedural_images_round_trip_and_float_images_are_refused(tmp_path):
    shapes = ProceduralShapes(12, 16, seed=3)
    build(tmp_path / "shapes", shapes)
    got = open_images(tmp_path / "shapes", shapes).__getitems__(list(range(12)))[0]
    assert torch.equal(got, torch.stack([shapes[i][0] for i in range(12)]))

    class Blurred(torch.utils.data.Dataset):  # float images between the 8-bit levels
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((3, 4, 4), 0.001 * (i + 1)), torch.tensor(0)

    with pytest.raises(ValueError, match="8-bit images"):
        build_images(tmp_path / "blur", Blurred(), dataset_fingerprint="x", progress=False)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(dict(size=10), id="size"),
        pytest.param(dict(resize=False), id="crop-without-resize"),
        pytest.param(dict(crop="random"), id="crop"),
    ],
)
def test_other_size_or_crop_settings_invalidate_the_cache(tmp_path, folder, other):
    build(tmp_path / "images", folder)
    changed = ImageFolder(folder.root, **{"size": 12, "cache_dir": tmp_path / "index", **other})
    with pytest.raises(CacheError, match="dataset_fingerprint"):
        open_images(tmp_path / "images", changed)


def test_a_changed_dataset_invalidates_the_cache(tmp_path, folder):
    build(tmp_path / "images", folder)
    path = folder.path(3)
    Image.fromarray(np.zeros((14, 20, 3), dtype=np.uint8)).save(path)  # one file rewritten
    changed = ImageFolder(folder.root, 12, cache_dir=tmp_path / "index")
    with pytest.raises(CacheError, match="dataset_fingerprint"):
        open_images(tmp_path / "images", changed)


def test_the_image_size_and_the_kind_of_cache_are_checked(tmp_path, folder):
    build(tmp_path / "images", folder)
    fp = dataset_fingerprint(folder)
    with pytest.raises(CacheError, match=r"expected \{'image': \[3, 8, 8\]"):
        ImageCache(tmp_path / "images", dataset_fingerprint=fp, flip=False, image_size=(8, 8))
    # a latent cache of the same dataset is not an image cache
    LatentCache.build(
        tmp_path / "latents",
        folder,
        lambda x: ({"mean": x[:, :, ::4, ::4]}, x[:, :, ::4, ::4]),
        encoder_sha256="enc",
        dataset_fingerprint=fp,
        progress=False,
    )
    with pytest.raises(CacheError, match="is not an image cache"):
        ImageCache(tmp_path / "latents", dataset_fingerprint=fp, flip=False, image_size=folder.image_size)


def test_a_corrupted_shard_is_caught_before_its_images_are_read_and_rebuilt(tmp_path, folder):
    root = tmp_path / "images"
    build(root, folder)
    manifest = json.loads((root / "manifest.json").read_text())
    first, second = (root / s["file"] for s in manifest["shards"][:2])
    data = bytearray(second.read_bytes())
    data[-1] ^= 0xFF  # the shard's last byte
    second.write_bytes(bytes(data))
    images = open_images(root, folder)  # sizes are checked on open; sha256 on a shard's first read
    images.__getitems__([0])
    with pytest.raises(CacheError, match=f"{second.name} is corrupted"):
        images.__getitems__([4])
    # building again keeps the sound shards and writes the corrupted one anew
    before = os.stat(first).st_ino, os.stat(second).st_ino
    build(root, folder)
    assert os.stat(first).st_ino == before[0] and os.stat(second).st_ino != before[1]
    rebuilt = json.loads((root / "manifest.json").read_text())["build"]
    assert (rebuilt["reused_shards"], rebuilt["encoded"]) == (2, 4)
    assert torch.equal(open_images(root, folder).__getitems__([4])[0], folder[4][0][None])


def test_an_interrupted_build_resumes_from_its_complete_shards(tmp_path, folder):
    root = tmp_path / "images"
    build(root, folder)
    (root / "manifest.json").unlink()  # killed before rank 0 wrote the manifest ...
    last = json.loads((root / f"{sorted(p.name for p in root.glob('shard-*.safetensors'))[-1]}.json").read_text())
    (root / last["file"]).unlink()  # ... and before the last shard was written
    with pytest.raises(CacheError, match="does not exist"):
        open_images(root, folder)
    build(root, folder)
    done = json.loads((root / "manifest.json").read_text())["build"]
    assert (done["reused_shards"], done["encoded"]) == (2, len(folder) - 8)
    assert torch.equal(open_images(root, folder).__getitems__([9])[0], folder[9][0][None])


def test_the_paired_loader_gives_the_same_batches_from_the_image_cache(tmp_path, folder):
    def encode(x):
        return {"mean": x[:, :, ::4, ::4]}, x[:, :, ::4, ::4]

    fp = dataset_fingerprint(folder)
    latents = LatentCache.build(
        tmp_path / "latents", folder, encode, encoder_sha256="e", dataset_fingerprint=fp, flip=True, progress=False
    )
    build(tmp_path / "images", folder)
    cached = open_images(tmp_path / "images", folder, flip=True)
    batches = [list(latents.paired_loader(source, 4, seed=1)) for source in (folder, cached)]
    assert len(batches[0]) == len(batches[1]) == 5
    for (fa, xa), (fb, xb) in zip(*batches, strict=True):
        assert torch.equal(fa["mean"], fb["mean"]) and torch.equal(xa, xb)
    with pytest.raises(ValueError, match="does not match latent cache"):
        latents.paired_loader(open_images(tmp_path / "images", folder, flip=False), 4)


@pytest.mark.parametrize("flip", [False, True])
def test_latents_encoded_from_the_image_cache_are_byte_identical_to_those_from_the_dataset(tmp_path, folder, flip):
    build(tmp_path / "images", folder)  # shards of 4 images: the latent shards of 6 below straddle them
    cached = open_images(tmp_path / "images", folder, flip)
    kw = {"shard_size": 6, "batch_size": 4, "flip": flip, "dataset_fingerprint": dataset_fingerprint(folder)}
    roots = [tmp_path / "from-dataset", tmp_path / "from-images"]
    for root, source in zip(roots, (folder, cached), strict=True):
        build_latents(root, source, encode_kl, **kw)
    a, b = ({p.name: p.read_bytes() for p in root.glob("shard-*")} for root in roots)  # shards and sidecars
    assert len(a) == 2 * math.ceil(len(folder) * (2 if flip else 1) / 6) and a == b
    manifests = [json.loads((root / "manifest.json").read_text()) for root in roots]
    assert manifests[0]["dataset_len"] == len(folder) and content(manifests[0]) == content(manifests[1])
    # images of the other flip are refused, not encoded as another index space
    with pytest.raises(ValueError, match="flip"):
        build_latents(tmp_path / "other", cached, encode_kl, **{**kw, "flip": not flip})


def test_cache_images_is_refused_for_random_crops_and_flips():
    for data in ("data.crop=random", "data.flip=true"):
        with pytest.raises(ConfigError, match="cache.images stores one draw"):
            apply_overrides(preset("tiny"), ["data.name=folder", "data.root=/x", data, "cache.images=true"])
    assert apply_overrides(preset("tiny"), ["cache.images=true"]).cache.images


def _verify_split(rank: int, init: str, root: str, fp: str, size: tuple[int, int], out) -> None:
    from fastdae import files

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    hashed = []
    sha256_file = files.sha256_file
    files.sha256_file = lambda path: hashed.append(os.path.basename(path)) or sha256_file(path)
    try:
        images = ImageCache(root, dataset_fingerprint=fp, flip=False, image_size=size)
        images.verify_split()
        images.__getitems__(list(range(len(images))))  # every shard read: nothing hashed again
        out.put((rank, sorted(hashed), None))
    except CacheError as e:
        out.put((rank, sorted(hashed), str(e)))
    finally:
        torch.distributed.destroy_process_group()


def _run_split(tmp_path, folder, name: str) -> list[tuple[int, list[str], str | None]]:
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    args = (str(tmp_path / "images"), dataset_fingerprint(folder), folder.image_size, out)
    procs = [ctx.Process(target=_verify_split, args=(r, f"file://{tmp_path / name}", *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    return sorted(out.get(timeout=5) for _ in range(2))


def test_ranks_split_the_shard_checks_and_all_stop_at_a_bad_shard(tmp_path, folder):
    build(tmp_path / "images", folder)  # 10 images, 3 shards
    shards = sorted(p.name for p in (tmp_path / "images").glob("shard-*.safetensors"))
    (r0, hashed0, err0), (r1, hashed1, err1) = _run_split(tmp_path, folder, "store1")
    assert (err0, err1) == (None, None)
    assert hashed0 == [shards[0], shards[2]] and hashed1 == [shards[1]]  # each shard hashed once in all

    data = bytearray((tmp_path / "images" / shards[1]).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "images" / shards[1]).write_bytes(bytes(data))
    results = _run_split(tmp_path, folder, "store2")
    assert [f"{shards[1]} is corrupted" in err for _, _, err in results] == [True, True]
