"""A photograph prepared for grading (predict.py): decoded, cropped to the eye and converted in
memory exactly as convert.py would, with the look its net was trained on; the image checks of
gradability, and the stability check (the photograph mildly re-encoded).

Each crop size decodes the file on its own (a JPEG straight at the DCT scale convert.py picks
for that converted size), turned upright by its EXIF orientation (`crop.load_for_crop`,
convert.py's own decoder); the eye's box is found and cropped + resized with `retina.data.crop`,
then the preprocessing of the net's training images (`retina.data.preprocess`) is applied,
unless the photograph arrived with a look already.
"""
import dataclasses
import functools
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from retina.core.errors import UserError
from retina.core.metrics import to_levels
from retina.data import crop, preprocess
from retina.data.images import BadImage, has_line_break, image_name


@dataclasses.dataclass
class Photo:
    """A decoded photograph and its converted images, one per (crop size, preprocessing)."""
    path: Path
    name: str
    converted: dict                   # (crop_size, method) -> (S, S, 3) uint8
    boxes: dict                       # crop_size -> the eye's box in that decode
    images: dict                      # crop_size -> the decode (kept only for heat maps)
    problems: list = dataclasses.field(default_factory=list)  # gradability.reasons of the image
    already: str = ''   # the look it arrived with and how that was told, when it had one
    # (crop_size, method) -> the converted image of the photograph re-saved as a JPEG of
    # quality STABILITY_QUALITY (the stability check: `unstable`)
    resaved: dict = dataclasses.field(default_factory=dict)


def prepare_photo(path, needs, keep_images=False, stability=False):
    """A `Photo` with the converted image for each (crop_size, method) in `needs`.

    Each crop size decodes the file on its own (convert.py's JPEG draft scale
    depends on it), so every converted image is the one convert.py writes.
    """
    if has_line_break(path):  # kept by collect_images to be named here, on one line
        raise BadImage(f'{str(path)!r}: the name holds a line break, which no names file or '
                       f'CSV row of names can carry; rename the file')
    if not Path(path).is_file():  # from a folder's listing: never open a pipe, a folder, ...
        raise BadImage(f'{path}: not a photograph file (a folder, a pipe, or a link to nothing '
                       f'or to itself); skipped')
    converted, boxes, images, problems, resaved = {}, {}, {}, None, {}
    already, told, look_problems = None, '', []
    for crop_size in sorted({s for s, _ in needs}):
        image = crop.load_for_crop(path, crop_size)  # EXIF orientation applied (images.py)
        box = crop.find_eye_box_fast(image)
        rgb = np.asarray(crop.crop_to_eye(image, crop_size, box))
        boxes[crop_size] = box
        if already is None:
            already, told = look_of(path, rgb)
        # the image checks, on every conversion: a chain's 128-px view hides the blocks of a
        # heavily compressed photograph that its 256-px net sees
        problems = list(dict.fromkeys((problems or []) + list(crop.gradability_reasons(
            path, image, box, crop_size, rgb, enhanced=already != 'none'))))
        if keep_images:
            images[crop_size] = image
        resaved_rgb = np.asarray(crop.crop_to_eye(jpeg_resaved(image), crop_size, box)) \
            if stability and already == 'none' else None
        for method in sorted({m for s, m in needs if s == crop_size}):
            if already == 'none':
                converted[(crop_size, method)] = preprocess.apply(rgb, method)
                if resaved_rgb is not None:
                    resaved[(crop_size, method)] = preprocess.apply(resaved_rgb, method)
            else:  # converted with a look already: never given it twice
                converted[(crop_size, method)] = rgb
                if method != already:
                    look_problems.append(f'already enhanced ({already}, by {told}) unlike the '
                                         f"net's training photographs ({method}): grade the "
                                         f'raw photograph')
    return Photo(path=Path(path), name=image_name(path), converted=converted, boxes=boxes,
                 images=images, problems=(problems or []) + sorted(set(look_problems)),
                 already=f'{already}, by {told}' if already != 'none' else '', resaved=resaved)


STABILITY_QUALITY = 75   # a mild re-encoding: what a viewer, a mail client or a PACS does
UNSTABLE = 'unstable under re-encoding'


def jpeg_resaved(image, quality=STABILITY_QUALITY):
    """The decoded photograph (a PIL image) as it comes back from a JPEG of `quality`: the
    photograph re-saved as a viewer would, before it is cropped and resized.  (Re-encoding the
    small converted crop instead is far harsher than any re-save of the photograph: the look's
    contrast stretch then magnifies the blocks; the released eyepacs-256 moved the level of
    21% of eyepacs_raw's photographs by more than one that way, none when the photograph
    itself was re-saved at 75.)"""
    from io import BytesIO
    buffer = BytesIO()
    image.save(buffer, 'JPEG', quality=quality)
    return Image.open(buffer).convert('RGB')


def unstable(score, resaved_score, cuts):
    """Whether the level moves by more than one when the photograph is mildly re-encoded
    (`jpeg_resaved`): a grade that fragile is not given."""
    levels = to_levels([score, resaved_score], cuts)
    return abs(int(levels[0]) - int(levels[1])) > 1


def look_of(path, rgb):
    """(the preprocessing `rgb`, a photograph cropped to the eye, already has, how that was
    told): its folder's conversion.json when it has one (convert.py wrote the folder), else
    its statistics (`preprocess.looks_enhanced`), else ('none', '')."""
    try:
        record = _conversion_record(str(Path(path).parent))
    except UserError as error:
        raise BadImage(str(error)) from None
    if record is not None:
        return record['preprocessing'], preprocess.RECORD_NAME
    if preprocess.looks_enhanced(rgb):
        return 'local_contrast', 'its statistics'
    return 'none', ''


@functools.lru_cache(maxsize=64)
def _conversion_record(folder):
    return preprocess.read_record(folder)



def load_photos(paths_, needs, keep_images, failed, bar, workers, stability=False):
    """Decode and crop a batch in threads (the decoders release the GIL); failures are named."""
    def one(path):
        try:
            return prepare_photo(path, needs, keep_images, stability)
        except BadImage as error:
            return str(error)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        loaded = list(pool.map(one, paths_))
    photos = []
    for item in loaded:
        if isinstance(item, str):
            failed.append(item)
            tqdm.write(f'failed: {item}', file=sys.stderr)
            bar.update(1)
        else:
            photos.append(item)
    return photos

