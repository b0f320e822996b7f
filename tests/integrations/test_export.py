"""fastdae.integrations.export: save_pretrained / load_pretrained round trips and their errors.
(That loading never imports fastdae.training is checked in test_integrations.py, in one subprocess.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdae.integrations.export import CONFIG_FILE, WEIGHTS_FILE, load_pretrained, save_pretrained
from fastdae.models.autoencoder import Autoencoder, AutoencoderConfig, WeakDecoderConfig, build_decoder


def tiny_config(bottleneck: str = "kl", **overrides) -> AutoencoderConfig:
    fields = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, num_codes=16)
    return AutoencoderConfig(bottleneck=bottleneck, **{**fields, **overrides})


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


WEAK = WeakDecoderConfig(width_mult=0.5, num_res_blocks=1, dropout=0.2)


@pytest.mark.parametrize("weak", [None, WEAK], ids=["full", "weak"])
def test_decoder_round_trip(tmp_path, weak):
    cfg = tiny_config(attn=True)
    decoder = build_decoder(cfg, weak)
    save_pretrained(decoder, tmp_path, cfg, weak=weak)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["kind"] == "decoder" and meta["autoencoder"]["ch"] == 8
    assert (meta["weak_decoder"] is None) == (weak is None)

    loaded = load_pretrained(tmp_path)
    assert type(loaded) is type(decoder) and not loaded.training
    assert_same_state(decoder, loaded)
    z = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(loaded(z), decoder.eval()(z), rtol=0, atol=0)


@pytest.mark.parametrize("bottleneck", ["kl", "vq"])
def test_autoencoder_round_trip(tmp_path, bottleneck):
    cfg = tiny_config(bottleneck)
    model = Autoencoder(cfg, build_decoder(cfg)).eval()
    save_pretrained(model, tmp_path / "ae", cfg)
    loaded = load_pretrained(tmp_path / "ae")
    assert isinstance(loaded, Autoencoder) and loaded.cfg == cfg
    assert_same_state(model, loaded)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    fields, latents = model.encode_fields(x)
    loaded_fields, loaded_latents = loaded.encode_fields(x)
    assert fields.keys() == loaded_fields.keys()
    torch.testing.assert_close(loaded_latents, latents, rtol=0, atol=0)
    torch.testing.assert_close(loaded.decoder(latents), model.decoder(latents), rtol=0, atol=0)


def test_load_rejects_config_that_does_not_fit_the_weights(tmp_path):
    cfg = tiny_config()
    save_pretrained(build_decoder(cfg), tmp_path, cfg)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["autoencoder"]["z_channels"] = 8  # conv_in now expects 8 input channels
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    expected = r"tensor 'conv_in.weight' has shape \(16, 4, 3, 3\), but the config implies \(16, 8, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        load_pretrained(tmp_path)


def test_load_rejects_edited_weights(tmp_path):
    cfg = tiny_config()
    save_pretrained(build_decoder(cfg), tmp_path, cfg)
    state = load_file(str(tmp_path / WEIGHTS_FILE))
    state["conv_out.bias"] = torch.zeros(4)
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"'conv_out.bias' has shape \(4,\), but the config implies \(3,\)"):
        load_pretrained(tmp_path)
    del state["conv_out.bias"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    expected = r"missing 1 tensor\(s\) .*'conv_out.bias'.*1 tensor\(s\) the config does not build: \['extra.weight'\]"
    with pytest.raises(ValueError, match=expected):
        load_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load_pretrained(tmp_path / "nowhere")
    cfg = tiny_config()
    save_pretrained(build_decoder(cfg), tmp_path, cfg)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors does not exist"):
        load_pretrained(tmp_path)


def test_save_rejects_wrong_config_or_module(tmp_path):
    cfg = tiny_config()
    expected = (
        r"save_pretrained\(Decoder\): tensor 'conv_in.weight' has shape \(16, 4, 3, 3\), "
        r"but the config implies \(32, 4, 3, 3\)"
    )
    with pytest.raises(ValueError, match=expected):
        save_pretrained(build_decoder(cfg), tmp_path / "out", tiny_config(ch=16))
    assert not (tmp_path / "out").exists(), "nothing is written when the module does not fit its config"
    with pytest.raises(TypeError, match="must be a fastdae Decoder or Autoencoder"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path, cfg)
    with pytest.raises(TypeError, match="config must be an AutoencoderConfig"):
        save_pretrained(build_decoder(cfg), tmp_path, {"ch": 8})


def test_load_rejects_foreign_or_newer_configs(tmp_path):
    cfg = tiny_config()
    save_pretrained(build_decoder(cfg), tmp_path, cfg)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**meta, "autoencoder": {**meta["autoencoder"], "wings": 2}}))
    with pytest.raises(ValueError, match=r"unknown AutoencoderConfig field\(s\) \['wings'\]"):
        load_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="not a fastdae export"):
        load_pretrained(tmp_path)


def test_load_builds_on_the_meta_device_before_checking(tmp_path, monkeypatch):
    """A config.json that does not fit the weights (or asks for a huge model) fails before any weight
    is allocated: the module is built on the meta device, checked, then materialised."""
    import fastdae.integrations.export as export

    built = []
    real = export.build_decoder

    def recording(*args, **kwargs):
        module = real(*args, **kwargs)
        built.append(next(module.parameters()).device.type)
        return module

    monkeypatch.setattr(export, "build_decoder", recording)
    cfg = tiny_config()
    save_pretrained(build_decoder(cfg), tmp_path, cfg)
    built.clear()
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["autoencoder"]["ch"] = 4096  # ~GBs if allocated
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="conv_in.weight"):
        load_pretrained(tmp_path)
    assert built == ["meta"]
    meta["autoencoder"]["ch"] = 8
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    loaded = load_pretrained(tmp_path)
    assert built == ["meta", "meta"] and next(loaded.parameters()).device.type == "cpu"
    assert not any(t.is_meta for t in loaded.state_dict().values())


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("ch", "8", r"'ch'.*int"),
        ("ch", 8.5, r"'ch'.*int"),
        ("ch_mult", [1.5, 2], r"'ch_mult'.*int"),
        ("ch_mult", "12", r"'ch_mult'.*list"),
        ("attn", "yes", r"'attn'.*bool"),
        ("kl_weight", "small", r"'kl_weight'.*float"),
        ("ch", True, r"'ch'.*int"),
    ],
)
def test_load_checks_the_types_of_config_fields(tmp_path, field, value, match):
    cfg = tiny_config()
    save_pretrained(build_decoder(cfg), tmp_path, cfg)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["autoencoder"][field] = value
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        load_pretrained(tmp_path)
