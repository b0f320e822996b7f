"""`build_dataset`: the dataset a DataConfig names."""

from __future__ import annotations

from torch.utils.data import Dataset

from fastdae.data.arrays import ArrayDataset
from fastdae.data.config import (
    PROCEDURAL,
    DataConfig,
)
from fastdae.data.folder import ImageFolder
from fastdae.data.folder_index import ImageFileError
from fastdae.data.procedural import (
    ProceduralShapes,
    ProceduralTextures,
)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def build_dataset(cfg: DataConfig) -> Dataset:
    """The dataset a DataConfig names, with images of cfg.size x cfg.size."""
    if cfg.name not in PROCEDURAL:
        cfg.require_root()  # a config builds without a root (the paper-scale presets); a dataset does not
    if cfg.name in PROCEDURAL:
        return (ProceduralShapes if cfg.name == "shapes" else ProceduralTextures)(cfg.num_samples, cfg.size, cfg.seed)
    if cfg.name == "folder":
        return ImageFolder(cfg.root, cfg.size, cfg.resize, cfg.crop, cfg.flip)  # type: ignore[arg-type]
    ds = ArrayDataset(cfg.root)  # type: ignore[arg-type]
    if ds.image_size != (cfg.size, cfg.size):
        raise ImageFileError(
            f"{cfg.root}: images are {ds.image_size[1]}x{ds.image_size[0]}, DataConfig.size is {cfg.size}"
        )
    return ds
