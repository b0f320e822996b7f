"""The CPU-sized presets: `default` (the README's main job), `vq` (the studies' recipe), `tiny` (tests)."""

from __future__ import annotations

from fastdae.config.schema import TrainConfig


# ---- presets ----------------------------------------------------------------------------------
def _vq() -> TrainConfig:
    """The default preset until 2026-12-02, at which the studies in results/ ran: 32x32 procedural
    shapes, VQ-128 f=4, VQGAN's loss; its reconstructions and samples are grey (results/prior-diagnosis,
    third pass). The whole recipe in a few CPU minutes (sizes and steps measured on a 2-core machine)."""
    # GAN off: at this budget it raised stage 1's L1 at step 400 (0.18 -> 0.21) and made each step 1.5-3.5x slower
    # (results/prior-diagnosis); set weight 0.8 to turn it on for longer runs
    disc = dict(ndf=16, n_layers=2, start=200, weight=0.0)
    return TrainConfig.from_dict(
        {
            "out_dir": "runs/vq",
            "data": {"name": "shapes", "size": 32, "num_samples": 4096},
            "autoencoder": {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 4, "num_codes": 128},
            "weak_decoder": {"width_mult": 0.5, "num_res_blocks": 1, "dropout": 0.3},  # results/README.md: the ablation
            "stage1": {"steps": 400, "batch_size": 16, "lr": 2e-3, "disc": disc, "log_every": 50, "ckpt_every": 200},
            "stage2": {"steps": 400, "batch_size": 16, "lr": 2e-3, "disc": disc, "log_every": 50, "ckpt_every": 200},
            "cache": {"batch_size": 256, "shard_size": 2048},
            # lr 2e-3 x 4000 steps and guidance 6: at 3e-4 x 500 steps, cfg 1 the DiT had not begun to use the
            # label (samples at chance class accuracy); validity of 512 samples of one run after 3000 / 4000 / 5000
            # steps: 0.76 / 0.82 / 0.90 (results/prior-diagnosis). 256 samples: the judged rates have a standard error
            # of about 0.025 (0.05 with 64). The judge's classifier: 300 steps (~10 s). Logit-normal training
            # times instead of uniform ones: validity 0.805 -> 0.863 (seed 0), 0.785 -> 0.883 (seed 1), 0.914 -> 0.934
            # (seed 2) at 4000 steps, FD-feat 10.6 -> 5.1 on average; at 3000 logit-normal steps validity 0.84-0.87
            # on four runs, and the whole job fits 3 minutes again (results/prior-diagnosis, fifth pass)
            "prior": {
                "model": "DiT-T/2",
                "time_sampling": "logit_normal",
                "steps": 3000,
                "batch_size": 32,
                "lr": 2e-3,
                "warmup_steps": 100,
                "cfg_scale": 6.0,
                "sample_steps": 25,
                "num_samples": 256,
                "judge_steps": 300,
                "log_every": 50,
                "ckpt_every": 1000,
            },
        }
    )


def _default() -> TrainConfig:
    """The README's main job: the `vq` recipe with a KL bottleneck, a linear path from latent to pixels and
    the colour term, so that reconstructions and samples keep colour (results/prior-diagnosis, sixth pass)."""
    # VQ + linear path + chroma_weight 0.5 kept the colour but drew samples at validity 0.67 (3000 prior steps):
    # coloured shapes are combinations of codes a flow must hit exactly; KL latents are continuous (docs/paper.md
    # 2: a DiT on continuous latents) and reached validity 0.79-0.87 on four runs. The prior then takes batch 64
    # for 1700 steps at lr 3e-3 (sqrt-scaled), the same time as 32 x 3000: validity 0.789 -> 0.828 on one
    # autoencoder's latents. Fused Adam: 0.6 ms instead of 2.2 ms an update
    return TrainConfig.from_dict(
        {
            "out_dir": "runs/default",
            "autoencoder": {"bottleneck": "kl", "linear_skip": True},
            "stage1": {"chroma_weight": 0.5},
            "stage2": {"chroma_weight": 0.5},
            "prior": {"batch_size": 64, "steps": 1700, "lr": 3e-3, "fused": True},
        },
        base=_vq(),
    )


def _tiny() -> TrainConfig:
    """Seconds on a CPU: for tests."""
    disc = dict(ndf=8, n_layers=1, start=1)
    return TrainConfig.from_dict(
        {
            "out_dir": "runs/tiny",
            "data": {"name": "shapes", "size": 16, "num_samples": 64},
            "autoencoder": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 4, "num_codes": 16},
            "weak_decoder": {"width_mult": 0.5, "num_res_blocks": 1, "dropout": 0.1},
            "stage1": {"steps": 3, "batch_size": 8, "disc": disc, "log_every": 1, "ckpt_every": 2},
            "stage2": {"steps": 3, "batch_size": 8, "disc": disc, "log_every": 1, "ckpt_every": 2},
            "cache": {"batch_size": 32, "shard_size": 32},
            "prior": {
                "model": "DiT-T/2",
                "steps": 3,
                "batch_size": 8,
                "sample_steps": 2,
                "num_samples": 4,
                "judge_steps": 0,
                "log_every": 1,
                "ckpt_every": 2,
            },
            "progress": False,
        }
    )


SMALL = {"default": _default, "vq": _vq, "tiny": _tiny}
