"""What a run shows a person: PNG grids at a readable size, curves.png from the stages' log.csv, and
notices said once per run folder (fastdae.training.logs)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastdae.training.logs import (
    MIN_GRID_SIDE,
    draw_curves,
    grid_image,
    notice_once,
    read_curves,
    save_grid,
    write_curves,
)

LOG_CSV = """step,loss,l1,lr,grad_norm,images_per_s,time_s,g,lambda,d_loss
1,0.7,0.5,0.0002,3.5,10.0,1.0,,,
2,0.6,0.4,0.0002,7.9,70.0,2.0,0.003,0.58,0.96
3,0.5,0.3,0.0002,5.5,46.0,3.0,0.001,0.56,0.95
"""


def folder_run(root: Path) -> SimpleNamespace:
    """The parts of a Run that logs.py's run-folder helpers use."""
    return SimpleNamespace(
        dist=SimpleNamespace(is_main=True),
        notices_file=root / "notices.json",
        curves_file=root / "curves.png",
        log_csv=lambda stage: root / stage / "log.csv",
    )


def write_logs(root: Path, *stages: str) -> None:
    for stage in stages:
        (root / stage).mkdir(parents=True, exist_ok=True)
        (root / stage / "log.csv").write_text(LOG_CSV)


@pytest.fixture
def train_log(caplog):
    caplog.set_level(logging.INFO, logger="fastdae.train")
    return caplog


# ---- grids --------------------------------------------------------------------------------------
def test_a_small_grid_is_nearest_upscaled_to_at_least_256_px_a_side(tmp_path):
    images = torch.rand(16, 3, 16, 16) * 2 - 1
    raw = grid_image(images, nrow=8).numpy()  # (35, 137, 3): two rows of eight 16 px images
    png = np.asarray(Image.open(save_grid(images, tmp_path / "g.png", nrow=8)))
    f = png.shape[0] // raw.shape[0]
    assert min(png.shape[:2]) >= MIN_GRID_SIDE and png.shape[:2] == (raw.shape[0] * f, raw.shape[1] * f)
    assert np.array_equal(png[::f, ::f], raw)  # every pixel an f x f block: nothing blurred
    assert np.array_equal(png[f - 1 :: f, f - 1 :: f], raw)


def test_a_grid_already_large_enough_keeps_its_size(tmp_path):
    images = torch.rand(256, 3, 32, 32) * 2 - 1
    png = np.asarray(Image.open(save_grid(images, tmp_path / "g.png")))
    assert np.array_equal(png, grid_image(images).numpy())  # 529 x 529: no upscaling


# ---- curves -------------------------------------------------------------------------------------
def test_curves_hold_the_loss_terms_only_and_skip_empty_cells(tmp_path):
    write_logs(tmp_path, "stage1")
    curves = read_curves(tmp_path / "stage1" / "log.csv")
    assert set(curves) == {"loss", "l1", "g", "d_loss"}  # not lr, grad_norm, lambda, images/s or time
    assert curves["loss"] == ([1, 2, 3], [0.7, 0.6, 0.5])
    assert curves["g"] == ([2, 3], [0.003, 0.001])  # the GAN term starts after the warm-up


def test_curves_png_has_one_panel_per_stage_with_a_log(tmp_path):
    pytest.importorskip("matplotlib")
    write_logs(tmp_path, "stage1", "prior")
    run = folder_run(tmp_path)
    write_curves(run)
    one = tmp_path / "one.png"
    assert draw_curves({"stage1": run.log_csv("stage1"), "stage2": run.log_csv("stage2")}, one)
    two, single = Image.open(run.curves_file), Image.open(one)
    assert two.height == single.height and two.width == 2 * single.width  # stage2 has no log: no panel
    assert not run.notices_file.exists()


def test_without_matplotlib_curves_are_skipped_with_one_notice(tmp_path, monkeypatch, train_log):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib.figure raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    write_logs(tmp_path, "stage1")
    run = folder_run(tmp_path)
    write_curves(run)
    write_curves(run)
    assert not run.curves_file.exists()
    assert [r.getMessage() for r in train_log.records].count(
        "curves.png not drawn: matplotlib is not installed (pip install 'fastdae[plots]')"
    ) == 1


# ---- notices ------------------------------------------------------------------------------------
def test_a_notice_is_said_once_per_run_folder(tmp_path, train_log):
    first, other = folder_run(tmp_path / "a"), folder_run(tmp_path / "b")
    for run in (first, other):
        run.notices_file.parent.mkdir()
    for run in (first, first, other, first):
        notice_once(run, "lpips_off", "LPIPS is off")
    notice_once(first, "curves", "curves.png not drawn")
    said = [r.getMessage() for r in train_log.records]
    assert said == ["LPIPS is off", "LPIPS is off", "curves.png not drawn"]  # once in a, once in b


def test_only_rank_0_says_a_notice(tmp_path, train_log):
    run = folder_run(tmp_path)
    run.dist.is_main = False
    notice_once(run, "lpips_off", "LPIPS is off")
    assert not train_log.records and not run.notices_file.exists()
