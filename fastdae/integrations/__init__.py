"""Adapters for other codebases (DiT/timm attention patching, diffusers processor, export).
Never imported by the rest of fastdae; imports third-party libraries only inside functions."""
