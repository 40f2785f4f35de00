#!/usr/bin/env python
"""Time predict.py per photograph: a full-resolution photo graded by a 512-px net on the CPU.

    python bench/bench_predict.py                      # the competition's sample photographs
    python bench/bench_predict.py --directory photos --cnf c_512_4x4_32 --threads 2

Untrained weights of the config (the time does not depend on the values).
Per photograph, after the net is loaded (once per process): decoding at
convert.py's DCT scale with EXIF orientation, finding the eye, crop and
Lanczos resize to 512 px, the net on the 448-px window; then the same with
the RAM heat map drawn over the photograph, and with 5 TTA iterations.
Each is the median over the photographs (after one warm-up).  Also the whole
command once (`python predict.py PHOTO`: interpreter, imports, weights).
`--released NAME` (repeatable) adds a row per released model graded as predict.py grades with
it, a chain (`--blend NAME`: its nets, their TTA features, its blend) or a net alone (its
centred window); the models are timed in turn on each photograph (interleaved), so that the
machine's load falls on all of them alike.
Prints a markdown table and puts it in BENCHMARKS.md under `## predict.py`.
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from report import device_name, replace_section, today  # noqa: E402
from retina.core.errors import handle_errors  # noqa: E402

SECTION = 'predict.py'
DEFAULT_DIRECTORY = REPO.parent / 'shared' / 'data' / 'eyepacs_sample' / 'train'
TARGET_SECONDS = 2.0


def median_seconds(run, photos):
    run(photos[0])  # warm-up: first-call allocations, thread pools
    times = []
    for photo in photos:
        start = time.perf_counter()
        run(photo)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def released_rows(names, photos):
    """[(label, median seconds per photograph)] of grading with each released model as
    predict.py does, the models timed in turn on each photograph after one warm-up each."""
    from retina.grade.grader import LoadedBlend, load_grader
    from retina.grade.predict import grade
    from retina.model import checkpoint, released
    runs = []
    for name in names:
        if released.is_chain(name):
            blend_file, nets = released.chain(name)
            graders = [load_grader(c, w, 'cpu') for c, w in nets]
            blend = LoadedBlend(blend_file)
            views = sorted({e['n_iter'] for r in blend.state['runs'] for e in r['files']})
            label = (f'released chain {name} ({len(graders)} nets, {"/".join(map(str, views))} '
                     f'TTA views each, its blend)')
        else:
            graders, blend = [load_grader(checkpoint.trained_config(name), name, 'cpu')], None
            label = f'released net {name} (centred window)'
        runs.append((label, graders, blend))
    times = {label: [] for label, _, _ in runs}
    for i, photo in enumerate([photos[0], *photos]):
        for label, graders, blend in runs:
            started = time.perf_counter()
            grade(graders, [photo], blend=blend, progress=False)
            if i:  # the first pass is the warm-up
                times[label].append(time.perf_counter() - started)
    return [(label, statistics.median(times[label])) for label, _, _ in runs]


@click.command(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--directory', default=str(DEFAULT_DIRECTORY), show_default=True,
              type=click.Path(file_okay=False, exists=True),
              help='Photographs to grade (full resolution is the realistic case).')
@click.option('--cnf', default='c_512_5x5_32_ram', show_default=True,
              help='A 512-px config (RAM for the heat-map row).')
@click.option('--limit', default=5, show_default=True, type=click.IntRange(min=1),
              help='Photographs timed.')
@click.option('--threads', type=click.IntRange(min=1),
              help='torch CPU threads [default: torch\'s own choice].')
@click.option('--released', 'released_names', multiple=True, metavar='NAME',
              help='A released model (models/index.json) to time as predict.py grades with it; '
                   'repeat for several.')
@click.option('--no_write', is_flag=True, help='Print the table only; leave BENCHMARKS.md alone.')
@handle_errors()
def main(directory, cnf, limit, threads, released_names, no_write):
    """Time grading one photograph with predict.py's functions on the CPU."""
    import torch
    from PIL import Image

    from retina.data.images import list_images
    from retina.grade.grader import load_grader
    from retina.grade.predict import grade
    from retina.model import checkpoint
    from retina.model import config as config_module

    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    photos = list_images(directory)[:limit]
    config = config_module.load(cnf)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / 'weights.pt'
        checkpoint.save(weights, config.build_net(), config, epoch=0)
        started = time.perf_counter()
        grader = load_grader(cnf, weights, 'cpu')
        load_seconds = time.perf_counter() - started

        def plain(photo):
            grade([grader], [photo], progress=False)

        def with_map(photo):
            grade([grader], [photo], heatmap_dir=Path(tmp) / 'maps', progress=False)

        def with_tta(photo):
            grade([grader], [photo], n_iter=5, progress=False)

        rows = [('score', median_seconds(plain, photos))]
        if grader.is_ram:
            rows.append(('score + heat map over the photograph', median_seconds(with_map, photos)))
        rows.append(('score, 5 TTA iterations', median_seconds(with_tta, photos)))
        rows += released_rows(released_names, photos)
        started = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / 'predict.py'), str(photos[0]), '--cnf', cnf,
                        '--weights_from', str(weights), '--no_progress'], check=True,
                       capture_output=True, env={'PYTHONPATH': str(REPO), 'PATH': '/usr/bin:/bin'})
        command_seconds = time.perf_counter() - started
    load = max(load_before, os.getloadavg()[0])
    sizes = sorted({Image.open(p).size for p in photos})
    shown = ', '.join(f'{w}×{h}' for w, h in sizes[:3]) + (' …' if len(sizes) > 3 else '')
    lines = [f'{today()}, {device_name(torch.device("cpu"))}; {cnf} (untrained weights), '
             f'{len(photos)} photographs of {Path(directory).name} ({shown}), median per '
             f'photograph after a warm-up; target < {TARGET_SECONDS:.0f} s.  Load average '
             f'{load:.1f} during the run (other jobs share the machine: the times are upper '
             f'bounds when it exceeds the core count).',
             '', '| per photograph | seconds |', '| --- | --- |']
    lines += [f'| {what} | {seconds:.2f} |' for what, seconds in rows]
    lines += [f'| loading the net (once per run) | {load_seconds:.2f} |',
              f'| the whole command on one photograph (`python predict.py PHOTO`) | '
              f'{command_seconds:.2f} |', '',
              'Command: `python bench/bench_predict.py'
              + (f' --threads {threads}' if threads else '')
              + ''.join(f' --released {n}' for n in released_names) + '`.']
    body = '\n'.join(lines)
    click.echo(body)
    if not no_write:
        replace_section(SECTION, body)


if __name__ == '__main__':
    main()
