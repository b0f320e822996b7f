"""Frozen stage-1 sources: a pretrained autoencoder's encoder used in place of fastdae's stage 1
(`stage1.encoder`), and the stage-2 decoder trained in that source's own architecture.

    source.py         which source a folder holds; load_stage1, latent_shape, build_decoder, export_decoder
    diffusers_vae.py  a local diffusers AutoencoderKL / VQModel folder (FrozenStage1, DiffusersDecoder)
    taming_vqgan.py   a taming VQGAN checkpoint + YAML (TamingDecoder, export_taming)

Third-party libraries (diffusers, taming) are imported inside functions only.
"""
