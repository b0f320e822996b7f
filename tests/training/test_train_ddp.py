"""Every stage under torchrun with the gloo backend (the cache with its decoded images): one node of 2 CPU
processes, and two nodes (two launchers on this machine, c10d rendezvous on localhost) of 1 process
each, which must train the same weights bit for bit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fastdae.config import apply_overrides, preset
from tests.utils import torchrun

REPO = Path(__file__).resolve().parents[2]
STAGES = {"stage1", "cache", "stage2", "prior", "samples"}
TIMEOUT_S = 300

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from fastdae.config import TrainConfig
    from fastdae.training import train

    result = train(TrainConfig.load(sys.argv[1]))
    assert dist.is_initialized() and dist.get_world_size() == 2
    print(json.dumps({"rank": dist.get_rank(), "node": int(os.environ["GROUP_RANK"]), "summary": result.metrics}))
""")


def _config(tmp_path: Path, name: str) -> Path:
    cfg = apply_overrides(
        preset("tiny"),
        [
            f"out_dir={tmp_path / name}",
            "stage1.steps=2",
            "stage2.steps=2",
            "prior.steps=2",
            "cache.shard_size=16",
            "cache.images=true",
        ],
    )
    path = tmp_path / f"{name}.yaml"
    cfg.save(path)
    (tmp_path / "script.py").write_text(SCRIPT)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _reports(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run: Path) -> dict[str, bytes]:
    """Every safetensors file of a run (final weights, checkpoints, cache shards, samples), by relative path."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A run of every stage on one node of 2 processes (--standalone)."""
    tmp = tmp_path_factory.mktemp("one-node")
    cfg = _config(tmp, "run")
    proc = torchrun(tmp / "script.py", cfg, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", _reports(proc.stdout)


@pytest.mark.slow
def test_all_stages_under_torchrun_gloo(one_node):
    run, reports = one_node
    assert sorted(r["rank"] for r in reports) == [0, 1]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["stages"]) == STAGES
    # each rank wrote its own shards, of the latents and of the decoded images; rank 0 the manifests
    for cache in (run / "cache", run / "cache" / "images"):
        shards = sorted(p.name for p in cache.glob("shard-r*.safetensors"))
        assert {name[:10] for name in shards} == {"shard-r000", "shard-r001"}
        assert (cache / "manifest.json").is_file()
    assert (run / "samples" / "grid.png").is_file()
    # the global batch is split: 2 ranks x 4 images per step, 8 images per step in all
    assert summary["stages"]["stage1"]["steps"] == 2


@pytest.mark.slow
def test_two_nodes_of_one_process_train_the_weights_of_one_node_of_two(one_node, tmp_path):
    """Same ranks, same global batch, same gloo all-reduce of two summands (exact: a + b == b + a), so
    the weights are equal bit for bit, not within a tolerance; the cache is built once in the shared
    run folder, each rank writing its own shards."""
    cfg, port, rdzv_id = _config(tmp_path, "run"), _free_port(), uuid.uuid4().hex[:8]
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-id={rdzv_id}",
                # the first launcher hosts the rendezvous store, as the first node of a SLURM job would
                f"--rdzv-conf=is_host={int(node == 0)}",
                "--local-addr=127.0.0.1",
                str(tmp_path / "script.py"),
                str(cfg),
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(2)
    ]
    outputs = []
    try:
        for proc in launchers:
            outputs.append(proc.communicate(timeout=TIMEOUT_S))
    finally:  # a hung rendezvous must not outlive the test: SIGTERM lets torchrun stop its workers first
        for proc in launchers:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    for proc, (_, err) in zip(launchers, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    reports = [r for out, _ in outputs for r in _reports(out)]
    assert sorted((r["node"], r["rank"]) for r in reports) in ([(0, 0), (1, 1)], [(0, 1), (1, 0)])

    run, (single, _) = tmp_path / "run", one_node
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["stages"]) == STAGES
    two, one = _weights(run), _weights(single)
    finals = {"stage1/encoder.safetensors", "stage2/decoder.safetensors", "prior/dit.safetensors"}
    assert finals <= set(two) and set(two) == set(one)
    assert [name for name in two if two[name] != one[name]] == []
    manifests = [json.loads((r / "cache" / "manifest.json").read_text()) for r in (run, single)]
    assert [m["shards"] for m in manifests[:1]] == [m["shards"] for m in manifests[1:]]
    assert manifests[0]["build"]["world_size"] == 2


def _disagree(rank: int, init: str, values: list[str], root: str, errors) -> None:
    from fastdae.cache.writer import build
    from fastdae.training.distributed import Dist

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        for check in (
            lambda: Dist(rank, 2).agree("dataset fingerprint", values[rank], "read the same folder"),
            lambda: build(
                root, [(torch.zeros(3, 4, 4), 0)] * 4, None, encoder_sha256="e", dataset_fingerprint=values[rank]
            ),
        ):
            try:
                check()
            except (RuntimeError, ValueError) as e:  # CacheError is a ValueError
                errors.put(f"rank {rank}: {e}")
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_that_read_other_data_are_refused_on_every_rank(tmp_path):
    """Before training (Run.prepare) and before the cache writes a shard; ranks that agree pass (every
    torchrun test above goes through both checks)."""
    values, ctx = ["abc", "abd"], mp.get_context("spawn")
    errors = ctx.Queue()
    init, root = f"file://{tmp_path / 'store'}", str(tmp_path / "cache")
    procs = [ctx.Process(target=_disagree, args=(r, init, values, root, errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    messages = sorted(errors.get(timeout=5) for _ in range(4))
    assert [m[:6] for m in messages] == ["rank 0", "rank 0", "rank 1", "rank 1"]
    assert sum("disagree on the dataset fingerprint" in m and "rank 1 on" in m for m in messages) == 2
    assert sum("rank 1 would build the cache with another dataset_fingerprint" in m for m in messages) == 2
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
