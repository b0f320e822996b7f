"""fastdae.fid / `python -m fastdae fid`: folders, ADM .npz and pytorch-fid statistics files as sides,
the statistics cache, and the refusal to run without local weights. The Inception network is
FIDInceptionV3 with random (Kaiming) weights saved in pytorch-fid's key layout: nothing downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastdae
from fastdae.cli import main
from fastdae.measure import frechet_distance, gaussian_stats
from fastdae.measure.fid import statistics
from fastdae.models.inception import FIDInceptionV3

pytestmark = pytest.mark.usefixtures("one_thread")
N = 3  # images per set: every image costs one 299x299 Inception pass on the CPU


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """A random FIDInceptionV3 in pytorch-fid's pt_inception layout (with the 1008-way fc layer, no
    num_batches_tracked). Kaiming-normal convolutions keep the features O(1): PyTorch's default
    init shrinks them to ~1e-8 over 90 layers, where every FID would read 0."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048), torch.zeros(1008)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-random.pth"
    torch.save(state, path)
    return path


def images(seed: int, n: int = N, size: tuple[int, int] = (16, 16), bright: float = 0.0) -> np.ndarray:
    """(n, H, W, 3) uint8: smooth random colour fields (upsampled 4x4 noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear")
    return ((x * (1 - bright) + bright) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_folder(folder: Path, arr: np.ndarray, ext: str = "png") -> Path:
    folder.mkdir(parents=True)
    for i, im in enumerate(arr):
        Image.fromarray(im).save(folder / f"{i:03d}.{ext}")
    return folder


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path | np.ndarray]:
    root = tmp_path_factory.mktemp("sets")
    a, b = images(1), images(2, bright=0.5)
    np.savez(root / "a.npz", arr_0=a)
    np.savez(root / "b.npz", arr_0=b, arr_1=np.arange(N))  # ADM samples carry labels as arr_1
    return {"a": a, "a_npz": root / "a.npz", "a_dir": write_folder(root / "a", a), "b_npz": root / "b.npz"}


def test_statistics_are_those_of_the_network_on_images_in_minus_one_one(sets, inception_file):
    got = statistics(sets["a_npz"], inception_file, batch_size=3, num_workers=0)
    net = FIDInceptionV3.from_file(inception_file)
    x = torch.from_numpy(sets["a"]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
    mu, sigma = gaussian_stats(net(x))
    torch.testing.assert_close(got[0], mu, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], sigma, rtol=1e-5, atol=1e-9)


def test_folder_and_npz_of_the_same_images_give_fid_zero(sets, inception_file):
    assert fastdae.fid(sets["a_dir"], sets["a_npz"], inception_file, batch_size=2, num_workers=0) < 1e-6


def test_fid_is_symmetric_positive_and_the_cache_is_reused(sets, inception_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ab = fastdae.fid(sets["a_npz"], sets["b_npz"], inception_file, stats_cache=cache, num_workers=0)
    assert ab > 1e-3  # the two sets differ in brightness: the features see it
    assert len(list(cache.glob("*.npz"))) == 2

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran although both statistics were cached")

    monkeypatch.setattr(FIDInceptionV3, "forward", no_network)
    ba = fastdae.fid(sets["b_npz"], sets["a_npz"], inception_file, stats_cache=cache, num_workers=0)
    assert ba == pytest.approx(ab, rel=1e-6)  # the eigensolver is not exactly symmetric
    # a cached file is a pytorch-fid statistics file: it is itself a valid side, needing no weights
    stats_a, stats_b = sorted(cache.glob("*.npz"))
    assert fastdae.fid(stats_a, stats_b) == pytest.approx(ab, rel=1e-6)


def test_a_changed_file_misses_the_cache(sets, inception_file, tmp_path):
    folder = write_folder(tmp_path / "a", sets["a"])
    cache = tmp_path / "cache"
    before = statistics(folder, inception_file, stats_cache=cache, num_workers=0)
    Image.fromarray(images(3, n=1)[0]).save(folder / "000.png")  # new content, new mtime
    st = os.stat(folder / "000.png")
    os.utime(folder / "000.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = statistics(folder, inception_file, stats_cache=cache, num_workers=0)
    assert len(list(cache.glob("*.npz"))) == 2
    assert not torch.equal(before[0], after[0])


def test_images_of_different_sizes_are_each_resized(inception_file, tmp_path):
    small, wide = images(4, n=1)[0], images(5, n=1, size=(12, 20))[0]
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(small).save(folder / "a.png")
    Image.fromarray(wide).save(folder / "b.webp", lossless=True)  # webp counts as an image too
    got = statistics(folder, inception_file, num_workers=0)
    net = FIDInceptionV3.from_file(inception_file)
    feats = torch.cat([net(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 127.5 - 1) for im in (small, wide)])
    torch.testing.assert_close(got[0], gaussian_stats(feats)[0], rtol=1e-5, atol=1e-7)


def test_no_weights_is_a_clear_error_and_nothing_is_downloaded(sets):
    with pytest.raises(ValueError, match="--inception"):
        fastdae.fid(sets["a_npz"], sets["b_npz"])


def test_bad_inputs_are_named(tmp_path, inception_file):
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        statistics(tmp_path / "nchw.npz", inception_file)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="neither statistics"):
        statistics(tmp_path / "other.npz", inception_file)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        statistics(tmp_path / "empty", inception_file)


def test_cli_prints_the_fid_of_two_statistics_files(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(50, 8, generator=g, dtype=torch.float64) + shift for shift in (0.0, 1.0)]
    for name, f in zip("ab", feats, strict=True):
        mu, sigma = gaussian_stats(f)
        np.savez_compressed(tmp_path / f"{name}.npz", mu=mu.numpy(), sigma=sigma.numpy())  # as pytorch-fid saves
    assert main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 0
    printed = float(capsys.readouterr().out.split("FID:")[1])
    assert printed == pytest.approx(frechet_distance(*map(gaussian_stats, feats)), abs=1e-4)
    write_folder(tmp_path / "images", images(0, n=2))
    assert main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "images")]) == 2  # images need the network
    assert "--inception" in capsys.readouterr().err


# ---- statistics that describe no Gaussian, and image sets too small for one ------------
def _stats(path: Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    np.savez(path, mu=mu, sigma=sigma)
    return path


def test_a_covariance_that_is_not_positive_semidefinite_is_refused_not_scored_zero(tmp_path, capsys):
    good = _stats(tmp_path / "good.npz", np.zeros(4), np.eye(4))
    bad = _stats(tmp_path / "bad.npz", np.zeros(4), -np.eye(4))  # scored FID 0 against itself before
    with pytest.raises(ValueError, match=r"bad\.npz: sigma is not positive semi-definite"):
        fastdae.fid(bad, bad)
    skew = _stats(tmp_path / "skew.npz", np.zeros(4), np.eye(4) + np.triu(np.ones((4, 4)), 1))
    with pytest.raises(ValueError, match=r"skew\.npz: sigma is not symmetric"):
        fastdae.fid(good, skew)
    assert main(["fid", str(bad), str(good)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "positive semi-definite" in err


def test_nan_or_infinite_statistics_are_refused_not_printed_as_fid_nan(tmp_path, capsys):
    good = _stats(tmp_path / "good.npz", np.zeros(4), np.eye(4))
    nan_mu = _stats(tmp_path / "nan.npz", np.array([0.0, np.nan, 0.0, 0.0]), np.eye(4))
    inf_sigma = _stats(tmp_path / "inf.npz", np.zeros(4), np.diag([1.0, np.inf, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"nan\.npz: mu holds 1 NaN or infinite values"):
        fastdae.fid(good, nan_mu)
    with pytest.raises(ValueError, match=r"inf\.npz: sigma holds"):
        fastdae.fid(inf_sigma, good)
    assert main(["fid", str(good), str(nan_mu)]) == 2
    out = capsys.readouterr()
    assert "FID" not in out.out and out.err.count("\n") == 1


def test_an_empty_or_single_image_set_is_refused_by_name(tmp_path, inception_file, capsys):
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    for name in ("empty", "one"):
        with pytest.raises(ValueError, match=rf"{name}\.npz: arr_0 holds [01] images.*at least 2 non-empty"):
            statistics(tmp_path / f"{name}.npz", inception_file)
    write_folder(tmp_path / "single", images(0, n=1))
    with pytest.raises(ValueError, match=r"one image in .*single.*at least 2"):
        statistics(tmp_path / "single", inception_file)
    assert (
        main(["fid", str(tmp_path / "empty.npz"), str(tmp_path / "one.npz"), "--inception", str(inception_file)]) == 2
    )
    assert capsys.readouterr().err.count("\n") == 1


def test_an_unreadable_image_or_npz_is_named_in_one_line(tmp_path, inception_file, capsys):
    folder = write_folder(tmp_path / "imgs", images(0, n=2))
    (folder / "002.png").write_bytes(b"not a png")
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 torn")
    for side, match in ((folder, r"cannot read image file .*002\.png"), (tmp_path / "torn.npz", r"torn\.npz")):
        with pytest.raises(ValueError, match=match):
            statistics(side, inception_file, num_workers=0)
        args = ["fid", str(side), str(side), "--inception", str(inception_file), "--num-workers", "1"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and (side.name in err), err


def test_an_unreadable_inception_file_is_named_in_one_line(sets, tmp_path, capsys):
    (tmp_path / "inception.pth").write_bytes(b"garbage")
    assert main(["fid", str(sets["a_npz"]), str(sets["b_npz"]), "--inception", str(tmp_path / "inception.pth")]) == 2
    err = capsys.readouterr().err
    assert "inception.pth is not a readable Inception weights file" in err and err.count("\n") == 1, err
