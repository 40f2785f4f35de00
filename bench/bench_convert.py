#!/usr/bin/env python
"""How much faster convert.py's fast path is than the plain algorithm, and how close its crops are.

    python bench/bench_convert.py --directory ../shared/data/eyepacs_sample/train --crop_size 512

Times, interleaved round by round (see report.interleaved) so that a shared
machine's load falls on every variant alike, medians reported:
- per image, in this process: the reference (full decode, blur the whole
  photograph, find the box, crop, Lanczos resize) against the fast path
  (`retina.data.crop.convert_one`: DCT-scaled decode, box on a reduced copy,
  bilinear resize), and the fast path over a process pool;
- whole processes, start-up included: `python convert.py` on the folder
  against a process running the reference over it;
- the decode/resize alternatives, each photograph decoded, cropped and
  resized (not saved) with Pillow's draft decode and Lanczos, bicubic or
  bilinear, and, when OpenCV is installed, its reduced decode with
  INTER_AREA; also the box and resize alone on the decoded images; each with
  its largest mean absolute difference from the reference crop (the tests
  allow 6 of 255).
Every pass of the first two groups decodes, crops and saves each image.
Prints markdown and puts it in BENCHMARKS.md under `## convert.py` (other
sections are kept).
"""
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import PIL
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / 'bench'))

from report import cpu_model, interleaved, medians, paired_ratio, replace_section, today  # noqa: E402
from retina.core.atomic import save_image  # noqa: E402
from retina.core.errors import handle_errors  # noqa: E402
from retina.data import conversion, crop  # noqa: E402
from retina.data.images import list_images, load_rgb  # noqa: E402

SECTION = 'convert.py'
DEFAULT_DIRECTORY = REPO.parent / 'shared' / 'data' / 'eyepacs_sample' / 'train'
ALTERNATIVE_ROUNDS = 3  # rounds of the alternatives per --rounds: they are short, and close


def reference_one(src, dst, crop_size):
    """The plain algorithm, as the original ran it: everything at full resolution."""
    image = load_rgb(src)
    save_image(dst, crop.crop_to_eye_reference(image, crop_size), **crop.save_options(dst))


def seconds(run):
    """Wall seconds of `run()`."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


class Passes:
    """Makes each pass write into a fresh folder, so that no pass skips work done before."""

    def __init__(self, root):
        self.root, self.count = Path(root), 0

    def folder(self, name):
        self.count += 1
        return self.root / f'{name}_{self.count}'


def one_by_one(function, sources, passes, name, crop_size, extension):
    """Seconds per image of `function(src, dst, crop_size)` over all sources in this process."""
    def run():
        out_dir = passes.folder(name)
        out_dir.mkdir()
        for src in sources:
            function(src, conversion.output_path(src, out_dir, extension), crop_size)
    return lambda: seconds(run) / len(sources)


def with_pool(directory, count, passes, crop_size, extension, n_proc):
    """Seconds per image of convert_folder with `n_proc` processes, as convert.py runs it."""
    def run():
        summary = conversion.convert_folder(directory, passes.folder('pool'), crop_size, extension,
                                      n_proc=n_proc, progress=False)
        if summary.failed:
            raise SystemExit(f'{len(summary.failed)} images failed: {summary.failed[0]}')
    return lambda: seconds(run) / count


def process(command_for, passes, name):
    """Wall seconds of the process `command_for(out_dir)`, start-up included."""
    def run():
        subprocess.run(command_for(passes.folder(name)), check=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    return lambda: seconds(run)


# --- the decode/resize alternatives -------------------------------------------

class PillowPath:
    """convert.py's path (draft decode, box on a reduced copy) with `resample` for the resize."""

    def __init__(self, resample):
        self.resample = resample

    def decode(self, src, crop_size):
        return crop.load_for_crop(src, crop_size)

    def resize(self, image, crop_size):
        box = crop.find_eye_box_fast(image)
        return np.asarray(image.resize((crop_size, crop_size), self.resample, box=box,
                                       reducing_gap=3.0))


class OpenCVPath:
    """OpenCV's reduced JPEG decode at the largest 1/2, 1/4, 1/8 that keeps the crop >=
    crop_size, the box as convert.py finds it, INTER_AREA."""

    def __init__(self, cv2):
        self.cv2 = cv2
        cv2.setNumThreads(1)
        self.flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
                      4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}

    def decode(self, src, crop_size):
        with Image.open(src) as image:
            width, height = image.size
        need, scale = math.ceil(crop_size / crop.MIN_BOX_FRACTION), 1
        while scale < 8 and min(width, height) // (2 * scale) >= need:
            scale *= 2
        return self.cv2.imread(str(src), self.flags[scale])[:, :, ::-1]

    def resize(self, rgb, crop_size):
        left, top, right, bottom = crop.find_eye_box_fast(Image.fromarray(rgb))
        return self.cv2.resize(np.ascontiguousarray(rgb[top:bottom, left:right]),
                               (crop_size, crop_size), interpolation=self.cv2.INTER_AREA)


def alternatives(sources, crop_size, rounds):
    """Rows (label, ms per image decoded + boxed + resized, ms of box + resize alone, largest
    mean |difference| from the reference crop); OpenCV's row only where it is installed."""
    resample = Image.Resampling
    paths = {f'Pillow draft decode + {f.name.lower()}'
             + (' (convert.py)' if f == crop.RESAMPLE else ''): PillowPath(f)
             for f in (resample.LANCZOS, resample.BICUBIC, resample.BILINEAR)}
    try:
        import cv2
        paths[f'OpenCV {cv2.__version__} reduced decode + INTER_AREA'] = OpenCVPath(cv2)
    except ImportError:
        pass
    references = [np.asarray(crop.crop_to_eye_reference(load_rgb(src), crop_size), dtype=np.float32)
                  for src in sources]
    decoded = {label: [path.decode(src, crop_size) for src in sources]
               for label, path in paths.items()}
    difference = {label: max(float(np.abs(np.asarray(path.resize(image, crop_size),
                                                      dtype=np.float32) - reference).mean())
                              for image, reference in zip(decoded[label], references))
                  for label, path in paths.items()}

    def whole(path):
        return lambda: seconds(lambda: [path.resize(path.decode(src, crop_size), crop_size)
                                        for src in sources]) / len(sources)

    def resize_alone(path, images):
        return lambda: seconds(lambda: [path.resize(image, crop_size)
                                        for image in images]) / len(sources)
    variants = {(label, 'whole'): whole(path) for label, path in paths.items()}
    variants.update({(label, 'resize'): resize_alone(path, decoded[label])
                     for label, path in paths.items()})
    times = medians(interleaved(variants, rounds))
    return [(label, 1000 * times[label, 'whole'], 1000 * times[label, 'resize'],
             difference[label]) for label in paths]


def box_agreement(sources, crop_size):
    """Max box deviation (full-resolution pixels and fraction of the height) and mean output difference."""
    worst_px, worst_fraction, differences = 0, 0.0, []
    for src in sources:
        full = load_rgb(src)
        reference_box = crop.find_eye_box(full)
        decoded = crop.load_for_crop(src, crop_size)
        fast_box = crop.scale_box(crop.find_eye_box_fast(decoded), decoded.size, full.size)
        deviation = max(abs(a - b) for a, b in zip(fast_box, reference_box))
        worst_px = max(worst_px, deviation)
        worst_fraction = max(worst_fraction, deviation / full.height)
        fast = np.asarray(crop.crop_to_eye(decoded, crop_size), dtype=np.float64)
        reference = np.asarray(crop.crop_to_eye_reference(full, crop_size), dtype=np.float64)
        differences.append(np.abs(fast - reference).mean())
    return worst_px, worst_fraction, float(np.max(differences))


@click.command()
@click.option('--directory', default=str(DEFAULT_DIRECTORY), show_default=True, type=click.Path(file_okay=False),
              help='Folder of photographs to time.')
@click.option('--crop_size', default=512, show_default=True, type=click.IntRange(min=8), help='Output size.')
@click.option('--extension', default='tiff', show_default=True,
              type=click.Choice(crop.OUTPUT_EXTENSIONS), help='Output format (as convert.py).')
@click.option('--rounds', default=3, show_default=True, type=click.IntRange(min=1),
              help='Interleaved rounds: each variant runs once per round; medians are reported.')
@click.option('--copies', default=10, show_default=True, type=click.IntRange(min=1),
              help='The fast per-image rows convert each photograph this many times per pass '
                   '(the reference and the whole-process rows once).')
@click.option('--n_proc', default=os.cpu_count(), show_default=True, type=click.IntRange(min=1),
              help='Processes for the pool row.')
@click.option('--benchmarks_file', default=str(REPO / 'BENCHMARKS.md'), show_default=True,
              type=click.Path(dir_okay=False), help='Markdown file whose "## convert.py" section is replaced.')
@click.option('--reference_into', type=click.Path(file_okay=False), hidden=True,
              help='Internal: run the reference over --directory into this folder and exit '
                   '(the whole-process reference row).')
@handle_errors()
def main(directory, crop_size, extension, rounds, copies, n_proc, benchmarks_file, reference_into):
    """Time convert.py's fast path against the plain full-resolution algorithm."""
    sources = list_images(directory)
    if reference_into:
        Path(reference_into).mkdir(parents=True, exist_ok=True)
        for src in sources:
            reference_one(src, conversion.output_path(src, reference_into, extension), crop_size)
        return
    n = len(sources)
    for src in sources:  # the page cache: every variant reads the files from memory
        src.read_bytes()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix='bench_convert_') as tmp:
        tmp = Path(tmp)
        # The fast rows need many images per pass for a stable rate (and the pool to get past
        # its start-up): each photograph linked `copies` times.
        copies_dir = tmp / 'inputs'
        copies_dir.mkdir()
        for src in sources:
            for i in range(copies):
                (copies_dir / f'{src.stem}_copy{i}{src.suffix}').symlink_to(src.resolve())
        many = list_images(copies_dir)
        passes = Passes(tmp)
        common = ['--directory', str(directory), '--crop_size', str(crop_size), '--extension', extension]
        per_image = interleaved({
            'reference': one_by_one(reference_one, sources, passes, 'reference', crop_size, extension),
            'fast': one_by_one(crop.convert_one, many, passes, 'fast', crop_size, extension),
            'pool': with_pool(copies_dir, len(many), passes, crop_size, extension, n_proc),
            'reference process': process(lambda out: [sys.executable, __file__, *common,
                                                      '--reference_into', str(out)],
                                         passes, 'reference_process'),
            'convert.py': process(lambda out: [sys.executable, str(REPO / 'convert.py'), *common,
                                               '--convert_directory', str(out), '--no_progress'],
                                  passes, 'convert'),
        }, rounds)
    timing = medians(per_image)
    worst_px, worst_fraction, difference = box_agreement(sources, crop_size)
    alternative_rows = alternatives(sources, crop_size, ALTERNATIVE_ROUNDS * rounds)
    sizes = sorted({Image.open(src).size for src in sources})
    size_text = ', '.join(f'{w}×{h}' for w, h in sizes)

    def speedup(name):
        return paired_ratio(per_image['reference'], per_image[name])

    rows = [
        ('reference: full decode, BLUR whole photo, box, crop, Lanczos', 1, 'reference'),
        ('fast (`convert_one`): DCT-scaled decode, box on ≤1024-px copy, bilinear', 1, 'fast'),
        ('fast, process pool (`convert_folder`)', n_proc, 'pool'),
    ]
    table = ['| per image | processes | images/s | ms/image | speed-up vs reference |',
             '| --- | ---: | ---: | ---: | ---: |']
    for label, processes, key in rows:
        table.append(f'| {label} | {processes} | {1 / timing[key]:.2f} | {1000 * timing[key]:.1f} '
                     f'| {speedup(key):.1f}× |')
    whole = paired_ratio(per_image['reference process'], per_image['convert.py'])
    alternative_table = ['| decode + box + resize (not saved) | ms/image | box + resize alone, '
                         'ms/image | largest mean \\|diff\\| from the reference crop (of 255) |',
                         '| --- | ---: | ---: | ---: |']
    alternative_table += [f'| {label} | {ms:.1f} | {alone:.1f} | {diff:.2f} |'
                          for label, ms, alone, diff in alternative_rows]
    command = (f'python bench/bench_convert.py --directory {directory} --crop_size {crop_size} '
               f'--extension {extension} --rounds {rounds} --copies {copies} --n_proc {n_proc}')
    section = '\n'.join([
        f'`{command}`',
        '',
        f'- date: {today()}; device: {cpu_model()}, {os.cpu_count()} cores; '
        f'Python {platform.python_version()}, Pillow {PIL.__version__}, numpy {np.__version__}',
        f'- {n} photographs ({size_text}) → {crop_size}² {extension}; each pass decodes, crops and '
        f'saves every image (the reference each photograph once, the fast rows each {copies} times); '
        f'{rounds} interleaved rounds, medians; speed-ups are the median of the per-round ratios; '
        f'load average before the run {load_before:.1f}',
        '',
        *table,
        '',
        f'- per image, one process: **{speedup("fast"):.1f}×** (target ≥ 50×); with the pool '
        f'({n_proc} processes): **{speedup("pool"):.1f}×**',
        f'- whole process on the {n} photographs, start-up included: `convert.py` '
        f'{timing["convert.py"]:.2f} s (default --n_proc), the reference process '
        f'{timing["reference process"]:.2f} s: **{whole:.1f}×** (target ≥ 12×)',
        f'- box agreement: the fast box is at most **{worst_px} px** (full resolution; '
        f'{100 * worst_fraction:.2f}% of the height) from the reference box; '
        f'largest mean absolute difference of an output from the reference {difference:.2f} / 255',
        '',
        'The decode/resize alternatives, interleaved in one process (medians of '
        f'{ALTERNATIVE_ROUNDS * rounds} rounds over the {n} photographs; the OpenCV row '
        'appears where opencv-python-headless is installed):',
        '',
        *alternative_table,
        '',
    ])
    print(section)
    replace_section(SECTION, section, benchmarks_file)
    print(f'updated {benchmarks_file}', file=sys.stderr)


if __name__ == '__main__':
    main()
