"""fastdae.training.checkpoint: a checkpoint whose files are corrupted is refused on resume
with a RunError naming the file and what to do, not a struct or safetensors traceback."""

from __future__ import annotations

import pytest

import fastdae
from fastdae.config import apply_overrides
from fastdae.training.identity import RunError
from tests.utils import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

STAGE1 = ["stages=stage1", "stage1.steps=2", "stage1.ckpt_every=2", "stage1.log_every=1"]


@pytest.mark.parametrize(
    "target,data,match",
    [
        ("latest", b"\xff\xfe\x00", r"latest names .*not a ckpt-<step> folder"),
        ("ckpt-00000002/state.pt", b"junk", r"ckpt-00000002/state\.pt cannot be loaded.*corrupted"),
        ("ckpt-00000002/autoencoder.safetensors", b"junk", r"autoencoder\.safetensors cannot be loaded.*corrupted"),
    ],
)
def test_a_corrupted_checkpoint_is_refused_naming_the_file(tmp_path, target, data, match):
    cfg = tiny(tmp_path, *STAGE1)
    fastdae.train(cfg)
    (tmp_path / "stage1" / target).write_bytes(data)
    with pytest.raises(RunError, match=match):
        fastdae.train(apply_overrides(cfg, ["resume=true", "stage1.steps=4"]))
