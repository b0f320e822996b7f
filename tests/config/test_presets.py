"""Named configs (fastdae.config.presets)."""

from __future__ import annotations

import pytest

from fastdae.config import STAGES, load_config, preset


def test_presets():
    assert set(STAGES) == set(preset("default").stages)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(TypeError, match="config must be"):
        load_config(3)
