"""Converting a folder of photographs (convert.py): which images still need converting, a
pool of worker processes that dies with its parent, and the summary with its warnings.
One image's conversion is `crop.convert_one`."""
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

from PIL import Image
from tqdm import tqdm

from retina.core.errors import UserError
from retina.core.paths import IMAGE_EXTENSIONS
from retina.data import preprocess
from retina.data.crop import OUTPUT_EXTENSIONS, convert_one
from retina.data.images import BadImage, TOO_LARGE, image_name, list_images

IMAGES_PER_PROCESS = 16   # convert_folder's default: no more processes than one per this many images
MAX_WARNINGS_SHOWN = 20   # warnings printed one by one; the rest are counted


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
    src, dst, crop_size, preprocessing = task
    warnings = []
    try:
        convert_one(src, dst, crop_size, warnings, preprocessing)
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


def convert_folder(directory, convert_directory, crop_size, extension='tiff', n_proc=None,
                   progress=True, preprocessing='none'):
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
    preprocess.claim_folder(convert_directory, crop_size, preprocessing,
                            has_images=any(done) or _has_images(convert_directory))
    todo = [(src, dst, crop_size, preprocessing) for (src, dst), ok in zip(pairs, done) if not ok]
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
