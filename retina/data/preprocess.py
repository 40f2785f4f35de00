"""Cross-camera preprocessing: one look for photographs from any camera, raw or enhanced.

One name throughout: the *preprocessing* of a converted image is one of PREPROCESSING,
chosen with `convert.py --enhance`, recorded as `preprocessing` in the folder's
conversion.json (records that say `enhance` are read too) and in every checkpoint, and
carried by `checkpoint.LoadedNet.preprocessing`.

Photographs differ by camera, exposure and by what their publisher did to
them (the eyepacs256 set arrives contrast-enhanced; raw EyePACS photos are
orange with dark edges).  `convert.py --enhance local_contrast` maps every
photograph to one look with a variant of Ben Graham's local-average
subtraction (his 2015 Kaggle preprocessing):

    y = 128 + SPREAD · (x − local_mean(x)) / spread(x − local_mean(x))

per channel, inside the eye only.  The local mean is a Gaussian of sigma
SIGMA_FRACTION × the image side, computed as a normalised convolution over
the eye (blur(x·m) / blur(m)), so the black surround does not darken the rim
into a bright ring.  Graham multiplied by a fixed 4; here each channel's
spread (its standard deviation over the eye) is brought to SPREAD grey
levels, which removes the camera's colour balance and contrast as well and
makes the preprocessing (nearly) idempotent: an enhanced image comes back almost
unchanged, so already-enhanced photographs and raw ones meet in one place.
Outside the eye is black (0), as in converted photographs.

convert.py records the choice in the converted folder (`conversion.json`);
training records the folder's choice in its checkpoints, and every later
stage (transform.py, ram.py, predict.py) refuses images prepared otherwise.
"""
import json
from pathlib import Path

import numpy as np

from retina.core import atomic
from retina.core.errors import UserError

PREPROCESSING = ('none', 'local_contrast')  # convert.py --enhance's choices
SIGMA_FRACTION = 1 / 60      # local-mean Gaussian sigma, as a share of the image side
SPREAD = 24.0                # output standard deviation per channel, grey levels
MASK_THRESHOLD = 12          # blurred brightest channel above this is the eye
RECORD_NAME = 'conversion.json'


def fundus_mask(rgb):
    """Boolean H × W mask of the eye: the brightest channel above a low threshold, holes filled
    (dark lesions and the shadowed macula stay inside)."""
    from scipy import ndimage  # here: 0.35 s of import that convert.py without --enhance skips
    # A 3 × 3 median, not a blur: it removes JPEG speckle in the surround without moving the
    # eye's edge, so the mask of an enhanced image is the mask it was made with.
    brightest = ndimage.median_filter(rgb.max(axis=2), size=3)
    return ndimage.binary_fill_holes(brightest > MASK_THRESHOLD)


def local_contrast(rgb):
    """`rgb` (H × W × 3 uint8) in the common look; see the module docstring."""
    mask = fundus_mask(rgb)
    if mask.sum() < 16:  # no eye found: nothing to normalise against
        return np.zeros_like(rgb)
    from scipy import ndimage
    sigma = max(1.0, SIGMA_FRACTION * max(rgb.shape[:2]))
    weight = mask.astype(np.float32)
    support = ndimage.gaussian_filter(weight, sigma) + 1e-6
    out = np.zeros(rgb.shape, dtype=np.float32)
    for c in range(3):
        x = rgb[..., c].astype(np.float32)
        local_mean = ndimage.gaussian_filter(x * weight, sigma) / support
        detail = (x - local_mean)[mask]
        spread = max(float(detail.std()), 1.0)
        out[..., c][mask] = 128.0 + SPREAD * detail / spread
    # Inside the eye above the mask threshold, so that the eye never turns into "surround".
    out = np.where(mask[..., None], np.clip(np.rint(out), MASK_THRESHOLD + 1, 255), 0)
    return out.astype(np.uint8)


# An image already in the local-contrast look: every channel's mean over the eye within
# LOOK_MEAN_TOLERANCE of 128 and its spread within LOOK_SPREAD of SPREAD.  Enhanced real
# photographs (three cameras, 128 and 256 px, re-saved as JPEG and re-cropped) sit within 1.5
# grey levels of 128 and at 15-25; raw ones have channels tens of levels apart (the blue is
# dark) and publisher-enhanced ones (eyepacs256) a spread near 70.
LOOK_MEAN_TOLERANCE = 4.0
LOOK_SPREAD = (12.0, 30.0)


def looks_enhanced(rgb):
    """Whether `rgb` (H × W × 3 uint8, cropped to the eye) already has the local-contrast look,
    by its statistics: for photographs converted with --enhance local_contrast that arrive
    without their conversion.json, so that the look is not given twice."""
    mask = fundus_mask(np.asarray(rgb))
    if mask.sum() < 16:
        return False
    pixels = np.asarray(rgb)[mask].astype(np.float64)
    means, spreads = pixels.mean(axis=0), pixels.std(axis=0)
    return bool(np.all(np.abs(means - 128.0) <= LOOK_MEAN_TOLERANCE)
                and np.all((spreads >= LOOK_SPREAD[0]) & (spreads <= LOOK_SPREAD[1])))


def apply(rgb, preprocessing):
    """`rgb` (H × W × 3 uint8) preprocessed with `preprocessing` (one of PREPROCESSING)."""
    if preprocessing == 'none':
        return rgb
    if preprocessing == 'local_contrast':
        return local_contrast(np.asarray(rgb, dtype=np.uint8))
    raise UserError(f'unknown preprocessing {preprocessing!r}; choose one of '
                    f'{", ".join(PREPROCESSING)}')


# --- the record kept with a converted folder ---------------------------------

def record_path(folder):
    return Path(folder) / RECORD_NAME


def read_record(folder):
    """The folder's conversion record, or None for a folder converted without one."""
    path = record_path(folder)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f'{path}: unreadable conversion record ({error}); delete it and run '
                        f'convert.py on the folder again') from None
    if isinstance(record, dict) and 'preprocessing' not in record and 'enhance' in record:
        record['preprocessing'] = record.pop('enhance')  # records written before 2026-12
    if not isinstance(record, dict) or record.get('preprocessing') not in PREPROCESSING:
        raise UserError(f'{path}: not a conversion record written by convert.py; delete it and '
                        f'run convert.py on the folder again')
    return record


def folder_preprocessing(folder):
    """The preprocessing of a converted folder ('none' for folders without a record)."""
    record = read_record(folder)
    return record['preprocessing'] if record else 'none'


def claim_folder(folder, crop_size, preprocessing, has_images):
    """Before converting into `folder`: refuse to mix preprocessings, then record this one."""
    record = read_record(folder)
    found = record['preprocessing'] if record else ('none' if has_images else None)
    if found is not None and found != preprocessing:
        raise UserError(f'{folder} holds images converted with --enhance {found}, not '
                        f'{preprocessing}; choose another --convert_directory (mixing '
                        f'preprocessings spoils training)')
    if record is None or record.get('crop_size') != crop_size:
        atomic.write_text(record_path(folder), json.dumps(
            dict(crop_size=crop_size, preprocessing=preprocessing), indent=2))


def check_matches(folder, preprocessing, weights):
    """Images of `folder` must be prepared as the net's training images were."""
    found = folder_preprocessing(folder)
    if found != preprocessing:
        fix = (f'convert.py --enhance {preprocessing}' if preprocessing != 'none'
               else 'convert.py without --enhance')
        raise UserError(f'{folder}: images converted with --enhance {found}, but {weights} was '
                        f'trained on --enhance {preprocessing} images; convert the photographs '
                        f'with {fix} into another folder')
