"""fastdae.pretrained.taming_vqgan against taming-transformers' own modules: a small random VQGAN
checkpoint + YAML (as taming's training writes them) is the frozen stage 1; its codes equal taming's
VectorQuantizer2's, and the exported checkpoint, loaded into taming's Decoder, decodes like our decoder."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from fastdae.pretrained.taming_vqgan import TamingDecoder, export_taming, load_taming_stage1, read_taming_config

quantize = pytest.importorskip(
    "taming.modules.vqvae.quantize", reason="pip install --no-deps taming-transformers-rom1504"
)
from taming.modules.diffusionmodules.model import Decoder, Encoder  # noqa: E402

DD = dict(
    double_z=False,
    z_channels=8,
    resolution=16,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 1],  # GroupNorm(32)
    num_res_blocks=1,
    attn_resolutions=[8],
    dropout=0.0,
)
K, D = 32, 4
ATOL = 1e-5


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (B, 3, H, W)


def prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def save_vqgan(folder, **params) -> nn.ModuleDict:
    """taming's VQModel parts with random weights (codes on the encoder's outputs, as after training),
    saved as last.ckpt (Lightning layout, with a loss.* entry) + config.yaml."""
    torch.manual_seed(0)
    m = nn.ModuleDict(
        {
            "encoder": Encoder(**DD),
            "decoder": Decoder(**DD),
            "quant_conv": nn.Conv2d(8, D, 1),
            "post_quant_conv": nn.Conv2d(D, 8, 1),
            "quantize": quantize.VectorQuantizer2(K, D, beta=0.25),
        }
    )
    with torch.no_grad():
        h = m["quant_conv"](m["encoder"](images(8, seed=1)))
        flat = h.permute(0, 2, 3, 1).reshape(-1, D)
        m["quantize"].embedding.weight.copy_(flat[torch.randperm(len(flat))[:K]])
    state = {k: v for name, part in m.items() for k, v in prefixed(name, part).items()}
    state["loss.logvar"] = torch.zeros(())
    folder.mkdir()
    torch.save({"state_dict": state, "global_step": 10, "epoch": 1}, folder / "last.ckpt")
    config = {
        "model": {
            "base_learning_rate": 4.5e-6,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": D,
                "n_embed": K,
                "ddconfig": DD,
                "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"},
                **params,
            },
        }
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return m.eval()


def test_encode_decode_export(tmp_path):
    src = tmp_path / "vqgan"
    m = save_vqgan(src)
    stage1 = load_taming_stage1(src / "last.ckpt", src / "config.yaml")
    assert (stage1.kind, stage1.latent_channels, stage1.num_codes, stage1.downsample) == ("vq", D, K, 2)
    x = images()
    fields, stats = stage1.encode_fields(x)
    with torch.no_grad():
        z_q, _, (_, _, idx) = m["quantize"](m["quant_conv"](m["encoder"](x)))  # taming's VQModel.encode
    assert torch.equal(fields["indices"], idx.view(3, 8, 8))
    torch.testing.assert_close(stage1.latent(fields), z_q, rtol=0, atol=ATOL)
    torch.testing.assert_close(stats, z_q, rtol=0, atol=ATOL)

    decoder = TamingDecoder.from_source(src / "last.ckpt", src / "config.yaml").eval()
    assert not torch.equal(decoder.last_layer, m["decoder"].conv_out.weight)  # fresh weights
    with torch.no_grad():
        x_hat = decoder(z_q)
    out = export_taming(decoder, src / "last.ckpt", src / "config.yaml", tmp_path / "dae")
    state = torch.load(out / "last.ckpt", weights_only=True)["state_dict"]
    source = torch.load(src / "last.ckpt", weights_only=True)["state_dict"]
    assert state.keys() == source.keys()  # taming's init_from_ckpt finds every key it expects
    theirs = nn.ModuleDict({"decoder": Decoder(**DD), "post_quant_conv": nn.Conv2d(D, 8, 1)}).eval()
    theirs.load_state_dict({k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))})
    with torch.no_grad():  # taming's VQModel.decode
        torch.testing.assert_close(theirs["decoder"](theirs["post_quant_conv"](z_q)), x_hat, rtol=0, atol=ATOL)
    assert load_taming_stage1(out / "last.ckpt", out / "config.yaml").sha256 == stage1.sha256


def test_decoder_from_source_weights(tmp_path):
    m = save_vqgan(tmp_path / "vqgan")
    decoder = TamingDecoder.from_source(
        tmp_path / "vqgan" / "last.ckpt", tmp_path / "vqgan" / "config.yaml", init="source"
    ).eval()
    z = torch.randn(2, D, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(decoder(z), m["decoder"](m["post_quant_conv"](z)), rtol=0, atol=ATOL)


def test_rejects_what_it_does_not_support(tmp_path):
    save_vqgan(tmp_path / "remap", remap="used.npy")
    with pytest.raises(ValueError, match="without remap"):
        read_taming_config(tmp_path / "remap" / "config.yaml")
    (tmp_path / "gumbel.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {
                    "target": "taming.models.vqgan.GumbelVQ",
                    "params": {"ddconfig": DD, "n_embed": K, "embed_dim": D},
                }
            }
        )
    )
    with pytest.raises(ValueError, match="GumbelVQ"):
        read_taming_config(tmp_path / "gumbel.yaml")


def test_pretrained_folder_layouts(tmp_path):
    """fastdae.pretrained.source tells the layouts apart: export_taming's and taming's log folder."""
    from fastdae.pretrained.source import latent_shape, source_kind, taming_files

    save_vqgan(tmp_path / "flat")
    assert source_kind(tmp_path / "flat") == "taming" and latent_shape(tmp_path / "flat") == (D, 2)
    logs = tmp_path / "logs"
    (logs / "checkpoints").mkdir(parents=True)
    (logs / "configs").mkdir()
    (tmp_path / "flat" / "last.ckpt").rename(logs / "checkpoints" / "last.ckpt")
    (tmp_path / "flat" / "config.yaml").rename(logs / "configs" / "2021-01-01T00-00-00-project.yaml")
    assert taming_files(logs) == (
        logs / "checkpoints" / "last.ckpt",
        logs / "configs" / "2021-01-01T00-00-00-project.yaml",
    )
    with pytest.raises(FileNotFoundError, match="neither a diffusers model folder"):
        source_kind(tmp_path / "flat")  # emptied


def test_train_with_taming_stage1(tmp_path):
    """fastdae.train with stage1.encoder = a taming VQGAN folder: cache (codes) -> stage 2 (taming's
    Decoder) -> prior -> samples; stage2/taming/last.ckpt decodes the cached codes as the trained decoder."""
    import fastdae
    from fastdae.cache import LatentCache
    from fastdae.config import apply_overrides, preset
    from fastdae.training.checkpoint import load_weights

    save_vqgan(tmp_path / "vqgan")
    cfg = apply_overrides(
        preset("tiny"),
        [f"out_dir={tmp_path / 'run'}", "stages=cache,stage2,prior,samples", f"stage1.encoder={tmp_path / 'vqgan'}"],
    )
    result = fastdae.train(cfg)
    stages = result.metrics["stages"]
    assert sorted(stages["cache"]["fields"]) == ["indices", "label"] and result.sample_grid.is_file()
    out = tmp_path / "run" / "stage2" / "taming"
    assert stages["stage2"]["taming"] == str(out)
    stage1 = load_taming_stage1(out / "last.ckpt", out / "config.yaml")
    LatentCache(tmp_path / "run" / "cache").check(encoder_sha256=stage1.sha256)  # same encoder as the source
    decoder = TamingDecoder.from_source(out / "last.ckpt", out / "config.yaml", init="source").eval()
    trained = TamingDecoder.from_source(out / "last.ckpt", out / "config.yaml")
    load_weights(tmp_path / "run" / "stage2" / "decoder.safetensors", trained)
    z_q = stage1.latent(LatentCache(tmp_path / "run" / "cache").gather([0, 1]))
    with torch.no_grad():
        torch.testing.assert_close(decoder(z_q), trained.eval()(z_q), rtol=0, atol=0)
