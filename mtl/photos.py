"""The photos a prediction is asked about: files, folders and globs found on disk, or PIL images and arrays in memory.

`find_photos` turns paths, folders (recursively) and globs into photo paths, each once; `read_inputs` takes
anything the Python API accepts (paths, PIL images, uint8 RGB arrays) and gives the photos' names and the items
to read (paths stay paths, images become pixels). `MemoryImages` serves pixels already decoded as an image
source, `GivenPhotos` the photos as given, and `unreadable_error` is the one error for photos that cannot be decoded.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from mtl.errors import ConfigError, DataError

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------- finding photos
def is_photo_name(name: str) -> bool:
    from mtl.data import is_ignored
    return not is_ignored(name) and os.path.splitext(name)[1].lower() in PHOTO_EXTENSIONS


def photos_in(folder) -> list[str]:
    """Every photo under a folder (recursively, sorted; hidden files and folders and ._* left out)."""
    from mtl.data import is_ignored
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_ignored(d))
        found += [os.path.join(root, f) for f in sorted(files) if is_photo_name(f)]
    return found


def find_photos(patterns, flag="--images") -> list[str]:
    """Files, folders (recursive) and globs -> photo paths, in the order given, each once; a miss is a ConfigError."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths = []
    for pattern in map(str, patterns):
        if os.path.isfile(pattern):
            paths.append(pattern)
        elif os.path.isdir(pattern):
            found = photos_in(pattern)
            if not found:
                raise ConfigError(f"{flag} {pattern}: the folder holds no photos ({', '.join(PHOTO_EXTENSIONS)})")
            paths += found
        elif glob.has_magic(pattern):
            found = []
            for match in sorted(glob.glob(pattern, recursive=True)):
                if os.path.isdir(match):
                    found += photos_in(match)
                elif is_photo_name(os.path.basename(match)):
                    found.append(match)
            if not found:
                raise ConfigError(f"{flag} {pattern!r} matches no photo")
            paths += found
        else:
            raise ConfigError(f"{flag} {pattern}: no such file or folder")
    return list(dict.fromkeys(paths))


# ---------------------------------------------------------------- inputs
class MemoryImages:
    """Photos already decoded (RGB uint8 at one load size), as an image source for FaceDataset."""

    def __init__(self, images):
        self.images = list(images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i) -> np.ndarray:
        return self.images[i]

    def take(self, indices) -> MemoryImages:
        return MemoryImages([self.images[i] for i in indices])


class GivenPhotos:
    """Photos as they were given: paths decoded when read (full size, EXIF rotation applied), pixels as they are; the
    source of the photos face-crop members crop themselves."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i) -> np.ndarray:
        from mtl.images import decode_image
        item = self.items[i]
        return decode_image(item) if isinstance(item, str) else item


def as_pixels(image, index: int) -> np.ndarray:
    """A PIL image (EXIF rotation applied, converted to RGB) or a uint8 HxWx3 RGB array -> contiguous pixels."""
    from PIL import Image, ImageOps

    from mtl.images import to_rgb
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(to_rgb(ImageOps.exif_transpose(image))))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ConfigError(f"image {index}: expected a uint8 RGB array of shape (H, W, 3), got {image.dtype} "
                              f"{tuple(image.shape)}")
        return np.ascontiguousarray(image)
    raise ConfigError(f"image {index}: expected a file path, a PIL image or a uint8 HxWx3 RGB array, got "
                      f"{type(image).__name__}")


def read_inputs(images) -> tuple[list, list, bool]:
    """(names, items, single): paths (folders and globs expanded) stay strings, PIL images and arrays become pixels.

    `single` is True when exactly one photo was given (one file, image or HxWx3 array), not a list.
    """
    from PIL import Image
    single = isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3) or (
        isinstance(images, (str, os.PathLike)) and os.path.isfile(images))
    if single or isinstance(images, (str, os.PathLike)):
        images = [images]
    elif isinstance(images, np.ndarray):
        images = list(images)  # a batch (N, H, W, 3)
    names, items = [], []
    for i, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            found = find_photos([image], "photo")
            names += found
            items += found
        else:
            pixels = as_pixels(image, i)
            names.append(getattr(image, "filename", None) or None)
            items.append(pixels)
    if not items:
        raise DataError("no photos given")
    return names, items, single


def unreadable_error(problems) -> DataError:
    """One line for one unreadable photo; a summary and one line each for several."""
    from mtl.data import format_problems
    if len(problems) == 1:
        return DataError(f"{problems[0]}; fix or remove it, or leave it out with --skip-bad (skip_bad=True)")
    return DataError(format_problems(problems, "unreadable photo") + "\nFix or remove them, or leave them out with "
                                                                      "--skip-bad (skip_bad=True).")
