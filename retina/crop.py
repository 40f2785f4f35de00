"""Crop each fundus photograph to the eye, make it square and resize it (convert.py).

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
import dataclasses
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from retina import preprocess
from retina.atomic import save_image
from retina.errors import UserError
from retina.images import TOO_LARGE, BadImage, image_name, list_images, load_rgb
from retina.paths import IMAGE_EXTENSIONS

WIDE_RATIO = 1.2          # only images wider than this x height are searched for the eye
STRIP_DIVISOR = 32        # each background strip is width // 32 pixels wide
BACKGROUND_MARGIN = 10    # foreground: brighter than the background by more than this
MIN_BOX_FRACTION = 0.8    # a box narrower or shorter than this x height is not trusted
WORK_WIDTH = 1024         # the fast path searches for the box at most this wide
RESAMPLE = Image.Resampling.BILINEAR  # the fast path's resize filter; see the module docstring
IMAGES_PER_PROCESS = 16   # convert_folder's default: no more processes than one per this many images
OUTPUT_EXTENSIONS = ('tiff', 'jpeg', 'png')
JPEG_QUALITY = 97
PREVIEW_COUNT = 10        # how many images `--test` shows
PREVIEW_LEVEL = 1         # ... and of which level: mild DR, the hardest to see
MAX_UPSCALE = 4           # warn when the eye is blown up more than this
DARK_MEAN = 3             # warn when the output's mean pixel value is below this (of 255)
MAX_WARNINGS_SHOWN = 20   # warnings printed one by one; the rest are counted


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


def convert_one(src, dst, crop_size, warnings=None, enhance='none'):
    """Crop the photograph `src` to the eye, resize it to crop_size², preprocess it with
    `enhance` (see retina.preprocess) and save it atomically as `dst`.

    Returns the eye's box in the decoded image (see `load_for_crop`); what
    looks wrong with the result (see `doubts`) is appended to `warnings`.
    Raises BadImage if `src` cannot be decoded.
    """
    image = load_for_crop(src, crop_size)
    box = find_eye_box_fast(image)
    cropped = crop_to_eye(image, crop_size, box)
    output = cropped
    if enhance != 'none':
        output = Image.fromarray(preprocess.apply(np.asarray(output), enhance))
    save_image(dst, output, **save_options(dst))
    if warnings is not None:
        warnings.extend(doubts(src, box, cropped, crop_size))
    return box


def doubts(src, box, output, crop_size):
    """Warnings for a converted image (before --enhance) that is probably useless: blown up,
    black, or ungradable by predict.py's checks (`retina.gradability`)."""
    from retina import gradability
    found = []
    side = min(box[2] - box[0], box[3] - box[1])
    if side * MAX_UPSCALE < crop_size:
        found.append(f'{src}: the eye is {side} px across, blown up {crop_size / side:.0f}× to '
                     f'{crop_size} px; use the full-resolution photograph')
    if np.asarray(output).mean() < DARK_MEAN:
        found.append(f'{src}: nearly black (no eye found); check the photograph')
    if not found:
        reasons = gradability.reasons(gradability.measures(np.asarray(output)), side, crop_size)
        if reasons:
            found.append(f'{src}: ungradable ({", ".join(reasons)}); predict.py would give it '
                         f'no level')
    return found


# --- a folder --------------------------------------------------------------

@dataclasses.dataclass
class ConvertSummary:
    """What `convert_folder` did: counts, and one message per image that failed."""
    total: int = 0
    converted: int = 0
    skipped: int = 0
    failed: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)
    seen: set = dataclasses.field(default_factory=set)  # sources done, converted or not

    def describe(self, convert_directory):
        line = f'{self.converted} converted, {self.skipped} already in {convert_directory} (skipped)'
        return (line + (f', {len(self.failed)} failed' if self.failed else '')
                + (f', {len(self.warnings)} warning(s)' if self.warnings else ''))


def output_path(src, convert_directory, extension):
    """Where the converted `src` goes: the input's name with the output extension."""
    return Path(convert_directory) / f'{image_name(src)}.{extension}'


def _plan(directory, convert_directory, extension):
    """(src, dst) for every input image."""
    if extension not in OUTPUT_EXTENSIONS:
        raise UserError(f'unknown output extension {extension!r}; choose one of {", ".join(OUTPUT_EXTENSIONS)}')
    if Path(convert_directory).resolve() == Path(directory).resolve():
        raise UserError(f'{convert_directory}: the output folder is the input folder; '
                        f'choose another --convert_directory, e.g. data/train_medium')
    return [(src, output_path(src, convert_directory, extension))
            for src in list_images(directory)]  # one image per name, so outputs never collide


def _done(dst, crop_size):
    """True if `dst` is already converted at this size; an unreadable `dst` is redone.

    The file is decoded, not only opened: an output cut short (a full disk, a copy
    interrupted) has a valid header, and a rerun must repair it.  JPEGs decode at 1/8
    scale, which still reads every byte of the data.
    """
    if not dst.exists():
        return False
    try:
        with Image.open(dst) as image:
            size = image.size
            if image.format == 'JPEG':
                image.draft(image.mode, (1, 1))
            image.load()
    except (OSError, SyntaxError, ValueError, *TOO_LARGE):
        return False
    if size != (crop_size, crop_size):
        raise UserError(f'{dst} is {size[0]}×{size[1]}, not {crop_size}×{crop_size}: this folder '
                        f'holds another --crop_size; choose another --convert_directory or '
                        f'delete the folder')
    return True


def _has_images(folder):
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in Path(folder).iterdir())


def _init_worker(lifeline):
    # Ctrl-C reaches every process of the group; only the parent should handle it,
    # or each worker prints its own traceback.  The parent then stops the pool
    # with SIGTERM: turning that into SystemExit lets an unfinished atomic write
    # remove its temporary file instead of leaving it in the output folder.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)
    threading.Thread(target=_die_with, args=(lifeline,), daemon=True).start()


def _die_with(lifeline):
    """Worker thread: end this worker when convert.py's main process is gone.

    A SIGKILLed parent cannot stop its pool, and the workers would wait for work
    forever, holding its output pipe (and keeping the forkserver and resource
    tracker alive).  Only the main process holds the write end of `lifeline`, and
    never writes: the read returns when the kernel closes it, however it died.
    """
    try:
        lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGTERM)  # SystemExit in the main thread: temp files removed
    # Then go, whatever the main thread does (stuck in a decoder, or in multiprocessing's exit
    # handlers flushing results to the dead parent).
    time.sleep(2)
    os._exit(1)


def _exit_quietly(signum, frame):
    raise SystemExit(128 + signum)


def _convert_task(task):
    """Worker: convert one image; a bad image is returned as its message, not raised."""
    src, dst, crop_size, enhance = task
    warnings = []
    try:
        convert_one(src, dst, crop_size, warnings, enhance)
    except BadImage as error:
        return src, str(error), []
    return src, None, warnings


def worker_count(n_proc, n_images):
    """Processes for `n_images`: `n_proc` if given, else the CPU count but at most one per
    IMAGES_PER_PROCESS images; never more than the images.

    Starting the pool costs about what 16 images do (a fresh interpreter importing this module):
    ten photographs convert sooner in this process than in two.
    """
    if n_proc is None:
        n_proc = min(os.cpu_count() or 1, math.ceil(n_images / IMAGES_PER_PROCESS))
    return max(1, min(n_proc, n_images or 1))


def convert_folder(directory, convert_directory, crop_size, extension='tiff', n_proc=None, progress=True,
                   enhance='none'):
    """Convert every image of `directory` into `convert_directory`; return a ConvertSummary.

    Outputs that already exist are skipped, so an interrupted run resumes
    where it stopped (outputs are written under a temporary name and renamed,
    so a half-written file never has the final name).  An image that cannot
    be decoded is reported on stderr by name and the others are converted.
    Errors that concern the whole run (no images, an unwritable output
    folder, a full disk) are raised.
    """
    pairs = _plan(directory, convert_directory, extension)
    Path(convert_directory).mkdir(parents=True, exist_ok=True)
    done = [_done(dst, crop_size) for _, dst in pairs]
    preprocess.claim_folder(convert_directory, crop_size, enhance,
                            has_images=any(done) or _has_images(convert_directory))
    todo = [(src, dst, crop_size, enhance) for (src, dst), ok in zip(pairs, done) if not ok]
    summary = ConvertSummary(total=len(pairs), skipped=len(pairs) - len(todo))
    n_proc = worker_count(n_proc, len(todo))

    bar = tqdm(total=len(todo), desc='convert', unit='img', file=sys.stderr, disable=not (progress and todo),
               dynamic_ncols=True)
    with bar:
        if n_proc == 1:
            _collect(map(_convert_task, todo), summary, bar)
        else:
            _convert_in_pool(todo, n_proc, summary, bar)
    if progress:
        tqdm.write(f'convert: {summary.describe(convert_directory)}', file=sys.stderr)
    return summary


def _convert_in_pool(todo, n_proc, summary, bar):
    """Convert `todo` in `n_proc` worker processes.

    A worker that dies (killed, or crashed in a decoder) breaks the pool: the
    images not yet done get one more try in a new pool, and a second death is
    an error.  (multiprocessing.Pool would wait for the lost task forever.)
    """
    for attempt in (1, 2):
        remaining = [task for task in todo if task[0] not in summary.seen]
        pool = _start_pool(n_proc)
        try:
            chunksize = max(1, min(16, len(remaining) // (n_proc * 8)))
            _collect(pool.map(_convert_task, remaining, chunksize=chunksize), summary, bar)
        except BrokenProcessPool:
            _stop(pool)
            if attempt == 2:
                raise UserError(f'a convert worker process died twice; {summary.converted} '
                                f'image(s) are done and kept: run again with --n_proc 1 to find '
                                f'an image that crashes the decoder') from None
            tqdm.write('note: a convert worker process died; trying the rest again',
                       file=sys.stderr)
            continue
        except BaseException:  # Ctrl-C, a full disk: stop the workers now
            _stop(pool)
            raise
        pool.shutdown()
        return


_LIFELINE = []  # (read end, write end), made once; the write end never leaves this process


def _start_pool(n_proc):
    # forkserver: workers start from a clean process, not a fork of this one with
    # its threads (tqdm's monitor) and whatever locks they held at that moment.
    context = multiprocessing.get_context('forkserver')
    # The workers fork from a server that has imported this module once, instead of each
    # importing it (numpy, PIL) before its first image.
    context.set_forkserver_preload([__name__])
    if not _LIFELINE:
        _LIFELINE.extend(context.Pipe(duplex=False))
    return ProcessPoolExecutor(n_proc, mp_context=context, initializer=_init_worker,
                               initargs=(_LIFELINE[0],))


def _stop(pool):
    """Cancel what is queued and end the workers; SIGTERM lets each remove its temporary file."""
    processes = list((getattr(pool, '_processes', None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(10)


def _collect(results, summary, bar):
    for src, error, warnings in results:
        summary.seen.add(src)
        if error is None:
            summary.converted += 1
        else:
            summary.failed.append(error)
            tqdm.write(f'failed: {error}', file=sys.stderr)
        for warning in warnings:
            summary.warnings.append(warning)
            if len(summary.warnings) <= MAX_WARNINGS_SHOWN:
                tqdm.write(f'warning: {warning}', file=sys.stderr)
        bar.update()


# --- convert.py --test: look at the crops ------------------------------------

def images_to_preview(directory, labels_file, count=PREVIEW_COUNT, level=PREVIEW_LEVEL):
    """The first `count` images of `level`; the first `count` images if there are no labels for them."""
    sources = list_images(directory)
    if not Path(labels_file).is_file():
        print(f'{labels_file} not found; previewing the first {count} images instead of level-{level} ones',
              file=sys.stderr)
        return sources[:count]
    from retina.data import load_labels  # here: sklearn stays out of the convert workers
    levels = load_labels(labels_file)
    chosen = [src for src in sources if levels.get(image_name(src)) == level]
    if not chosen:
        print(f'{labels_file} lists no level-{level} image of {directory}; previewing the first {count} images',
              file=sys.stderr)
        return sources[:count]
    return chosen[:count]


def side_by_side(image, box, crop):
    """The photograph (scaled to the crop's height, the eye's box drawn in green) left of its crop."""
    height = crop.height
    scale = height / image.height
    original = image.resize((max(1, round(image.width * scale)), height), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(original)
    left, top, right, bottom = scale_box(box, image.size, original.size)
    draw.rectangle((left, top, right - 1, bottom - 1), outline=(0, 255, 0), width=max(1, height // 128))
    canvas = Image.new('RGB', (original.width + crop.width, height))
    canvas.paste(original, (0, 0))
    canvas.paste(crop, (original.width, 0))
    return canvas


def has_display():
    """Whether windows can be shown: a display is set and matplotlib's backend is interactive."""
    if sys.platform.startswith('linux') and not (os.environ.get('DISPLAY') or os.environ.get('WAYLAND_DISPLAY')):
        return False
    try:
        import matplotlib
        backend = matplotlib.get_backend().lower()
    except ImportError:
        return False
    return backend not in ('agg', 'pdf', 'ps', 'svg', 'pgf', 'cairo', 'template') and 'inline' not in backend


def preview_folder(directory, crop_size, labels_file, preview_dir, count=PREVIEW_COUNT):
    """Show the crops of a few level-1 images next to their originals (convert.py --test).

    With a display each pair is shown in a window (close it for the next);
    without one, each pair is written to `preview_dir` as {name}_preview.png.
    Returns (paths written, empty when shown on screen; messages of the images that failed).
    """
    sources = images_to_preview(directory, labels_file, count)
    show = has_display()
    written, failed = [], []
    for src in sources:
        try:
            image = load_for_crop(src, crop_size)
        except BadImage as error:
            print(f'failed: {error}', file=sys.stderr)
            failed.append(str(error))
            continue
        box = find_eye_box_fast(image)
        pair = side_by_side(image, box, crop_to_eye(image, crop_size, box))
        if show:
            _show(pair, f'{image_name(src)}: photograph and crop (close the window for the next)')
        else:
            path = Path(preview_dir) / f'{image_name(src)}_preview.png'
            save_image(path, pair)
            written.append(path)
    if written:
        print(f'no display: wrote {len(written)} previews (photograph with the box left, crop right) '
              f'to {preview_dir}/')
    return written, failed


def _show(image, title):
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(12, 5))
    axes.imshow(image)
    axes.set_title(title)
    axes.axis('off')
    plt.show()
    plt.close(figure)
