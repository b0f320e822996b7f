"""Datasets: two procedural ones (no download; shapes is the default), image folders, numpy arrays.

Every dataset returns `(image, label)` with image float32 (3, H, W) in [-1, 1] and label an int64
scalar tensor, and defines `identity() -> dict` (what configures it and what it holds: a content
hash or per-file stats), which `dataset_fingerprint` hashes together with a few sampled items; the
latent cache stores that fingerprint in its manifest. Every dataset has `num_classes` (shapes: 4;
textures: 5; a folder: its class subfolders, 1 without; an array: 1 + its largest label, over all labels).

`split_dataset` cuts a dataset into the part training sees and the part only evaluation sees
(DataConfig.holdout, seeded by DataConfig.seed, stratified by class); training uses the first:

    ds = build_dataset(DataConfig())            # 8192 procedural 32x32 shape images
    ds = build_dataset(DataConfig(name="textures"))  # 8192 procedural 32x32 texture images
    ds = build_dataset(DataConfig(name="folder", root="imgs/", size=64, crop="random", flip=True))
    ds = build_dataset(DataConfig(name="array", root="faces.npz", size=64))
    train, heldout = split_dataset(ds, cfg)     # disjoint; together every item (procedural: see split_dataset)

One module per job: config.py (DataConfig, names, the pixel convention and the protocols that type
it: MapDataset, ImageDataset, LabeledDataset), procedural.py, folder_index.py
(the cached index of an image folder), folder.py (ImageFolder), arrays.py (ArrayDataset), build.py
(build_dataset), split.py (split_dataset, dataset_fingerprint).
"""

from fastdae.data.arrays import ArrayDataset
from fastdae.data.build import build_dataset
from fastdae.data.config import (
    CROPS,
    DATASETS,
    PROCEDURAL,
    DataConfig,
    DataError,
    ImageDataset,
    LabeledDataset,
    MapDataset,
)
from fastdae.data.folder import ImageFolder
from fastdae.data.folder_index import FolderIndex
from fastdae.data.procedural import ProceduralDataset, ProceduralShapes, ProceduralTextures
from fastdae.data.split import DatasetSplit, dataset_fingerprint, split_dataset, stratified_order

__all__ = [
    "ArrayDataset",
    "CROPS",
    "DATASETS",
    "DataConfig",
    "DataError",
    "DatasetSplit",
    "FolderIndex",
    "ImageDataset",
    "ImageFolder",
    "LabeledDataset",
    "MapDataset",
    "PROCEDURAL",
    "ProceduralDataset",
    "ProceduralShapes",
    "ProceduralTextures",
    "build_dataset",
    "dataset_fingerprint",
    "split_dataset",
    "stratified_order",
]
