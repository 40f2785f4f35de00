"""Crop each fundus photograph to the eye, make it square and resize it (convert.py): the
geometry and one image's conversion (`convert_one`).  Converting a folder with a pool of
processes is retina/data/conversion.py; the --test preview is retina/data/preview.py.

The algorithm is the original solution's.  A photograph is
a bright disc (the retina) on a dark surround.  When the photograph is wide
(width > 1.2 x height) the surround fills its left and right edges, so the
brightest pixel of those two edge strips, per channel, is the background
level; every pixel more than 10 above it in any channel is part of the eye,
and the eye's box is the bounding box of those pixels.  A box that is
missing, or narrower or shorter than 0.8 x height, is not trusted: the
centred square is used instead.  Photographs that are not wide have no
surround strips to measure, so they always get the centred square (the
original behaves the same way: it only looks for the eye in wide images).

`find_eye_box` and `crop_to_eye_reference` do exactly that on the image they
are given: the original ran them on the full 15-megapixel photograph, which
takes about a second per image.  The fast path gives the same box within a
few pixels at a fraction of the cost:

- a JPEG is decoded straight at the smallest DCT scale (1/2, 1/4, 1/8) that
  still leaves the crop at least `crop_size` pixels on each side
  (`load_for_crop`), so a 512-pixel output never needs the full decode;
- the box is searched on a copy reduced to at most `WORK_WIDTH` pixels
  (`find_eye_box_fast`).  The reduction averages blocks of pixels, which is
  what the blur is for (removing noise before the threshold), so the reduced
  copy is not blurred again: blurring at the reduced scale would smear the
  eye's edge over several reduced pixels and move the box outwards by 8-16
  full-resolution pixels, while without it the box stays within ~5 pixels of
  the full-resolution reference on the EyePACS sample;
- the box is cropped from the decoded image and resized in one step with
  Pillow's bilinear filter, which widens with the reduction and so averages
  every input pixel (anti-aliased) (`crop_to_eye`).  It takes half the time
  of Lanczos, 5 ms of ~30 ms per photograph, and the crop stays as close to
  the reference (itself Lanczos): mean absolute difference at most 1.2 of 255
  on the EyePACS sample (Lanczos 1.0), the tests' tolerance being 6.  OpenCV's reduced decode and INTER_AREA was
  measured too: its decode is libjpeg-turbo's DCT scaling as Pillow's draft
  (the same 19 ms) and INTER_AREA saved 0.6 ms more, not worth a second
  decoder and a 150 MB dependency (BENCHMARKS.md, "convert.py").

One deviation from the original, for images taller than wide (which real
fundus cameras do not produce): the original's "centred square" keeps the
whole tall image and squashes it; here it is a square centred vertically
too.  For every image at least as wide as tall the two are identical.
"""
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from retina.core.atomic import save_image
from retina.data import preprocess
from retina.data.images import load_rgb

WIDE_RATIO = 1.2          # only images wider than this x height are searched for the eye
STRIP_DIVISOR = 32        # each background strip is width // 32 pixels wide
BACKGROUND_MARGIN = 10    # foreground: brighter than the background by more than this
MIN_BOX_FRACTION = 0.8    # a box narrower or shorter than this x height is not trusted
WORK_WIDTH = 1024         # the fast path searches for the box at most this wide
RESAMPLE = Image.Resampling.BILINEAR  # the fast path's resize filter; see the module docstring
OUTPUT_EXTENSIONS = ('tiff', 'jpeg', 'png')
JPEG_QUALITY = 97
MAX_UPSCALE = 4           # warn when the eye is blown up more than this
DARK_MEAN = 3             # warn when the output's mean pixel value is below this (of 255)


# --- the box ---------------------------------------------------------------

def _rgb(image):
    return image if image.mode == 'RGB' else image.convert('RGB')


def centred_square(width, height):
    """The fallback crop: the square in the middle of the image, (left, top, right, bottom).

    As in the original, an odd difference between width and height leaves
    the extra pixel in (the box is then one pixel wider than high).
    """
    margin_x = max((width - height) // 2, 0)
    margin_y = max((height - width) // 2, 0)
    return margin_x, margin_y, width - margin_x, height - margin_y


def _foreground_box(array):
    """The bounding box of the pixels brighter than the left/right edge strips, or None.

    `array` is H x W x 3 uint8.
    """
    height, width, _ = array.shape
    strip = max(width // STRIP_DIVISOR, 1)
    background = np.maximum(array[:, :strip].max(axis=(0, 1)), array[:, -strip:].max(axis=(0, 1)))
    # One uint8 comparison per channel, OR-ed: 4× faster than comparing the whole array in
    # int16 and reducing it with .any(axis=2).  A channel whose threshold is above 255 has no
    # foreground.
    foreground = np.zeros((height, width), dtype=bool)
    for channel in range(3):
        threshold = int(background[channel]) + BACKGROUND_MARGIN
        if threshold < 255:
            foreground |= array[:, :, channel] > threshold
    rows = np.flatnonzero(foreground.any(axis=1))
    if rows.size == 0:
        return None
    columns = np.flatnonzero(foreground.any(axis=0))
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def _trusted_or_square(box, width, height):
    """`box` if it is plausible for an eye in a `width` x `height` photo, else the centred square."""
    if box is not None:
        left, top, right, bottom = box
        if right - left >= MIN_BOX_FRACTION * height and bottom - top >= MIN_BOX_FRACTION * height:
            return box
    return centred_square(width, height)


def is_wide(width, height):
    """Whether the eye is searched for at all: only wide photographs have a surround to measure."""
    return width > WIDE_RATIO * height


def find_eye_box(image):
    """The eye's box (left, top, right, bottom) in `image`, exactly as the original finds it.

    Blurs the whole image first; on a full-size photograph this takes about a
    second.  Use `find_eye_box_fast` for the same box in a few milliseconds.
    """
    width, height = image.size
    if not is_wide(width, height):
        return centred_square(width, height)
    blurred = np.asarray(_rgb(image).filter(ImageFilter.BLUR))
    return _trusted_or_square(_foreground_box(blurred), width, height)


def find_eye_box_fast(image, work_width=WORK_WIDTH):
    """The eye's box in `image`'s coordinates, searched on a copy at most `work_width` wide.

    The reduction (a block average) takes the place of the blur; see the
    module docstring.  The box is within a few pixels of `find_eye_box`'s.
    """
    width, height = image.size
    if not is_wide(width, height):
        return centred_square(width, height)
    factor = max(1, math.ceil(width / work_width))
    reduced = _rgb(image)
    if factor > 1:
        reduced = reduced.reduce(factor)
    box = _foreground_box(np.asarray(reduced))
    if box is not None:
        left, top, right, bottom = box
        box = (left * factor, top * factor, min(right * factor, width), min(bottom * factor, height))
    return _trusted_or_square(box, width, height)


def scale_box(box, from_size, to_size):
    """`box` in an image of `from_size` (w, h) mapped to the same place in one of `to_size`."""
    sx = to_size[0] / from_size[0]
    sy = to_size[1] / from_size[1]
    left, top, right, bottom = box
    return round(left * sx), round(top * sy), round(right * sx), round(bottom * sy)


# --- crop and resize ---------------------------------------------------------

def crop_to_eye(image, crop_size, box=None):
    """Crop `image` to the eye (`box`, found with `find_eye_box_fast` if not given), resize to crop_size²
    (RESAMPLE, anti-aliased)."""
    image = _rgb(image)
    if box is None:
        box = find_eye_box_fast(image)
    return image.resize((crop_size, crop_size), RESAMPLE, box=box, reducing_gap=3.0)


def crop_to_eye_reference(image, crop_size):
    """The plain algorithm on the full image: exact box, crop, Lanczos resize (for tests and benchmarks)."""
    image = _rgb(image)
    box = find_eye_box(image)
    return image.crop(box).resize((crop_size, crop_size), Image.Resampling.LANCZOS)


def load_for_crop(path, crop_size):
    """Decode `path` to RGB, a JPEG at the smallest DCT scale that keeps the crop >= crop_size.

    Any accepted box is at least MIN_BOX_FRACTION x height on each side (the
    fallback square even more), so an image at least crop_size / 0.8 high is
    never upsampled.  Raises BadImage (naming the file) if it cannot be read.
    """
    draft_size = (crop_size, math.ceil(crop_size / MIN_BOX_FRACTION))
    return load_rgb(path, draft_size=draft_size)


def save_options(path):
    """Encoder options for an output file: JPEG at quality 97, the others lossless defaults."""
    return {'quality': JPEG_QUALITY} if Path(path).suffix.lower() in ('.jpeg', '.jpg') else {}


# --- how converted images are stored: what a net's training images went through -------------
#
# convert.py --extension jpeg stores each converted image as a JPEG of quality JPEG_QUALITY;
# tiff and png are lossless.  A net trained on the JPEGs has only seen images that went through
# that encoder, and its TTA features and its blend depend on it (a per-patient blend's score
# moved 0.27 on average between the stored and the unstored image: BENCHMARKS, "predict.py's
# images as the nets' training images"), so predict.py gives the images it converts in memory
# the same round trip (`as_stored`).  The checkpoint records it (`encoding_of_files`).

ENCODINGS = ('none', f'jpeg{JPEG_QUALITY}')


def encoding_of_files(image_paths):
    """How most of `image_paths` (a net's training images) are stored: 'jpeg97' for convert.py's
    JPEGs, 'none' for lossless files."""
    image_paths = list(image_paths)
    jpegs = sum(Path(p).suffix.lower() in ('.jpeg', '.jpg') for p in image_paths)
    return ENCODINGS[1] if image_paths and 2 * jpegs > len(image_paths) else ENCODINGS[0]


def encoding_warning(image_paths, encoding, weights):
    """A one-line warning when most of `image_paths` (converted images about to be scored by the
    net `weights`) are stored otherwise than its training images were (`encoding`, one of
    ENCODINGS), else None.  Mixed storage changes a net's features a little and a per-patient
    blend fitted on them more (its score moved 0.27 on average: BENCHMARKS, "Real photographs:
    what the re-release changed")."""
    image_paths = list(image_paths)
    stored = encoding_of_files(image_paths)
    if not image_paths or stored == encoding:
        return None
    said = {ENCODINGS[0]: 'lossless (tiff or png)', ENCODINGS[1]: f'as JPEG (quality {JPEG_QUALITY})'}
    folders = sorted({str(Path(p).parent) for p in image_paths})
    where = folders[0] + (f' and {len(folders) - 1} more folders' if len(folders) > 1 else '')
    extension = 'jpeg' if encoding == ENCODINGS[1] else 'tiff'
    return (f'warning: {where}: these images are stored {said[stored]}, but {weights} was trained '
            f'on images stored {said[encoding]}: its scores and features (and a blend fitted on '
            f'them) differ from those of its training images; for the same, convert the '
            f'photographs with convert.py --extension {extension}')


def as_stored(rgb, encoding):
    """The (S, S, 3) uint8 converted image `rgb` as it reads back from a file convert.py stores
    with `encoding` (one of ENCODINGS): unchanged for 'none', through the JPEG encoder at
    convert.py's quality for 'jpeg97' (the very bytes convert.py would write)."""
    if encoding == ENCODINGS[0]:
        return rgb
    if encoding != ENCODINGS[1]:
        raise ValueError(f'unknown image encoding {encoding!r} (one of {", ".join(ENCODINGS)})')
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buffer, format='JPEG',
                                                          quality=JPEG_QUALITY)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.asarray(image.convert('RGB'))


def convert_one(src, dst, crop_size, warnings=None, preprocessing='none'):
    """Crop the photograph `src` to the eye, resize it to crop_size², preprocess it with
    `preprocessing` (convert.py --enhance; see retina.data.preprocess) and save it atomically as `dst`.

    Returns the eye's box in the decoded image (see `load_for_crop`); what
    looks wrong with the result (see `doubts`) is appended to `warnings`.
    Raises BadImage if `src` cannot be decoded.
    """
    image = load_for_crop(src, crop_size)
    box = find_eye_box_fast(image)
    cropped = crop_to_eye(image, crop_size, box)
    output = cropped
    if preprocessing != 'none':
        output = Image.fromarray(preprocess.apply(np.asarray(output), preprocessing))
    save_image(dst, output, **save_options(dst))
    if warnings is not None:
        warnings.extend(doubts(src, box, cropped, crop_size, image))
    return box


def gradability_reasons(path, image, box, crop_size, rgb, enhanced=False):
    """predict.py's verdict on a photograph (`retina.data.gradability`): the reasons it is
    ungradable, [] if none.  `image` is its decode for `crop_size` (`load_for_crop`), `box` the
    eye's box in it and `rgb` the converted crop_size² image before any --enhance (`enhanced`:
    the photograph arrived with a look already).  The focus
    is judged on the eye at `gradability.detail_size` (512 px, or the photograph's own size when
    smaller; decoded again when `image` is smaller); the compression on the file's JPEG tables
    and, for a full-resolution decode, its blocks."""
    from retina.data import gradability
    side = min(box[2] - box[0], box[3] - box[1])
    quality, blocks, file_size = gradability.file_measures(path, image)
    original = max(file_size) / max(image.size) * side  # the eye's side in the file's pixels
    size = gradability.detail_size(original)
    detail_image, detail_box = image, box
    if side < size:
        detail_image = load_for_crop(path, size)
        detail_box = find_eye_box_fast(detail_image)
    detail = np.asarray(crop_to_eye(detail_image, size, detail_box))
    return gradability.reasons(gradability.measures(rgb, detail), side, crop_size,
                               quality=quality, blocks=blocks,
                               pixels_per_net_pixel=original / crop_size, enhanced=enhanced)


def doubts(src, box, output, crop_size, image):
    """Warnings for a converted image (before --enhance) that is probably useless: blown up,
    black, or ungradable by predict.py's checks (`retina.data.gradability`)."""
    found = []
    side = min(box[2] - box[0], box[3] - box[1])
    if side * MAX_UPSCALE < crop_size:
        found.append(f'{src}: the eye is {side} px across, blown up {crop_size / side:.0f}× to '
                     f'{crop_size} px; use the full-resolution photograph')
    if np.asarray(output).mean() < DARK_MEAN:
        found.append(f'{src}: nearly black (no eye found); check the photograph')
    if not found:
        reasons = gradability_reasons(src, image, box, crop_size, np.asarray(output))
        if reasons:
            found.append(f'{src}: ungradable ({", ".join(reasons)}); predict.py would give it '
                         f'no level')
    return found


# --- a folder --------------------------------------------------------------
