"""Export a trained decoder as model.safetensors + config.json and load it without fastdae's trainer.

    python examples/export_decoder.py [out_dir]

The loader rebuilds the module from config.json alone (fastdae.models.autoencoder) and checks every
tensor's name and shape before loading.
"""

import sys
import tempfile
from pathlib import Path

import torch

from fastdae.integrations import load_pretrained, save_pretrained
from fastdae.models.autoencoder import AutoencoderConfig, build_decoder


def main(out: Path) -> None:
    torch.manual_seed(0)
    cfg = AutoencoderConfig(bottleneck="kl", ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=4)
    decoder = build_decoder(cfg).eval()  # in a real run: the stage-2 decoder (TrainConfig.autoencoder as cfg)

    save_pretrained(decoder, out, cfg)
    print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")

    loaded = load_pretrained(out)  # in another program: from fastdae.integrations import load_pretrained
    z = torch.randn(2, 4, 8, 8)  # (B, z_channels, h, w) latents
    with torch.no_grad():
        diff = (loaded(z) - decoder(z)).abs().max().item()
    print(
        f"loaded {type(loaded).__name__} with {sum(p.numel() for p in loaded.parameters())} parameters; "
        f"max |output difference| {diff:.1e}"
    )
    assert diff == 0.0
    print("ok: the loaded decoder reproduces the saved one exactly")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:  # a temporary directory, removed afterwards
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp) / "dae-decoder")
