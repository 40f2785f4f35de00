"""Reading photographs: listing a folder, names, and decoding any input to RGB.

Every decoder problem (empty, truncated, not an image, unreadable, too many
pixels) becomes a `BadImage` that names the file, so that callers can report
it and go on.  Photos are turned upright by their EXIF orientation tag, as a
viewer shows them.
"""
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from retina.core.errors import UserError, first_few
from retina.core.paths import IMAGE_EXTENSIONS

# A truncated JPEG must be an error, never a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The largest Kaggle photographs have 18 MP; nothing legitimate comes near 100 MP, while a
# 0.4 MB PNG can claim 400 MP (2 GB per decoding worker).  Past the limit PIL warns (up
# to twice the limit) or refuses: both are errors here, naming the file, never silenced.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings('error', category=Image.DecompressionBombWarning)
TOO_LARGE = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class BadImage(UserError):
    """An image file that cannot be decoded."""


def image_name(path):
    """The name used in label files and submissions: the file name without extension."""
    return Path(path).stem


def list_images(folder, keep_odd_names=False):
    """Sorted image paths in `folder`; a missing or empty folder is a UserError.

    A name with a line break is a UserError (the names files hold one name per line), unless
    `keep_odd_names`: predict.py keeps it, to name that one photograph as failed
    (`has_line_break`) and grade the rest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f'{folder}: no such folder; check the path (images go in e.g. data/train/)')
    paths = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith('.'))
    if not paths:
        others = unlisted_images(folder)
        found = (f'; found {first_few([p.name for p in others])}, of formats the pipeline does '
                 f'not read: save them as PNG or JPEG' if others else '')
        raise UserError(f'{folder}: no images found (looked for {", ".join(IMAGE_EXTENSIONS)})'
                        + found)
    seen = {}
    for path in paths:  # labels, features and submissions go by name: one file per name
        if has_line_break(path) and not keep_odd_names:
            raise UserError(f'{str(path)!r}: the name holds a line break, which the names '
                            f'files cannot hold (one name per line); rename the file')
        if path.stem in seen:
            raise UserError(f'{seen[path.stem]} and {path.name} in {folder} are both image '
                            f'{path.stem}; keep one of them')
        seen[path.stem] = path.name
    return paths


def collect_images(inputs, unread=None, keep_odd_names=False, what='images'):
    """Image paths from files and folders (`inputs`), in the given order, a folder's sorted
    (`list_images`), each path once: the one collector of predict.py and ram.py.

    Two files of one name are a UserError: rows, heat maps and the blend's eye pairs go by
    name.  With `keep_odd_names` (predict.py) an entry that cannot be an image (a name with a
    line break, a pipe, a dangling or looping link; given by name or in a folder) is kept, so
    that the caller names that one as failed and goes on.  A folder's files of other image
    formats (.bmp, .webp, ...: `unlisted_images`) are added to `unread` when it is a list,
    for the caller to name.  `what` names the inputs in errors ('photographs')."""
    import os
    found = []
    for entry in inputs:
        entry = Path(entry)
        if entry.is_dir():
            found.extend(list_images(entry, keep_odd_names=keep_odd_names))
            if unread is not None:
                unread.extend(unlisted_images(entry))
        elif entry.is_file() or (keep_odd_names and os.path.lexists(entry)):
            found.append(entry)
        else:
            raise UserError(f'{entry}: no such file or folder; pass {what} or folders of them '
                            f'({", ".join(IMAGE_EXTENSIONS)})')
    if not found:
        raise UserError(f'no {what} given; pass files or folders')
    seen = {}
    for path in found:
        name = image_name(path)
        if name in seen and seen[name] != path:
            raise UserError(f'{seen[name]} and {path} share the name {name}, so their rows and '
                            f'heat maps would overwrite each other; pass only one of them (or '
                            f'use separate runs)')
        seen[name] = path
    return list(dict.fromkeys(found))


def has_line_break(path):
    return '\n' in Path(path).name or '\r' in Path(path).name


# Endings of image formats the pipeline does not take (IMAGE_EXTENSIONS): a folder's files
# with these are named, never passed over in silence.  PIL's own list, and cameras' formats
# PIL cannot open.
OTHER_IMAGE_ENDINGS = ('.heic', '.heif', '.avif', '.dng', '.cr2', '.nef', '.arw', '.raw')


def unlisted_images(folder):
    """Sorted files of `folder` that look like images (by their ending) but are not of
    IMAGE_EXTENSIONS, so that list_images leaves them out: .bmp, .webp, .gif, .heic, ..."""
    Image.init()
    endings = (set(Image.registered_extensions()) | set(OTHER_IMAGE_ENDINGS)) - \
        set(IMAGE_EXTENSIONS)
    return sorted(p for p in Path(folder).iterdir()
                  if p.suffix.lower() in endings and not p.name.startswith('.'))


def megapixels(count):
    """`count` pixels in MP, with the decimals that keep it apart from the limit: a 10001²
    photograph is 100.02 MP, not 100 MP 'over the limit of 100 MP'."""
    for decimals in range(7):
        shown = f'{count / 1e6:.{decimals}f}'
        if count == MAX_PIXELS or float(shown) * 1e6 != MAX_PIXELS:
            return shown
    return f'{count / 1e6:.6f}'


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


def too_large(path, error_or_image):
    """The BadImage for a file over MAX_PIXELS (from PIL's error, or from the opened image)."""
    if isinstance(error_or_image, Image.Image):
        width, height = error_or_image.size
        found = f'{width}×{height} = {megapixels(width * height)} MP'
    else:  # "Image size (400000000 pixels) exceeds limit of ..."
        count = re.search(r'\((\d+) pixels\)', str(error_or_image))
        found = f'{megapixels(int(count[1]))} MP' if count else str(error_or_image).split(',')[0]
    return BadImage(f'{path}: too many pixels to decode safely ({found}; the limit is '
                    f'{MAX_PIXELS // 1_000_000} MP, far above any fundus photograph); it is a '
                    f'decompression bomb or not a photograph: remove it')


def check_pixels(path, image):
    """Refuse an opened image over MAX_PIXELS before it is decoded (also where a `-W` option
    or a test runner has reset the warning filter above)."""
    if image.width * image.height > MAX_PIXELS:
        raise too_large(path, image)


def load_rgb(path, draft_size=None):
    """Decode `path` to an RGB PIL image.

    `draft_size` (w, h) lets JPEG decode straight at 1/2, 1/4 or 1/8 scale
    when the result only needs to be at least that big.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage(f'{path}: empty file (0 bytes); replace it with the original image')
        with Image.open(path) as image:
            check_pixels(path, image)
            rotated = image.getexif().get(0x0112) in _ROTATED
            if draft_size is not None and image.format == 'JPEG':
                image.draft('RGB', draft_size[::-1] if rotated else draft_size)
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except BadImage:
        raise
    except TOO_LARGE as error:
        raise too_large(path, error) from None
    except (OSError, SyntaxError, ValueError) as error:
        reason = str(error) or type(error).__name__
        if 'truncated' in reason.lower():
            hint = 'truncated file; download or copy it again'
        elif 'cannot identify' in reason.lower():
            hint = 'not an image file (or an unsupported format); remove or replace it'
        else:
            hint = f'cannot read it ({reason}); check the file'
        raise BadImage(f'{path}: {hint}') from None


FORMULA_STARTS = ('=', '+', '-', '@', '\t', '\r')  # a spreadsheet reads such a cell as a formula


def csv_safe(text):
    """A name for a CSV cell that no spreadsheet runs as a formula: text starting with =, +, -,
    @, a tab or a carriage return gets a leading apostrophe (OWASP's CSV-injection rule),
    which spreadsheets show as text and hide.  Numbers are written as they are."""
    return f"'{text}" if str(text).startswith(FORMULA_STARTS) else text

