"""Bring your own stage 1 from taming-transformers: a VQGAN checkpoint + its YAML as the frozen encoder,
its codes cached once, a fresh decoder in taming's architecture trained on them, exported back to a
checkpoint taming's VQModel loads.

    python examples/taming_vqgan_stage1.py [last.ckpt config.yaml]

    from fastdae.integrations import TamingDecoder, export_taming, load_taming_stage1
    stage1 = load_taming_stage1("vqgan/last.ckpt", "vqgan/config.yaml")        # frozen, codes via fastdae
    decoder = TamingDecoder.from_source("vqgan/last.ckpt", "vqgan/config.yaml") # fresh weights
    export_taming(decoder, "vqgan/last.ckpt", "vqgan/config.yaml", "vqgan-dae") # last.ckpt + config.yaml

Without arguments a small random VQGAN stands in for a trained one. Stage 2 here is plain L1 for a few
steps; fastdae's trainer adds LPIPS and the GAN. Needs taming-transformers
(`pip install --no-deps taming-transformers-rom1504==0.0.6`); prints "skipped" without it.
"""

import sys
import tempfile
from pathlib import Path

import torch
import yaml
from torch import nn

from fastdae.cache import LatentCache
from fastdae.data import ProceduralShapes, dataset_fingerprint
from fastdae.integrations import TamingDecoder, export_taming, load_taming_stage1

STEPS = 30
BATCH = 16


def stand_in_vqgan(folder: Path) -> tuple[Path, Path]:
    """taming's VQModel parts with random weights, saved as taming's training saves them."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder

    dd = dict(
        double_z=False,
        z_channels=32,
        resolution=16,
        in_channels=3,
        out_ch=3,
        ch=32,
        ch_mult=[1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    )
    parts = {
        "encoder": Encoder(**dd),
        "decoder": Decoder(**dd),
        "quant_conv": nn.Conv2d(32, 4, 1),
        "post_quant_conv": nn.Conv2d(4, 32, 1),
    }
    state = {f"{name}.{k}": v for name, m in parts.items() for k, v in m.state_dict().items()}
    state["quantize.embedding.weight"] = torch.randn(64, 4) * 0.1
    folder.mkdir()
    torch.save({"state_dict": state, "global_step": 0}, folder / "last.ckpt")
    (folder / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {
                    "target": "taming.models.vqgan.VQModel",
                    "params": {"embed_dim": 4, "n_embed": 64, "ddconfig": dd},
                }
            }
        )
    )
    return folder / "last.ckpt", folder / "config.yaml"


def main(tmp: Path, ckpt: Path | None, config: Path | None) -> None:
    try:
        from taming.modules.diffusionmodules.model import Decoder
    except ImportError as e:
        print(f"skipped: taming-transformers is not installed ({e})")
        return
    torch.manual_seed(0)
    if ckpt is None:
        ckpt, config = stand_in_vqgan(tmp / "vqgan")

    stage1 = load_taming_stage1(ckpt, config)
    dataset = ProceduralShapes(128, size=8 * stage1.downsample)  # 8x8 codes
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
        f"cached {len(cache)} code maps (fields {sorted(cache.fields)}, {stage1.num_codes} codes of dim "
        f"{stage1.latent_channels}, /{stage1.downsample})"
    )

    decoder = TamingDecoder.from_source(ckpt, config)
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    losses = []
    for _, (fields, x) in zip(range(STEPS), cache.paired_loader(dataset, BATCH, seed=0), strict=False):
        loss = (decoder(stage1.latent(fields)) - x).abs().mean()  # z_q (B, D, h, w) -> (B, 3, H, W)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"stage 2: L1 {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f} over {STEPS} steps")
    assert sum(losses[-5:]) / 5 < losses[0]

    out = export_taming(decoder.eval(), ckpt, config, tmp / "vqgan-dae")
    params = yaml.safe_load((out / "config.yaml").read_text())["model"]["params"]
    state = torch.load(out / "last.ckpt", weights_only=True)["state_dict"]
    theirs = nn.ModuleDict(
        {
            "decoder": Decoder(**params["ddconfig"]),
            "post_quant_conv": nn.Conv2d(params["embed_dim"], params["ddconfig"]["z_channels"], 1),
        }
    )
    theirs.load_state_dict({k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))})
    z_q = stage1.latent(cache.gather(list(range(8))))
    with torch.no_grad():  # taming's VQModel.decode: decoder(post_quant_conv(quant))
        diff = (theirs.eval()["decoder"](theirs["post_quant_conv"](z_q)) - decoder(z_q)).abs().max().item()
    print(
        f"exported {sorted(p.name for p in out.iterdir())}; taming's decode vs fastdae's decoder: max |diff| {diff:.1e}"
    )
    assert diff < 1e-5
    print("ok: the exported checkpoint decodes the cached codes as the trained decoder does")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        args = [Path(a) for a in sys.argv[1:3]]
        main(Path(d), *(args if len(args) == 2 else (None, None)))
