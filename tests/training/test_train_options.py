"""The loop options (docs/training.md: training options): gradient accumulation, Adam/AdamW + weight decay,
constant/cosine LR with warm-up, fp16 + GradScaler, compile, TensorBoard images, optional W&B.
Each one changes what it should, is validated up front, is in the identity where it changes what is
trained, and resumes exactly."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

import fastdae
from fastdae.config import ConfigError, apply_overrides, check_environment, preset
from fastdae.training import distributed
from fastdae.training.identity import config_identity
from fastdae.training.optim import Updater, lr_factor
from tests.utils import read_log, tiny, torchrun

pytestmark = pytest.mark.usefixtures("one_thread")

# stage 1 alone, no GAN (its BatchNorm discriminator sees each micro-batch's own statistics) and no
# dropout (its masks are drawn per micro-batch): what is left has no batch-dependent layer
# (GroupNorm is per image, the VQ losses are means over equal micro-batches)
PLAIN = ["stages=stage1", "stage1.steps=3", "stage1.disc.start=1000", "weak_decoder.dropout=0.0"]


def assert_same_curves(
    want: list[dict[str, str]], got: list[dict[str, str]], keys: tuple[str, ...], rel: float = 1e-5
) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got, strict=True):
        for key in keys:
            if a.get(key):
                assert float(b[key]) == pytest.approx(float(a[key]), rel=rel, abs=1e-7), (a["step"], key)


# ---- validation and identity ------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,key",
    [
        ("stage1.optimizer=sgd", "stage1.optimizer"),
        ("prior.optimizer=lion", "prior.optimizer"),
        ("stage2.lr_schedule=linear", "stage2.lr_schedule"),
        ("prior.lr_schedule=step", "prior.lr_schedule"),
        ("stage1.weight_decay=-0.1", "stage1.weight_decay"),
        ("prior.weight_decay=-1", "prior.weight_decay"),
        ("stage2.grad_accum=0", "stage2.grad_accum"),
        ("prior.grad_accum=-2", "prior.grad_accum"),
        ("stage1.grad_accum=3", "stage1.grad_accum"),  # batch 8 does not split into 3 equal micro-batches
        ("precision=fp8", "precision"),
        ("stage1.compile=maybe", "stage1.compile"),
    ],
)
def test_invalid_options_raise_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(preset("tiny"), [override])


def test_near_miss_suggests_the_choice():
    with pytest.raises(ConfigError, match="did you mean 'adamw'"):
        apply_overrides(preset("tiny"), ["stage1.optimizer=adamww"])


def test_fp16_on_cpu_is_refused_clearly():
    with pytest.raises(ConfigError, match="precision='fp16'.*needs a CUDA device"):
        apply_overrides(preset("tiny"), ["precision=fp16", "device=cpu"])
    if not torch.cuda.is_available():  # device "auto" resolves to the CPU: refused before anything runs
        with pytest.raises(ConfigError, match="precision='fp16'.*torch sees none"):
            check_environment(apply_overrides(preset("tiny"), ["precision=fp16"]))


@pytest.mark.parametrize("key,module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_missing_logger_package_is_a_config_error(key, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import of it fails, as when it is not installed
    if module == "tensorboard":
        monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ConfigError, match=f"{key}=true needs the {module} package"):
        check_environment(apply_overrides(preset("tiny"), [f"{key}=true"]))


def test_identity_keys():
    ident = {stage: config_identity(preset("tiny"), stage) for stage in ("stage1", "stage2", "prior")}
    for stage, keys in ident.items():
        for opt in ("optimizer", "weight_decay", "lr_schedule", "warmup_steps", "grad_accum"):
            assert f"{stage}.{opt}" in keys  # they change what is trained
        assert f"{stage}.compile" not in keys  # how, not what: may change on resume
        assert "precision" in keys and "tensorboard" not in keys and "wandb" not in keys


def test_resume_refuses_another_optimizer(tmp_path):
    cfg = tiny(tmp_path, *PLAIN)
    fastdae.train(cfg)
    with pytest.raises(ConfigError, match=r"stage1\.optimizer: 'adam' -> 'adamw'"):
        fastdae.train(apply_overrides(cfg, ["resume=true", "stage1.optimizer=adamw"]))
    fastdae.train(apply_overrides(cfg, ["resume=true", "stage1.steps=4", "stage1.compile=false", "tensorboard=false"]))


# ---- what each option changes -----------------------------------------------------------------
def test_cosine_schedule_with_warmup_values():
    # warm-up 2 of 6 steps, then half a cosine over the 4 steps left: 0.5(1 + cos(pi k / 4)), k = 0..3
    want = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    got = [lr_factor(s, warmup_steps=2, schedule="cosine", total_steps=6) for s in range(6)]
    assert got == pytest.approx(want)
    assert [lr_factor(s, warmup_steps=2, schedule="constant", total_steps=6) for s in range(6)] == pytest.approx(
        [0.5, 1, 1, 1, 1, 1]
    )


def test_cosine_lr_in_a_run(tmp_path):
    fastdae.train(
        tiny(tmp_path, *PLAIN, "stage1.steps=6", "stage1.lr=1e-3", "stage1.warmup_steps=2", "stage1.lr_schedule=cosine")
    )
    lrs = [float(r["lr"]) for r in read_log(tmp_path / "stage1" / "log.csv")]
    want = [1e-3 * lr_factor(s, warmup_steps=2, schedule="cosine", total_steps=6) for s in range(6)]
    assert lrs == pytest.approx(want, rel=1e-5)
    assert lrs[3] < lrs[2] and lrs[5] < lrs[4]


def _updater(*overrides: str, fp16: bool = False) -> tuple[torch.Tensor, Updater]:
    s = apply_overrides(preset("tiny"), list(overrides)).stage1
    p = torch.nn.Parameter(torch.ones(4))
    return p, Updater([p], s, total_steps=10, fp16=fp16, device=torch.device("cpu"))


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adamw_decay_is_decoupled(optimizer):
    """A zero-gradient loss: AdamW only shrinks the weights, p *= 1 - lr wd; Adam's L2 term goes
    through the normalised update instead (first step: p -= lr, whatever wd is)."""
    p, upd = _updater(f"stage1.optimizer={optimizer}", "stage1.weight_decay=0.5", "stage1.lr=0.1", "stage1.grad_clip=0")
    upd.backward((0.0 * p).sum())
    upd.step()
    want = 1 - 0.1 * 0.5 if optimizer == "adamw" else 1 - 0.1
    torch.testing.assert_close(p.detach(), torch.full((4,), want), rtol=0, atol=1e-6)


def test_no_weight_decay_by_default():
    p, upd = _updater("stage1.optimizer=adamw", "stage1.lr=0.1")
    upd.backward((0.0 * p).sum())
    upd.step()
    torch.testing.assert_close(p.detach(), torch.ones(4))


def test_grad_scaler_unscales_skips_non_finite_steps_and_round_trips():
    """The GradScaler path (CUDA's fp16 runs) on CPU with an fp32 loss: the same update as without
    it; an Inf gradient skips the step and halves the scale; its state is in state_dict."""
    p_ref, ref = _updater("stage1.lr=0.1")
    p, upd = _updater("stage1.lr=0.1", fp16=True)
    for q, u in ((p_ref, ref), (p, upd)):
        u.backward((q * torch.arange(4.0)).sum())
        u.step()
    torch.testing.assert_close(p, p_ref)
    scale, before = upd.scaler.get_scale(), p.detach().clone()
    upd.backward(p.sum() * float("inf"))
    upd.step()
    assert torch.equal(p.detach(), before) and upd.scaler.get_scale() == scale / 2
    _, other = _updater("stage1.lr=0.1", fp16=True)
    other.load_state_dict(upd.state_dict())
    assert other.scaler.get_scale() == scale / 2 and other.sched.last_epoch == upd.sched.last_epoch


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fused_option_uses_the_fused_kernel_and_follows_the_loop_closely(optimizer):
    """fused=true: torch's fused Adam/AdamW; the default keeps torch's per-parameter loop. The fused
    kernel rounds differently (not bitwise; why it is off by default and in the run's identity), but
    follows the loop to float rounding over a few steps of the vq preset's autoencoder (deterministic: the
    default's KL bottleneck would draw different noise for the two models)."""
    from fastdae.models.autoencoder import Autoencoder, build_decoder

    cfg = apply_overrides(preset("vq"), [f"stage1.optimizer={optimizer}", "stage1.weight_decay=0.01"])
    torch.manual_seed(0)
    models = [Autoencoder(cfg.autoencoder, build_decoder(cfg.autoencoder)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    upds = [
        Updater(
            m.parameters(),
            apply_overrides(cfg, [f"stage1.fused={f}"]).stage1,
            total_steps=3,
            fp16=False,
            device=torch.device("cpu"),
        )
        for m, f in zip(models, (False, True), strict=True)
    ]
    assert not upds[0].opt.defaults["fused"] and upds[1].opt.defaults["fused"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1
        for m, u in zip(models, upds, strict=True):
            x_hat, aux = m(x)
            u.backward((x - x_hat).abs().mean() + aux)
            u.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_step_needs_every_micro_batch():
    p, upd = _updater("stage1.grad_accum=2")
    upd.backward(p.sum())
    with pytest.raises(RuntimeError, match="grad_accum=2"):
        upd.step()


def test_grad_accumulation_matches_the_whole_batch(tmp_path):
    """batch 8 in 2 micro-batches of 4 == batch 8 at once (same data, model without batch-dependent
    layers): same losses, same pre-clip gradient norms (catches a missing 1 / grad_accum, which Adam's
    normalised update alone would hide), same weights up to one Adam step (lr): conv biases before a
    GroupNorm have a zero gradient in exact arithmetic, and Adam turns their rounding noise into
    +-lr steps. Not the same: the quantizer's usage bookkeeping, which counts forward passes
    (micro-batches; docs/training.md: training options)."""
    runs = {k: tmp_path / f"accum{k}" for k in (1, 2)}
    for k, out in runs.items():
        fastdae.train(tiny(out, *PLAIN, "stage1.batch_size=8", f"stage1.grad_accum={k}"))
    want, got = (read_log(runs[k] / "stage1" / "log.csv") for k in (1, 2))
    assert_same_curves(want, got, ("loss", "l1", "aux", "grad_norm"), rel=1e-4)
    w1, w2 = (load_file(str(runs[k] / "stage1" / "encoder.safetensors")) for k in (1, 2))
    per_forward = {f"bottleneck.quantizer.{b}" for b in ("usage", "last_used", "last_reset", "steps")}
    assert w2["bottleneck.quantizer.steps"] == 2 * w1["bottleneck.quantizer.steps"] == 6
    assert "bottleneck.quantizer.codebook" in w1
    lr = preset("tiny").stage1.lr
    for name in w1.keys() - per_forward:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=lr)


def test_grad_accumulation_gives_the_whole_batch_gradient():
    """The gradient an Updater steps with: 2 micro-batches of 4 == one batch of 8 (the autoencoder's
    L1 + VQ loss; no batch-dependent layer), to float rounding."""
    from fastdae.models.autoencoder import Autoencoder, build_decoder

    cfg = preset("tiny")
    torch.manual_seed(0)
    ae = Autoencoder(cfg.autoencoder, build_decoder(cfg.autoencoder))
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    grads = []
    for k in (1, 2):
        upd = Updater(
            ae.parameters(),
            apply_overrides(cfg, [f"stage1.grad_accum={k}"]).stage1,
            total_steps=1,
            fp16=False,
            device=torch.device("cpu"),
        )
        for xm in upd.micro_batches(x):
            x_hat, aux = ae(xm)
            upd.backward((x_hat - xm).abs().mean() + aux)
        grads.append({n: p.grad.clone() for n, p in ae.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.slow
def test_grad_accumulation_under_torchrun_matches_one_process(tmp_path):
    """2 gloo ranks x 4 images in 2 micro-batches of 2 (gradients all-reduced only in the last one's
    backward) == one process with the whole batch of 8: the same global batches (StepBatchSampler),
    so the same all-reduced gradient norms and weights (up to one Adam step, as above)."""
    one = fastdae.train(tiny(tmp_path / "one", *PLAIN, "stage1.batch_size=8"))
    cfg = tiny(tmp_path / "ddp", *PLAIN, "stage1.batch_size=8", "stage1.grad_accum=2")
    cfg.save(tmp_path / "cfg.yaml")
    script = (
        "import sys, torch; torch.set_num_threads(1); from fastdae.config import TrainConfig; "
        "from fastdae.training import train; train(TrainConfig.load(sys.argv[1]))"
    )
    (tmp_path / "script.py").write_text(script)
    proc = torchrun(tmp_path / "script.py", tmp_path / "cfg.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = (read_log(r / "stage1" / "log.csv") for r in (one.run_dir, tmp_path / "ddp"))
    assert_same_curves(want, got, ("grad_norm",), rel=1e-4)  # rank 0 logs its own loss; the norm is global
    w1, w2 = (load_file(str(r / "stage1" / "encoder.safetensors")) for r in (one.run_dir, tmp_path / "ddp"))
    lr = preset("tiny").stage1.lr
    for name in w1.keys() - {f"bottleneck.quantizer.{b}" for b in ("usage", "last_used", "last_reset", "steps")}:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=lr)


# ---- exact resume with the options --------------------------------------------------------------
def test_resume_with_the_options_is_exact(tmp_path, monkeypatch):
    """Accumulation, AdamW, cosine + warm-up, GAN on (its updater too): interrupted at step 3, resumed
    from the step-2 checkpoint, the loss curve and weights equal a straight run's."""
    opts = [
        "stages=stage1",
        "stage1.steps=5",
        "stage1.log_every=1",
        "stage1.ckpt_every=2",
        "stage1.grad_accum=2",
        "stage1.optimizer=adamw",
        "stage1.weight_decay=0.05",
        "stage1.lr_schedule=cosine",
        "stage1.warmup_steps=2",
        "weak_decoder.dropout=0.2",
    ]
    straight = fastdae.train(tiny(tmp_path / "straight", *opts))
    cfg = tiny(tmp_path / "interrupted", *opts, "resume=true")
    seed_step = distributed.seed_step

    def interrupt_at_3(seed, stage, step, rank):
        if step == 3:
            raise KeyboardInterrupt
        seed_step(seed, stage, step, rank)

    monkeypatch.setattr(distributed, "seed_step", interrupt_at_3)
    with pytest.raises(KeyboardInterrupt):
        fastdae.train(cfg)
    monkeypatch.setattr(distributed, "seed_step", seed_step)
    fastdae.train(cfg)
    want, got = (read_log(r / "stage1" / "log.csv") for r in (straight.run_dir, tmp_path / "interrupted"))
    assert_same_curves(want, got, ("loss", "l1", "aux", "d_loss", "lr", "grad_norm"))
    assert "d_loss" in want[-1]
    w1, w2 = (
        load_file(str(r / "stage1" / "encoder.safetensors")) for r in (straight.run_dir, tmp_path / "interrupted")
    )
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6)
    state = torch.load(tmp_path / "interrupted" / "stage1" / "ckpt-00000004" / "state.pt", weights_only=True)
    assert set(state) == {"step", "optimizers", "schedulers", "scalers"}
    assert state["schedulers"]["autoencoder"]["last_epoch"] == 4


# ---- compile, TensorBoard, W&B ----------------------------------------------------------------
@pytest.mark.slow
def test_compile_trains_the_compiled_modules(tmp_path):
    """stage1.compile: the autoencoder (and discriminator) run through torch.compile; same losses."""
    from torch._dynamo.utils import counters

    opts = ["stages=stage1", "stage1.steps=2", "weak_decoder.dropout=0.0"]
    eager = fastdae.train(tiny(tmp_path / "eager", *opts))
    counters.clear()
    compiled = fastdae.train(tiny(tmp_path / "compiled", *opts, "stage1.compile=true"))
    assert counters["stats"]["unique_graphs"] > 0
    want, got = (read_log(r.run_dir / "stage1" / "log.csv") for r in (eager, compiled))
    assert_same_curves(want, got, ("loss", "l1", "aux"), rel=1e-3)


def test_tensorboard_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (the [dev] extra installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fastdae.train(tiny(tmp_path, *PLAIN, "tensorboard=true"))  # steps 3, ckpt_every 2
    events = EventAccumulator(str(tmp_path / "stage1" / "tb"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"stage1/loss", "stage1/lr", "stage1/grad_norm"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("stage1/loss")] == [1, 2, 3]
    assert {"stage1/reconstructions", "stage1/eval_reconstructions"} <= set(tags["images"])
    assert [e.step for e in events.Images("stage1/reconstructions")] == [2, 3]  # checkpoint steps
    image = events.Images("stage1/eval_reconstructions")[0]
    assert (image.width, image.height) == (8 * 17 + 1, 2 * 17 + 1)  # 8 pairs of 16x16 images, 1-pixel gaps


def test_every_stage_with_the_options(tmp_path):
    """Stage 2 and the prior split their (fields, images) and latent batches the same way; the samples
    grid reaches TensorBoard too."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (the [dev] extra installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opts = [
        "stage2.grad_accum=2",
        "stage2.optimizer=adamw",
        "stage2.weight_decay=0.01",
        "prior.grad_accum=4",
        "prior.lr_schedule=cosine",
        "prior.warmup_steps=1",
        "prior.optimizer=adamw",
        "tensorboard=true",
    ]
    result = fastdae.train(tiny(tmp_path, *opts))
    assert set(result.metrics["stages"]) == {"stage1", "cache", "stage2", "prior", "samples"}
    prior_lrs = [float(r["lr"]) for r in read_log(tmp_path / "prior" / "log.csv")]
    lr = preset("tiny").prior.lr
    assert prior_lrs == pytest.approx(
        [lr * lr_factor(s, warmup_steps=1, schedule="cosine", total_steps=3) for s in range(3)]
    )
    events = EventAccumulator(str(tmp_path / "samples" / "tb"), size_guidance={"images": 0}).Reload()
    assert events.Tags()["images"] == ["samples/samples"]


def test_wandb_stub_receives_scalars_and_images(tmp_path, monkeypatch):
    """W&B is optional and never reached over the network in tests: a stub module stands in for it."""
    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class Run:
        def finish(self) -> None:
            calls["finish"].append(True)

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    stub = types.SimpleNamespace(
        init=init, log=lambda d: calls["log"].append(d), Image=lambda array: ("image", array.shape)
    )
    monkeypatch.setitem(sys.modules, "wandb", stub)
    fastdae.train(tiny(tmp_path, *PLAIN, "wandb=true"))
    (kwargs,) = calls["init"]
    assert kwargs["project"] == "fastdae" and kwargs["dir"] == str(tmp_path) and kwargs["config"]["wandb"] is True
    assert calls["finish"] == [True]
    scalars = [d for d in calls["log"] if "stage1/loss" in d]
    assert [d["stage1/step"] for d in scalars] == [1, 2, 3]
    images = [d["stage1/reconstructions"] for d in calls["log"] if "stage1/reconstructions" in d]
    assert images == [("image", (2 * 17 + 1, 8 * 17 + 1, 3))] * 2


# ---- fp16 on a GPU ------------------------------------------------------------------------------
@pytest.mark.gpu
def test_fp16_with_grad_scaler_trains_and_resumes_on_cuda(tmp_path):
    opts = [
        "stages=stage1",
        "device=cuda",
        "precision=fp16",
        "stage1.steps=4",
        "stage1.ckpt_every=2",
        "stage1.grad_accum=2",
    ]
    straight = fastdae.train(tiny(tmp_path / "straight", *opts))
    rows = read_log(straight.run_dir / "stage1" / "log.csv")
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    state = torch.load(straight.run_dir / "stage1" / "ckpt-00000004" / "state.pt", weights_only=True)
    assert state["scalers"]["autoencoder"]["scale"] > 0
    cfg = tiny(tmp_path / "resumed", *opts, "stage1.steps=2")
    fastdae.train(cfg)
    fastdae.train(apply_overrides(cfg, ["resume=true", "stage1.steps=4"]))
    assert_same_curves(
        rows, read_log(tmp_path / "resumed" / "stage1" / "log.csv"), ("loss", "l1", "grad_norm"), rel=1e-3
    )
