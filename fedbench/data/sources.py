"""Reading what tasks are built from: seeded random streams and subsamples, a dataset's official
train/test arrays, Hugging Face datasets, image files, and the in-memory pool of decoded images.

Task modules (``fedbench.tasks``) share these helpers; nothing here knows about any one dataset.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fedbench.data.pool import empty_pool
from fedbench.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------------------------
# Randomness: one generator per use, so that changing one option does not reshuffle another.
# --------------------------------------------------------------------------------------------


def stream_rng(seed: int, stream: int, *more: int) -> np.random.Generator:
    """The generator ``np.random.default_rng([seed, stream, *more])`` of one use of randomness
    (``stream`` names the use; ``more``, e.g. a domain's position, splits it further)."""
    return np.random.default_rng([seed, stream, *more])


def subsample(n: int, keep: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded subsample of ``keep`` of ``n`` positions (all when keep is 0 or >= n), in order."""
    if keep == 0 or keep >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=keep, replace=False))


@dataclass
class RawImages:
    """A dataset as its official train and test sets: uint8 [N,C,H,W] pixels, int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]
    source: str


# --------------------------------------------------------------------------------------------
# Hugging Face datasets (the optional hub extra).
# --------------------------------------------------------------------------------------------


def import_datasets(howto: str, reading: str = "reading a Hugging Face dataset") -> Any:
    """The ``datasets`` package; when it is missing, a DataError saying what ``reading`` needs
    and ``howto`` get the data another way."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{reading} needs the datasets package: pip install 'fedbench[hub]'. {howto}") from exc
    return datasets


def hf_column(ds: Any, names: tuple[str, ...], where: str, howto: str) -> str:
    """The first of ``names`` that is a column of ``ds``."""
    for name in names:
        if name in ds.column_names:
            return name
    raise DataError(f"{where} has no column {' or '.join(names)} (columns: {', '.join(ds.column_names)}). {howto}")


def hf_value_names(ds: Any, column: str, values: list[Any]) -> list[str]:
    """A column's values as strings: ClassLabel integers become their names."""
    names = getattr(ds.features.get(column), "names", None)
    if names and values and isinstance(values[0], (int, np.integer)):
        return [str(names[int(v)]) for v in values]
    return [str(v) for v in values]


def hf_images(ds: Any, rows: np.ndarray, image_col: str, where: str) -> Iterable[np.ndarray]:
    """The images in column ``image_col`` of the given rows, in order, as uint8 [H,W,3]."""
    sel = ds.select(rows.tolist()).select_columns([image_col])
    for i, row in enumerate(sel):
        image = row[image_col]
        if not isinstance(image, Image.Image):
            raise DataError(f"{where}, row {int(rows[i])}: column {image_col!r} is not an image.")
        yield as_rgb_array(image)


# --------------------------------------------------------------------------------------------
# Decoding: PIL decodes each file once; resizing runs batched in torch (same-size images of a
# chunk are resized together). Decoded pools are kept for the process, in memory or memory-mapped.
# --------------------------------------------------------------------------------------------

_CHUNK = 256
_POOL_CACHE: OrderedDict[tuple, Tensor] = OrderedDict()
_POOL_CACHE_SIZE = 2


def as_rgb_array(image: Image.Image) -> np.ndarray:
    """A PIL image as uint8 [H,W,3]."""
    # convert("RGB") as torchvision's ImageFolder loader does (grey sketches become 3 channels).
    return np.asarray(image.convert("RGB"))


def read_image_file(path: Path, where: str) -> np.ndarray:
    """One image file as uint8 [H,W,3]; a broken file is a DataError naming ``where``."""
    try:
        with Image.open(path) as im:
            return as_rgb_array(im)
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot read the image {where}: {exc}. Re-download or remove the file.") from exc


def stack_resized(arrays: Iterable[np.ndarray], n: int, size: int, desc: str = "") -> Tensor:
    """Stack ``n`` uint8 [H,W,3] arrays into uint8 [n,3,size,size], resizing batched in torch.

    Images are squashed to the square (no crop), as DomainBed and FedBN resize; bilinear with
    antialiasing, which matches PIL's resize. Memory stays at one chunk of full-size images, and
    a pool too large for memory is written into a memory-mapped file (:mod:`fedbench.data.pool`).
    """
    import torchvision.transforms.v2.functional as TF  # noqa: N812 - imported here: ~5 s, only needed to decode

    out = empty_pool((n, 3, size, size), desc.removeprefix("decoding ") or "image")
    progress = _progress(n, desc)
    it = iter(arrays)
    for start in range(0, n, _CHUNK):
        chunk = [next(it) for _ in range(min(_CHUNK, n - start))]
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, a in enumerate(chunk):
            groups.setdefault(a.shape, []).append(j)
        for shape, members in groups.items():
            batch = torch.from_numpy(np.stack([chunk[j] for j in members])).permute(0, 3, 1, 2)
            if shape[:2] != (size, size):
                batch = TF.resize(batch, [size, size], interpolation=TF.InterpolationMode.BILINEAR,
                                  antialias=True)
            out[torch.as_tensor(members) + start] = batch
        if progress is not None:
            progress.update(len(chunk))
    if progress is not None:
        progress.close()
    return out


def _progress(n: int, desc: str) -> Any:
    if n < 2000 or not desc:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=n, desc=desc, unit="img", leave=False, disable=None)


def cached_pool(key: tuple, build: Callable[[], Tensor]) -> Tensor:
    """The decoded pool for ``key``, built once per process (a run with another seed or held-out
    domain over the same images decodes nothing). Callers must not modify the tensor."""
    if key in _POOL_CACHE:
        _POOL_CACHE.move_to_end(key)
        return _POOL_CACHE[key]
    pool = build()
    _POOL_CACHE[key] = pool
    while len(_POOL_CACHE) > _POOL_CACHE_SIZE:
        _POOL_CACHE.popitem(last=False)
    return pool


def clear_pool_cache() -> None:
    """Forget every decoded pool (after the files behind one changed on disk)."""
    _POOL_CACHE.clear()
