#!/usr/bin/env python
"""How much faster convert.py's fast path is than the plain algorithm, and how close its box is.

    python bench/bench_convert.py --directory ../shared/data/eyepacs_sample/train --crop_size 512

Times, on the same images and in one run: the reference (full decode, blur
the whole photograph, find the box, crop, Lanczos resize), the fast path
(`retina.crop.convert_one`: DCT-scaled decode, box on a reduced copy), both
in one process, and the fast path over a process pool as convert.py runs it.
Every pass decodes, crops and saves each image.  Also reports how far the
fast box is from the reference box in full-resolution pixels and how much
the two outputs differ.  Prints a markdown table and puts it in
BENCHMARKS.md under `## convert.py` (other sections are kept).
"""
import datetime
import os
import platform
import resource
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

from report import cpu_model, replace_section  # noqa: E402
from retina import crop  # noqa: E402
from retina.atomic import save_image  # noqa: E402
from retina.errors import handle_errors  # noqa: E402
from retina.images import list_images, load_rgb  # noqa: E402

SECTION = 'convert.py'
DEFAULT_DIRECTORY = REPO.parent / 'shared' / 'data' / 'eyepacs_sample' / 'train'


def reference_one(src, dst, crop_size):
    """The plain algorithm, as the original ran it: everything at full resolution."""
    image = load_rgb(src)
    save_image(dst, crop.crop_to_eye_reference(image, crop_size), **crop.save_options(dst))


def cpu_seconds():
    """CPU time of this process and of its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run):
    """(wall seconds, CPU seconds) of `run()`."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    run()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def one_by_one(function, sources, out_dir, crop_size, extension):
    """A pass of `function(src, dst, crop_size)` over all sources in this process, into a fresh folder."""
    def run():
        for src in sources:
            function(src, crop.output_path(src, out_dir, extension), crop_size)
    return run


def with_pool(directory, out_dir, crop_size, extension, n_proc):
    """A pass of convert_folder, as convert.py runs it."""
    def run():
        summary = crop.convert_folder(directory, out_dir, crop_size, extension, n_proc=n_proc, progress=False)
        if summary.failed:
            raise SystemExit(f'{len(summary.failed)} images failed: {summary.failed[0]}')
    return run


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
    return worst_px, worst_fraction, float(np.mean(differences))


@click.command()
@click.option('--directory', default=str(DEFAULT_DIRECTORY), show_default=True, type=click.Path(file_okay=False),
              help='Folder of photographs to time.')
@click.option('--crop_size', default=512, show_default=True, type=click.IntRange(min=8), help='Output size.')
@click.option('--extension', default='tiff', show_default=True,
              type=click.Choice(crop.OUTPUT_EXTENSIONS), help='Output format (as convert.py).')
@click.option('--repeat', default=3, show_default=True, type=click.IntRange(min=1),
              help='Passes per variant; the fastest pass counts.')
@click.option('--copies', default=10, show_default=True, type=click.IntRange(min=1),
              help='The fast rows convert each photograph this many times per pass (the reference once).')
@click.option('--n_proc', default=os.cpu_count(), show_default=True, type=click.IntRange(min=1),
              help='Processes for the pool row.')
@click.option('--benchmarks_file', default=str(REPO / 'BENCHMARKS.md'), show_default=True,
              type=click.Path(dir_okay=False), help='Markdown file whose "## convert.py" section is replaced.')
@handle_errors()
def main(directory, crop_size, extension, repeat, copies, n_proc, benchmarks_file):
    """Time convert.py's fast path against the plain full-resolution algorithm."""
    sources = list_images(directory)
    n = len(sources)
    # Warm the page cache so that every variant reads the files from memory.
    for src in sources:
        src.read_bytes()

    load_before = os.getloadavg()[0]
    timings = {}
    with tempfile.TemporaryDirectory(prefix='bench_convert_') as tmp:
        tmp = Path(tmp)
        # The fast path needs many images per pass for a stable rate (and for the
        # pool to get past its start-up): link each photograph `copies` times.
        copies_dir = tmp / 'inputs'
        copies_dir.mkdir()
        for src in sources:
            for i in range(copies):
                (copies_dir / f'{src.stem}_copy{i}{src.suffix}').symlink_to(src.resolve())
        many = list_images(copies_dir)
        counts = {'reference': n, 'fast': len(many), 'pool': len(many)}
        passes = {
            'reference': lambda i: one_by_one(reference_one, sources, tmp / f'reference_{i}', crop_size, extension),
            'fast': lambda i: one_by_one(crop.convert_one, many, tmp / f'fast_{i}', crop_size, extension),
            'pool': lambda i: with_pool(copies_dir, tmp / f'pool_{i}', crop_size, extension, n_proc),
        }
        for name, make in passes.items():
            # The fastest pass is the least disturbed by whatever else runs on the machine.
            timings[name] = min((timed(make(i)) for i in range(repeat)), key=lambda t: t[0])

    worst_px, worst_fraction, difference = box_agreement(sources, crop_size)
    rate = {name: counts[name] / wall for name, (wall, cpu) in timings.items()}
    cpu_ms = {name: 1000 * cpu / counts[name] for name, (wall, cpu) in timings.items()}
    sizes = sorted({Image.open(src).size for src in sources})
    size_text = ', '.join(f'{w}×{h}' for w, h in sizes)

    rows = [
        ('reference: full decode, BLUR whole photo, box, crop, Lanczos', 1, 'reference'),
        ('fast (`convert_one`): DCT-scaled decode, box on ≤1024-px copy, Lanczos', 1, 'fast'),
        ('fast, process pool (`convert_folder`, as convert.py)', n_proc, 'pool'),
    ]
    table = ['| path | processes | images/s | wall ms/image | CPU ms/image | speed-up vs reference |',
             '| --- | ---: | ---: | ---: | ---: | ---: |']
    for label, processes, key in rows:
        # The pool's workers are forked by multiprocessing's forkserver, not by this process:
        # their CPU time is not among this process's children, so it is not shown.
        cpu_text = '–' if key == 'pool' and processes > 1 else f'{cpu_ms[key]:.0f}'
        table.append(f'| {label} | {processes} | {rate[key]:.2f} | {1000 / rate[key]:.0f} | {cpu_text} '
                     f'| {rate[key] / rate["reference"]:.1f}× |')
    command = (f'python bench/bench_convert.py --directory {directory} --crop_size {crop_size} '
               f'--extension {extension} --repeat {repeat} --copies {copies} --n_proc {n_proc}')
    section = '\n'.join([
        f'`{command}`',
        '',
        f'- date: {datetime.date.today().isoformat()}; device: {cpu_model()}, {os.cpu_count()} cores; '
        f'Python {platform.python_version()}, Pillow {PIL.__version__}, numpy {np.__version__}',
        f'- {n} photographs ({size_text}) → {crop_size}² {extension}; each pass decodes, crops and '
        f'saves every image (the reference each photograph once, the fast rows each {copies} times); '
        f'best of {repeat} passes; load average before the run {load_before:.1f}',
        '',
        *table,
        '',
        f'- speed-up, one process: **{rate["fast"] / rate["reference"]:.1f}×**; '
        f'with the pool ({n_proc} processes): **{rate["pool"] / rate["reference"]:.1f}×**; '
        f'in CPU time per image: {cpu_ms["reference"] / cpu_ms["fast"]:.1f}×',
        f'- box agreement: the fast box is at most **{worst_px} px** (full resolution; '
        f'{100 * worst_fraction:.2f}% of the height) from the reference box; '
        f'mean absolute difference of the outputs {difference:.2f} / 255',
        '',
    ])
    print(section)
    replace_section(SECTION, section, benchmarks_file)
    print(f'updated {benchmarks_file}', file=sys.stderr)


if __name__ == '__main__':
    main()
