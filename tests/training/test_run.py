"""The run folder never holds something other than it says (fastdae.training.run): a resume that
would leave later stages stale is refused, derived stages are redone, stale stages are listed apart,
a folder holding another run is refused without overwrite, and a full disk leaves no debris. What
each stage's identity holds is tested in test_identity.py."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch

import fastdae
from fastdae.config import TrainConfig, apply_overrides
from tests.utils import STAGE1, read_log, tiny, tree

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- a run's stages on resume --------------------------------------------------------------------
def test_resume_that_trains_stage1_further_refuses_stage2_up_front(tmp_path):
    cfg = tiny(tmp_path, "stages=stage1,cache,stage2", "stage1.steps=2", "stage2.steps=2")
    fastdae.train(cfg)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=r"cannot resume stage2 .*stages=stage1"):
        fastdae.train(apply_overrides(cfg, ["resume=true", "stage1.steps=4"]))
    assert tree(tmp_path) == before  # refused before stage 1 trained


def test_samples_may_be_drawn_again_with_another_sampler_but_not_left_stale(tmp_path):
    cfg = tiny(tmp_path)
    fastdae.train(cfg)
    with pytest.raises(ValueError, match=r"samples was trained with prior\.sampler"):
        fastdae.train(apply_overrides(cfg, ["stages=stage1", "prior.sampler=ddim"]))  # samples/ would be stale
    result = fastdae.train(apply_overrides(cfg, ["stages=samples", "prior.sampler=ddim", "resume=true"]))
    assert result.metrics["stages"]["samples"]["num_samples"] == cfg.prior.num_samples
    assert TrainConfig.load(tmp_path / "config.yaml").prior.sampler == "ddim"
    assert '"prior.sampler": "ddim"' in (tmp_path / "samples" / "identity.json").read_text()


def test_summary_lists_stages_built_on_replaced_outputs_as_stale(tmp_path):
    cfg = tiny(tmp_path, "stages=stage1,cache,stage2", "stage1.steps=2", "stage2.steps=2")
    fastdae.train(cfg)
    result = fastdae.train(apply_overrides(cfg, ["stages=stage1", "stage1.lr=1e-3"]))  # another encoder
    summary = result.metrics
    assert "stage1" in summary["stages"] and "stage2" not in summary["stages"] and "cache" not in summary["stages"]
    assert any(d.startswith("encoder:") for d in summary["stale"]["stage2"])


# ---- a folder holding another run ----------------------------------------------------------------
def test_a_folder_holding_another_run_is_refused_unless_overwrite(tmp_path):
    fastdae.train(tiny(tmp_path, *STAGE1, "stage1.steps=6"))  # ckpt-4, ckpt-6
    before = tree(tmp_path)
    new = tiny(tmp_path, *STAGE1, "seed=1")
    with pytest.raises(ValueError, match=r"seed.*overwrite"):
        fastdae.train(new)
    assert tree(tmp_path) == before
    fastdae.train(apply_overrides(new, ["overwrite=true"]))
    stage = tmp_path / "stage1"
    assert (stage / (stage / "latest").read_text()).is_dir()
    assert sorted(p.name for p in stage.glob("ckpt-*")) == ["ckpt-00000002"]
    assert TrainConfig.load(tmp_path / "config.yaml").seed == 1
    assert len(read_log(stage / "log.csv")) == 2


def test_a_runs_own_config_does_not_carry_overwrite(tmp_path):
    """Trained with overwrite, the run's config.yaml records overwrite false: the file given back with
    resume (to continue the run, or to a copy of its stages) resumes instead of clearing the folder."""
    fastdae.train(tiny(tmp_path, *STAGE1, "overwrite=true"))
    saved = TrainConfig.load(tmp_path / "config.yaml")
    assert saved.overwrite is False and saved.seed == 0
    before = tree(tmp_path / "stage1")
    fastdae.train(apply_overrides(saved, ["resume=true"]))
    assert tree(tmp_path / "stage1") == before  # finished: skipped, not cleared and trained again


def test_training_a_stage_again_starts_from_a_clean_stage_folder(tmp_path):
    fastdae.train(tiny(tmp_path, *STAGE1, "stage1.steps=6"))
    fastdae.train(tiny(tmp_path, *STAGE1))  # the same run, stage 1 trained again from scratch for 2 steps
    stage = tmp_path / "stage1"
    assert (stage / (stage / "latest").read_text()).is_dir()
    assert sorted(p.name for p in stage.glob("ckpt-*")) == ["ckpt-00000002"]


def test_a_folder_that_is_no_run_is_never_cleared(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for extra in ([], ["overwrite=true"]):
        with pytest.raises(ValueError, match="not a fastdae run"):
            fastdae.train(tiny(tmp_path, *STAGE1, *extra))
    assert tree(tmp_path) == {"notes.txt": b"mine"}


# ---- `latest` must name a checkpoint inside its stage folder -------------------------------------
def test_latest_pointing_outside_the_stage_folder_is_refused(tmp_path):
    cfg = tiny(tmp_path / "run", *STAGE1, "stage1.steps=4")
    fastdae.train(cfg)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "run" / "stage1" / "latest").write_text("../../elsewhere")
    with pytest.raises(ValueError, match="latest"):
        fastdae.train(apply_overrides(cfg, ["resume=true", "stage1.steps=6"]))


# ---- a full disk leaves no temp checkpoint folders -----------------------------------------------
def test_disk_full_leaves_no_temp_checkpoints(tmp_path, monkeypatch):
    save = torch.save

    def full(obj, f, *args, **kwargs):
        if "state.pt" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        fastdae.train(tiny(tmp_path, *STAGE1))
    assert not [p.name for p in tmp_path.rglob(".*tmp*")]


# ---- overwrite removes only what fastdae wrote ------------------------------
def test_overwrite_never_clears_a_project_folder_that_holds_a_config_yaml(tmp_path):
    """`--config proj/config.yaml --out proj --overwrite` deleted the project: a folder fastdae did not
    make (no run marker) is refused, config.yaml or not, and left as it was."""
    project = tmp_path / "proj"
    (project / "images").mkdir(parents=True)
    (project / "images" / "a.png").write_bytes(b"png")
    (project / "train.py").write_text("print('mine')")
    tiny(project, *STAGE1).save(project / "config.yaml")
    before = tree(project)
    with pytest.raises(ValueError, match=r"not a fastdae run.*\.fastdae-run"):
        fastdae.train(tiny(project, *STAGE1, "overwrite=true"))
    assert tree(project) == before


def test_overwrite_refuses_a_run_folder_holding_the_users_files_and_lists_them(tmp_path):
    fastdae.train(tiny(tmp_path, *STAGE1))
    (tmp_path / "mydata").mkdir()
    for i in range(30):
        (tmp_path / "mydata" / f"{i}.png").write_bytes(b"png")
    (tmp_path / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=r"2 entries fastdae did not write: mydata, notes\.txt"):
        fastdae.train(tiny(tmp_path, *STAGE1, "seed=1", "overwrite=true"))
    assert tree(tmp_path) == before
    (tmp_path / "notes.txt").unlink()
    shutil.rmtree(tmp_path / "mydata")
    fastdae.train(tiny(tmp_path, *STAGE1, "seed=1", "overwrite=true"))  # only fastdae's entries: cleared
    assert TrainConfig.load(tmp_path / "config.yaml").seed == 1 and (tmp_path / ".fastdae-run").is_file()


def test_an_out_dir_that_is_a_file_is_refused_by_name(tmp_path):
    (tmp_path / "run").write_text("mine")
    with pytest.raises(ValueError, match=r"out_dir .*run is a file"):
        fastdae.train(tiny(tmp_path / "run", *STAGE1))
    assert (tmp_path / "run").read_text() == "mine"
