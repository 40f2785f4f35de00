"""Reading photographs: listing a folder, names, and decoding any input to RGB.

Every decoder problem (empty, truncated, not an image, unreadable) becomes a
`BadImage` that names the file, so that callers can report it and go on.
"""
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from retina.errors import UserError
from retina.paths import IMAGE_EXTENSIONS

# A truncated JPEG must be an error, never a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Real fundus photographs are large, but nothing legitimate is a decompression bomb.
Image.MAX_IMAGE_PIXELS = 200_000_000


class BadImage(UserError):
    """An image file that cannot be decoded."""


def image_name(path):
    """The name used in label files and submissions: the file name without extension."""
    return Path(path).stem


def list_images(folder):
    """Sorted image paths in `folder`; a missing or empty folder is a UserError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f'{folder}: no such folder; check the path (images go in e.g. data/train/)')
    paths = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith('.'))
    if not paths:
        raise UserError(f'{folder}: no images found (looked for {", ".join(IMAGE_EXTENSIONS)})')
    seen = {}
    for path in paths:  # labels, features and submissions go by name: one file per name
        if '\n' in path.stem or '\r' in path.stem:
            raise UserError(f'{str(path)!r}: the name holds a line break, which the names '
                            f'files cannot hold (one name per line); rename the file')
        if path.stem in seen:
            raise UserError(f'{seen[path.stem]} and {path.name} in {folder} are both image '
                            f'{path.stem}; keep one of them')
        seen[path.stem] = path.name
    return paths


def to_rgb(image):
    """Convert grayscale, palette, CMYK, 16-bit and alpha images to 8-bit RGB."""
    if image.mode == 'RGB':
        return image
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), 'L')
    elif image.mode == 'F':
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), 'L')
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        # Transparent parts become black, like the surround of a fundus photo.
        rgba = image.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return image.convert('RGB')


def load_rgb(path, draft_size=None):
    """Decode `path` to an RGB PIL image.

    `draft_size` (w, h) lets JPEG decode straight at 1/2, 1/4 or 1/8 scale
    when the result only needs to be at least that big.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage(f'{path}: empty file (0 bytes); replace it with the original image')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if draft_size is not None and image.format == 'JPEG':
                    image.draft('RGB', draft_size)
                image.load()
                return to_rgb(image)
    except BadImage:
        raise
    except Image.DecompressionBombError as error:
        raise BadImage(f'{path}: image too large to decode safely ({error})') from None
    except (OSError, SyntaxError, ValueError) as error:
        reason = str(error) or type(error).__name__
        if 'truncated' in reason.lower():
            hint = 'truncated file; download or copy it again'
        elif 'cannot identify' in reason.lower():
            hint = 'not an image file (or an unsupported format); remove or replace it'
        else:
            hint = f'cannot read it ({reason}); check the file'
        raise BadImage(f'{path}: {hint}') from None
