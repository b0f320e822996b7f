"""Models: autoencoder.py (Encoder, Decoder, bottlenecks), discriminator.py, dit.py, diffusion.py."""
