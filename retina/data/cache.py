"""A uint8 cache of decoded images, so that training decodes each JPEG once.

The cache is a memory-mapped `.npy` file of shape (N, 3, S, S) under
data/cache/, keyed on the folder, its file list, sizes and modification
times and the image size S: change any image and a new cache is built.
Batches are gathered from it as uint8 and moved to the device, where they
are augmented and standardised.
"""
import glob
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from retina.core import atomic
from retina.core import paths as paths_module
from retina.core.errors import UserError, first_few
from retina.data.images import BadImage, TOO_LARGE, check_pixels, load_rgb, too_large


def cache_key(image_paths, size):
    digest = hashlib.sha1(str(size).encode())
    for path in image_paths:
        stat = os.stat(path)
        digest.update(f'{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n'.encode())
    return digest.hexdigest()[:16]


def image_size_of(image_paths):
    """The side of the (square) converted images: the first image's larger side."""
    try:
        with Image.open(image_paths[0]) as image:
            check_pixels(image_paths[0], image)
            width, height = image.size
    except TOO_LARGE as error:
        raise too_large(image_paths[0], error) from None
    except (OSError, SyntaxError) as error:
        raise UserError(f'{image_paths[0]}: cannot read it ({error}); run convert.py again') from None
    if width != height:  # fail before decoding a whole folder of raw photos
        raise UserError(f'{image_paths[0]}: {width}×{height} is not square, so '
                        f'{image_paths[0].parent} does not hold converted images; run convert.py '
                        f'on it first')
    return width


def _decode(path, size):
    """One converted image as (3, S, S) uint8; anything else is refused, never squashed."""
    image = load_rgb(path)
    if image.size != (size, size):
        width, height = image.size
        if width != height:
            raise BadImage(f'{path}: {width}×{height} is not square, so it is not a converted '
                           f'image; run convert.py on the original photos first')
        raise BadImage(f'{path}: {width}×{height}, but the other images are {size}×{size}; '
                       f'convert the whole folder with one --crop_size')
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def _fill(array, image_paths, size, progress):
    """Decode every image into `array` in threads; returns the messages of those that failed."""
    failures = []

    def one(index):
        try:
            array[index] = _decode(image_paths[index], size)
        except BadImage as error:
            failures.append(str(error))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(tqdm(pool.map(one, range(len(image_paths))), total=len(image_paths),
                  desc=f'caching {image_paths[0].parent} at {size}px', unit='img',
                  disable=not progress, leave=False))
    return failures


def load_images(image_paths, size=None, cache_dir=None, progress=True):
    """A read-only (N, 3, S, S) uint8 array of `image_paths`, built once and memory-mapped."""
    image_paths = [Path(p) for p in image_paths]
    size = size or image_size_of(image_paths)
    key = cache_key(image_paths, size)
    path = paths_module.image_cache(image_paths[0].parent, size, key)
    if cache_dir is not None:
        path = Path(cache_dir) / path.name
    shape = (len(image_paths), 3, size, size)
    if path.is_file():
        cached = _open_cached(path, shape)
        if cached is not None:
            return cached
    with atomic.atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.uint8, shape=shape)
        failures = _fill(array, image_paths, size, progress)
        array.flush()
        del array  # closes the map before the rename
        if failures:
            raise UserError(f'{len(failures)} image(s) cannot be used: '
                            f'{first_few(failures, 3, "; ")}')
    _drop_older_caches(path, image_paths[0].parent, size, key)
    return np.load(path, mmap_mode='r')


def _open_cached(path, shape):
    """The cache at `path` if it is whole and of `shape`; None (after a note) if it is damaged
    (truncated by a full disk or a copy, say): it is only a cache, so it is built again."""
    try:
        array = np.load(path, mmap_mode='r', allow_pickle=False)
        if array.shape == shape and array.dtype == np.uint8:
            return array
        problem = f'holds {array.dtype} {array.shape}, not uint8 {shape}'
    except (ValueError, OSError, EOFError) as error:
        problem = f'unreadable: {error}'
    tqdm.write(f'note: image cache {path} is damaged ({problem}); building it again',
               file=sys.stderr)
    return None


def _drop_older_caches(path, folder, size, key):
    """Remove the caches of earlier contents of the same folder at the same size (at 512 px
    a cache of the Kaggle training set is 27 GB: changing one photo must not keep two)."""
    marker = '\0' * len(key)  # stands for any other key of the same length
    pattern = glob.escape(paths_module.image_cache(folder, size, marker).name)
    for other in path.parent.glob(pattern.replace(marker, '?' * len(key))):
        if other != path:
            other.unlink(missing_ok=True)


def converted_size(input_size):
    """The converted image side a net's window is cut from: 128 for 112, 256 for 224, 512 for 448."""
    return round(max(input_size) * 8 / 7)


def check_size(images, input_size, folder, config_name):
    """The images of `folder` (a uint8 N × 3 × S × S array) must be converted for the net
    (`check_side`)."""
    check_side(images.shape[-1], input_size, folder, config_name)


def check_side(side, input_size, where, config_name, too_small=UserError, fix=None):
    """A converted image's side must be between the net's window and the converted size of
    that window (`converted_size`): a smaller one cannot be used (raised as `too_small`: ram.py
    skips such an image), a larger one would lose all but its middle to the window (a
    UserError).  The one converted-size check (the cache, ram.py, predict.py --crop_size).
    `where` names the images in the message, `fix` [default: convert them again] says what
    to do."""
    window, expected = max(input_size), converted_size(input_size)
    if side < window:
        raise too_small(f'{where}: images are {side} px but {config_name} needs at least '
                        f'{window}; ' + (fix or f'convert them with convert.py --crop_size '
                                                f'{expected}'))
    if side > expected:
        raise UserError(f'{where}: images are {side} px but {config_name} expects {expected} px '
                        f'(it would see only their middle {window} px); ' + (
                            fix or f'convert the photographs with convert.py --crop_size '
                                   f'{expected} into another folder'))
