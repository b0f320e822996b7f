"""The on-disk latent cache: one pass of the frozen encoder over the dataset, read back fast.

    cache = LatentCache.build("run/cache", dataset, encode, encoder_sha256=sha, dataset_fingerprint=fp)
    cache = LatentCache("run/cache")                       # later: verifies every shard's sha256
    for batch in cache.loader(256, seed=0):                # dict[str, Tensor], prefetched
        ...
    for fields, images in cache.paired_loader(dataset, 64):  # stage 2: latents + their images

One module per job: format.py (names, dtypes, the manifest's schema and checksum, the flip index
space), writer.py (`build`: shards, sidecars, statistics, manifest), reader.py (`LatentCache`:
verified memory maps, `gather`), loader.py (`CacheLoader`).

Shards are safetensors files: one file per shard holds every field, so a shard is one atomic
rename and one checksum; the format is self-describing (names, dtypes, shapes, offsets in a JSON
header), has no pickle, is readable by any safetensors tool, and its data sections are plain
little-endian arrays at known offsets, which the reader memory-maps with numpy (safetensors' own
loaders copy tensors out, which would defeat batched fancy indexing over the map).

Fields: what `encode` returns, plus "label". Integer fields are stored in the smallest integer
dtype that holds each shard's values (the manifest gives the promoted dtype over all shards);
float fields are stored as float16. Reads return int64 and float32 tensors.
"""

from fastdae.cache.format import CacheError
from fastdae.cache.loader import CacheLoader
from fastdae.cache.reader import LatentCache

__all__ = ["CacheError", "CacheLoader", "LatentCache"]
