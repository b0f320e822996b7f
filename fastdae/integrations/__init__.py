"""Adapters for other codebases (taming quantizer, DiT/timm attention patching, diffusers processor, export,
a diffusers AutoencoderKL/VQModel or taming VQGAN as the frozen stage 1).
A leaf: nothing in fastdae imports it. The frozen stage-1 sources themselves live in
fastdae.pretrained (the trainer uses them); their names are re-exported here for other codebases.
Third-party libraries are imported only inside functions.

    VectorQuantizer2(n_e, e_dim, beta)       taming-transformers' quantizer over fastdae.vector_quantize
    patch_vq(model)                          taming VectorQuantizer2 modules -> the one above, weights kept
    patch_attention(model)                   timm/DiT-style Attention modules -> fastdae.nn.Attention
    FastDAEAttnProcessor()                   diffusers attention processor over fastdae.attention
    save_pretrained(module, path, config)    model.safetensors + config.json
    load_pretrained(path)                    rebuilds the saved decoder/autoencoder without fastdae.train
    load_stage1(folder)                      a local diffusers AutoencoderKL/VQModel as the frozen stage 1
    DiffusersDecoder.from_source(folder)     stage-2 decoder in diffusers' architecture
    export_diffusers(decoder, folder, out)   -> a diffusers folder `from_pretrained` loads
    load_taming_stage1(ckpt, yaml)           a taming VQGAN checkpoint as the frozen stage 1
    TamingDecoder, export_taming             its stage-2 decoder and the checkpoint it exports to
    save_dit(dit, path, diffusion, scaler)   the DiT prior (+ what sampling needs), same file pair
    load_dit(path)                           PretrainedDiT(dit, diffusion, scaler)

Names resolve lazily, so importing this package loads no kernels.
"""

from __future__ import annotations

from fastdae._lazy import lazy_exports

_EXPORTS = {
    "VectorQuantizer2": "fastdae.integrations.taming",
    "patch_vq": "fastdae.integrations.taming",
    "patch_attention": "fastdae.integrations.attention",
    "FastDAEAttnProcessor": "fastdae.integrations.diffusers",
    "save_pretrained": "fastdae.integrations.export",
    "load_pretrained": "fastdae.integrations.export",
    "load_stage1": "fastdae.pretrained.diffusers_vae",
    "DiffusersStage1": "fastdae.pretrained.diffusers_vae",
    "DiffusersDecoder": "fastdae.pretrained.diffusers_vae",
    "export_diffusers": "fastdae.pretrained.diffusers_vae",
    "FrozenStage1": "fastdae.pretrained.diffusers_vae",
    "load_taming_stage1": "fastdae.pretrained.taming_vqgan",
    "TamingDecoder": "fastdae.pretrained.taming_vqgan",
    "export_taming": "fastdae.pretrained.taming_vqgan",
    "save_dit": "fastdae.integrations.dit_export",
    "load_dit": "fastdae.integrations.dit_export",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
