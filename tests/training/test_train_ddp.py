"""Every stage under torchrun: 2 CPU processes with the gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastdae.config import apply_overrides, preset

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from fastdae.config import TrainConfig
    from fastdae.training import train

    result = train(TrainConfig.load(sys.argv[1]))
    assert dist.is_initialized() and dist.get_world_size() == 2
    print(json.dumps({"rank": dist.get_rank(), "summary": result.metrics}))
""")


@pytest.mark.slow
def test_all_stages_under_torchrun_gloo(tmp_path):
    cfg = apply_overrides(
        preset("tiny"),
        [f"out_dir={tmp_path / 'run'}", "stage1.steps=2", "stage2.steps=2", "prior.steps=2", "cache.shard_size=16"],
    )
    cfg.save(tmp_path / "cfg.yaml")
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(tmp_path / "script.py"),
            str(tmp_path / "cfg.yaml"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["stages"]) == {"stage1", "cache", "stage2", "prior", "samples"}
    # each rank wrote its own shards; rank 0 the manifest
    shards = sorted(p.name for p in (run / "cache").glob("shard-r*.safetensors"))
    assert {name[:10] for name in shards} == {"shard-r000", "shard-r001"}
    assert (run / "samples" / "grid.png").is_file()
    # the global batch is split: 2 ranks x 4 images per step, 8 images per step in all
    assert summary["stages"]["stage1"]["steps"] == 2
