"""`build_dataset`: the dataset a DataConfig names."""

from __future__ import annotations

from fastdae.data.arrays import ArrayDataset
from fastdae.data.config import (
    PROCEDURAL,
    DataConfig,
    LabeledDataset,
)
from fastdae.data.folder import ImageFolder
from fastdae.data.folder_index import ImageFileError
from fastdae.data.procedural import (
    ProceduralDataset,
    ProceduralShapes,
    ProceduralTextures,
)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def build_dataset(cfg: DataConfig) -> ProceduralDataset | LabeledDataset:
    """The dataset a DataConfig names, with images of cfg.size x cfg.size."""
    if cfg.name in PROCEDURAL:
        return (ProceduralShapes if cfg.name == "shapes" else ProceduralTextures)(cfg.num_samples, cfg.size, cfg.seed)
    root = cfg.require_root()  # a config builds without a root (the paper-scale presets); a dataset does not
    if cfg.name == "folder":
        return ImageFolder(root, cfg.size, cfg.resize, cfg.crop, cfg.flip)
    ds = ArrayDataset(root)
    if ds.image_size != (cfg.size, cfg.size):
        raise ImageFileError(
            f"{cfg.root}: images are {ds.image_size[1]}x{ds.image_size[0]}, DataConfig.size is {cfg.size}"
        )
    return ds
