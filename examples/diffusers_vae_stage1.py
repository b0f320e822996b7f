"""Bring your own stage 1: a diffusers AutoencoderKL (or VQModel) folder as the frozen encoder, its latents
cached once, a fresh DAE decoder in diffusers' architecture trained on them, exported back to diffusers.

    python examples/diffusers_vae_stage1.py [vae_folder]

    from fastdae.integrations import DiffusersDecoder, export_diffusers, load_stage1
    stage1 = load_stage1("my-vae")                       # frozen; posterior="mean" (default) or "sample"
    cache = LatentCache.build(root, dataset, stage1.encode_fields, encoder_sha256=stage1.sha256, ...)
    decoder = DiffusersDecoder.from_source("my-vae")     # diffusers' Decoder + post_quant_conv, fresh
    export_diffusers(decoder, "my-vae", "my-vae-dae")    # AutoencoderKL.from_pretrained("my-vae-dae")
    fastdae.train({"stages": ["cache", "stage2", "prior", "samples"], "stage1": {"encoder": "my-vae"}, ...})

Without an argument a small randomly initialised AutoencoderKL stands in for a pretrained one (nothing
is downloaded); pass a local diffusers VAE folder to use yours. The hand-written stage 2 is plain L1
for a few steps, enough to show the pieces fit; then fastdae.train runs the whole recipe on the same
folder at the tiny preset's steps (with its LPIPS/GAN losses, the DiT and samples). Needs diffusers;
prints "skipped" without it.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

import fastdae
from fastdae.cache import LatentCache
from fastdae.config import apply_overrides, preset
from fastdae.data import ProceduralShapes, dataset_fingerprint
from fastdae.integrations import DiffusersDecoder, export_diffusers, load_stage1

STEPS = 40
BATCH = 16


def main(tmp: Path, source: Path | None) -> None:
    try:
        import diffusers
    except ImportError as e:
        print(f"skipped: diffusers is not installed ({e})")
        return
    torch.manual_seed(0)
    if source is None:  # a stand-in for a pretrained VAE: same layout, random weights, 16x16 -> 8x8x4
        source = tmp / "vae"
        diffusers.AutoencoderKL(
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
        ).save_pretrained(source)

    stage1 = load_stage1(source)
    dataset = ProceduralShapes(256, size=8 * stage1.downsample)  # 8x8 latents
    t0 = time.perf_counter()
    cache = LatentCache.build(
        tmp / "cache",
        dataset,
        stage1.encode_fields,
        batch_size=64,
        encoder_sha256=stage1.sha256,
        dataset_fingerprint=dataset_fingerprint(dataset),
        progress=False,
    )
    print(
        f"cached {len(cache)} {stage1.kind} latents of {stage1.source_class} (fields {sorted(cache.fields)}, "
        f"{stage1.latent_channels} channels, /{stage1.downsample}) in {time.perf_counter() - t0:.1f} s"
    )

    decoder = DiffusersDecoder.from_source(source)  # stage 2: fresh weights; the encoder never runs again
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    losses = []
    for _, (fields, x) in zip(range(STEPS), cache.paired_loader(dataset, BATCH, seed=0), strict=False):
        with torch.no_grad():
            z = stage1.latent(fields)  # (B, C, h, w): the posterior mean (or the VQ code vectors)
        loss = (decoder(z) - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"stage 2: L1 {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f} over {STEPS} steps")
    assert sum(losses[-5:]) / 5 < losses[0]

    out = export_diffusers(decoder.eval(), source, tmp / "vae-dae")
    vae = getattr(diffusers, stage1.source_class).from_pretrained(out, local_files_only=True).eval()
    fields = cache.gather(list(range(8)))
    with torch.no_grad():
        z = stage1.latent(fields, sample=False)
        diff = (vae.decode(z).sample - decoder(z)).abs().max().item()
    print(
        f"exported to {out.name}/ ({sorted(p.name for p in out.iterdir())}); "
        f"{stage1.source_class}.from_pretrained(...).decode vs fastdae's decoder: max |diff| {diff:.1e}"
    )
    assert diff < 1e-5

    # the same through fastdae's trainer: cache, stage 2 with its losses, the DiT prior and samples
    cfg = apply_overrides(
        preset("tiny"),
        [
            f"out_dir={tmp / 'run'}",
            "stages=cache,stage2,prior,samples",
            f"stage1.encoder={source}",
            f"data.size={8 * stage1.downsample}",
        ],
    )
    result = fastdae.train(cfg)
    stage2 = result.metrics["stages"]["stage2"]
    print(
        f"fastdae.train: stage 2 wrote {Path(stage2['diffusers']).relative_to(tmp)}/, samples in "
        f"{result.sample_grid.relative_to(tmp)}"
    )
    assert getattr(diffusers, stage1.source_class).from_pretrained(stage2["diffusers"], local_files_only=True)
    print(
        "ok: the exported diffusers model decodes the cached latents as the trained decoder does; "
        "fastdae.train ran cache, stage 2, prior and samples on the same folder"
    )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(Path(d), Path(sys.argv[1]) if len(sys.argv) > 1 else None)
