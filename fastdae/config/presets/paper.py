"""Paper-scale presets: 256 px images from a folder the user names (`data.root`), the autoencoders of
LDM (KL, f=8) and taming-transformers (VQGAN, f=16, 1,024 codes), and DiT priors with DiT's recipe.

Every preset keeps the DAE recipe: stage 1 trains the encoder with the weak decoder (`weak_decoder`:
half width, one residual block per level, Dropout2d 0.3, the small presets' setting), stage 2 a fresh
full decoder on the cached latents; `mode: joint | control` gives the other two arms, as for the
small presets. What follows a published recipe and what is inferred is written in each docstring;
the shared sources:

- DiT (Peebles & Xie, ICCV 2023; facebookresearch/DiT train.py): AdamW, lr 1e-4, weight decay 0,
  global batch 256, EMA 0.9999, no warm-up, no gradient clipping, class-label dropout 0.1, DDPM with
  1,000 linear-schedule steps, 250 sampling steps, classifier-free guidance 1.5 for FID. 400K steps is
  the budget at which the paper compares its models (its scaling tables); the headline DiT-XL/2 FID
  (2.27) took 7M steps. fastdae's DiT predicts epsilon only (DiT learns the variance too).
- LDM's KL-f8 autoencoder (CompVis/latent-diffusion configs/autoencoder/autoencoder_kl_32x32x4.yaml):
  ch 128, ch_mult [1, 2, 4, 4], 2 residual blocks, 4 latent channels, mid-block attention, kl_weight
  1e-6, LPIPS weight 1, discriminator from step 50,001 at weight 0.5 (3 layers, 64 filters), Adam
  betas (0.5, 0.9), no EMA; base lr 4.5e-6 multiplied by the global batch (main.py: ngpu x batch x
  accumulation), per-GPU batch 12.
- taming-transformers' VQGAN (CompVis/taming-transformers configs/imagenet_vqgan.yaml, and the
  first stage of configs/faceshq_transformer.yaml): ch 128, ch_mult [1, 1, 2, 2, 4], 2 residual
  blocks, 256-dim codes, 1,024 codes, beta 0.25, codebook weight 1, LPIPS weight 1, discriminator
  weight 0.8 from step 250,001 (ImageNet), Adam betas (0.5, 0.9), no EMA, no clipping; base lr 4.5e-6
  x the global batch, per-GPU batch 3 in the ImageNet config.

Inferred everywhere (no public config states them): the GPU count behind the scaled learning rates
(8), hence the global autoencoder batches (96 for LDM, 24 for taming) and learning rates; the
autoencoder step counts (both configs train until stopped); the held-out set (10,000 images).
Architecture differences: fastdae's autoencoder has attention in the mid block only (taming also puts
it in the 16x16 level's residual blocks); the discriminator's learning rate is the stage's, as in
both codebases.
"""

from __future__ import annotations

from typing import Any

from fastdae.config.schema import TrainConfig

GPUS_ASSUMED = 8  # inferred: the GPU count behind the published base-lr x batch scaling
LDM_BASE_LR, TAMING_BASE_LR = 4.5e-6, 4.5e-6  # per image of the global batch (their main.py scales it)
HOLDOUT = 10_000  # images held out of training for the end-of-stage evaluation (inferred)


def _data(flip: bool) -> dict[str, Any]:
    """A 256 px image folder (one subfolder per class); root is the user's (checked when a run starts)."""
    return {
        "name": "folder",
        "root": None,
        "size": 256,
        "resize": True,
        "crop": "center",
        "flip": flip,
        "holdout": HOLDOUT,
    }


def _ae_stage(per_gpu_batch: int, base_lr: float, steps: int, disc: dict[str, Any]) -> dict[str, Any]:
    """An autoencoder stage as LDM and taming train one: Adam (0.5, 0.9), lr = base lr x global batch,
    constant, no EMA, no clipping, L1 + LPIPS + the hinge GAN; the discriminator at the same lr."""
    batch = per_gpu_batch * GPUS_ASSUMED
    lr = base_lr * batch
    return {
        "steps": steps,
        "batch_size": batch,
        "lr": lr,
        "betas": [0.5, 0.9],
        "optimizer": "adam",
        "weight_decay": 0.0,
        "lr_schedule": "constant",
        "ema_decay": 0.0,
        "grad_clip": 0.0,
        "l1_weight": 1.0,
        "lpips_weight": 1.0,
        "disc": {"ndf": 64, "n_layers": 3, "lr": lr, **disc},
        "log_every": 100,
        "ckpt_every": 10_000,
    }


def _dit_prior(model: str, class_cond: bool) -> dict[str, Any]:
    """DiT's recipe (module docstring); unconditional datasets sample without guidance."""
    return {
        "model": model,
        "objective": "ddpm",
        "schedule": "linear",
        "time_sampling": "uniform",
        "num_timesteps": 1000,
        "optimizer": "adamw",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "grad_clip": 0.0,
        "batch_size": 256,
        "ema_decay": 0.9999,
        "steps": 400_000,
        "class_cond": class_cond,
        "sampler": "ddpm",
        "sample_steps": 250,
        "cfg_scale": 1.5 if class_cond else 1.0,
        "num_samples": 64,
        "judge_steps": 0,  # FID with `python -m fastdae sample` + `fid`; the judge is for the procedural data
        "log_every": 100,
        "ckpt_every": 50_000,
    }


def _common(out: str) -> dict[str, Any]:
    return {
        "out_dir": out,
        "weak_decoder": {"width_mult": 0.5, "num_res_blocks": 1, "dropout": 0.3},
        "cache": {"batch_size": 256, "shard_size": 4096, "flip": True},  # DiT trains on flipped copies too
        "num_workers": 8,
    }


def _imagenet_kl(model: str, out: str) -> TrainConfig:
    ae_steps = 100_000  # inferred (module docstring)
    disc = {"start": 50_001, "weight": 0.5}
    return TrainConfig.from_dict(
        {
            **_common(out),
            "data": _data(flip=True),
            "autoencoder": {
                "bottleneck": "kl",
                "ch": 128,
                "ch_mult": [1, 2, 4, 4],
                "num_res_blocks": 2,
                "z_channels": 4,
                "attn": True,
                "kl_weight": 1e-6,
            },
            "stage1": _ae_stage(12, LDM_BASE_LR, ae_steps, disc),
            "stage2": _ae_stage(12, LDM_BASE_LR, ae_steps, disc),
            "prior": _dit_prior(model, class_cond=True),
        }
    )


def imagenet256_kl() -> TrainConfig:
    """ImageNet 256 px, LDM's KL-f8 autoencoder (4 x 32 x 32 latents), DiT-XL/2 prior.

    Autoencoder stages: LDM's autoencoder_kl_32x32x4 recipe (module docstring): batch 12 per GPU x 8
    GPUs = 96 (GPU count inferred), lr 4.5e-6 x 96 = 4.32e-4, discriminator from step 50,001 at weight
    0.5, 100K steps each (inferred; joint: 200K). Prior: DiT-XL/2 (675M parameters) with DiT's recipe:
    AdamW lr 1e-4, no weight decay, batch 256, EMA 0.9999, 400K steps, DDPM 1,000 steps, 250 sampling
    steps, guidance 1.5. Set data.root to ImageNet's train folder (1,000 class subfolders)."""
    return _imagenet_kl("DiT-XL/2", "runs/imagenet256-kl")


def imagenet256_kl_b2() -> TrainConfig:
    """`imagenet256-kl` with a DiT-B/2 prior (130M parameters), DiT's recipe unchanged (the paper trains
    every size with the same optimiser, batch, EMA and 400K-step budget)."""
    return _imagenet_kl("DiT-B/2", "runs/imagenet256-kl-b2")


def _vqgan(out: str, disc_start: int, ae_steps: int, class_cond: bool) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            **_common(out),
            "data": _data(flip=True),
            "autoencoder": {
                "bottleneck": "vq",
                "ch": 128,
                "ch_mult": [1, 1, 2, 2, 4],
                "num_res_blocks": 2,
                "z_channels": 256,
                "attn": True,
                "num_codes": 1024,
                "vq_beta": 0.25,
            },
            "stage1": _ae_stage(3, TAMING_BASE_LR, ae_steps, {"start": disc_start, "weight": 0.8}),
            "stage2": _ae_stage(3, TAMING_BASE_LR, ae_steps, {"start": disc_start, "weight": 0.8}),
            # 16 x 16 codes of 256 dims; patch 1 gives the 256 tokens DiT sees on f=8 latents at patch 2
            "prior": _dit_prior("DiT-B/1", class_cond=class_cond),
        }
    )


def imagenet256_vq() -> TrainConfig:
    """ImageNet 256 px, taming's VQGAN f=16 with 1,024 codes (configs/imagenet_vqgan.yaml), DiT-B/1 prior.

    Autoencoder stages: batch 3 per GPU x 8 GPUs = 24 (GPU count inferred), lr 4.5e-6 x 24 = 1.08e-4,
    discriminator weight 0.8 from step 250,001 (the published start), 300K steps each (inferred, so
    that the GAN trains for the last 50K steps as in the published ordering; joint: 600K). Prior: a
    DiT-B/1 on the 256-dim codes (taming trains a transformer over code indices instead; the DiT and
    patch size are fastdae's choice, inferred), with DiT's recipe: AdamW lr 1e-4, batch 256, EMA
    0.9999, 400K steps, guidance 1.5; samples are snapped to the nearest code before decoding."""
    return _vqgan("runs/imagenet256-vq", disc_start=250_001, ae_steps=300_000, class_cond=True)


def ffhq256_vq() -> TrainConfig:
    """FFHQ 256 px (70,000 faces, unconditional), taming's face VQGAN: f=16, 1,024 codes, the
    architecture of the first stage in configs/faceshq_transformer.yaml.

    The face model's training config is not in the repository: the optimiser, lr 4.5e-6 x batch and
    discriminator weight 0.8 follow configs/imagenet_vqgan.yaml; the discriminator start 30,001 and
    100K steps per stage are inferred (taming's smaller-data configs start the GAN at 30,001). Batch
    3 x 8 GPUs = 24. Prior: DiT-B/1, unconditional (no guidance), DiT's recipe (AdamW lr 1e-4, batch
    256, EMA 0.9999, 400K steps). Set data.root to the FFHQ image folder (images directly in it: one
    class); 10,000 held out, as taming's FFHQ split."""
    return _vqgan("runs/ffhq256-vq", disc_start=30_001, ae_steps=100_000, class_cond=False)


PAPER = {
    "imagenet256-kl": imagenet256_kl,
    "imagenet256-kl-b2": imagenet256_kl_b2,
    "imagenet256-vq": imagenet256_vq,
    "ffhq256-vq": ffhq256_vq,
}
