#!/usr/bin/env python
"""No wrong grade given silently: what predict.py does with compressed, foreign and half-usable
photographs, and how many real photographs of each source it calls ungradable.

    python bench/bench_wrong_grades.py [--weights_from eyepacs-256] [--limit 40]
        [--odir data/real2/odir] [--refit_photos data/real2/e256_eyepacs --refit_labels L.csv]
        [--write]

1. Cases (issue 29's table): test-split photographs (retina.data.labels.held_out at 0.15) of
   eyepacs256 and eyepacs_raw, each made into: JPEG re-saved at qualities 5, 10, 20, 30, 50;
   quality 5 saved as PNG; a Gaussian blur of radius 8; the top-left quarter; a large white
   "SAMPLE" watermark; rotated 90°; grayscale (8-bit and 16-bit PNG); plus desktop icons
   (Adwaita's, where installed) alone and pasted on a black 1536-px frame.  Each folder is
   graded by predict.py as a user would; per case: the share called ungradable, its reasons,
   and among the photographs still graded, the share whose level moved from the original's,
   and by more than one level.
2. Real photographs of every source (eyepacs_raw, eyepacs_raw1024, heimed, the eyepacs256 test
   split, ODIR-5K's test split with --odir): the share called ungradable and why.  Target: at
   most 2% per source.
3. 'unlike the training photos' by level on the test splits: with the checkpoint's statistics,
   and (with --refit_photos/--refit_labels: the converted photographs the net trained on) refit
   with one mean per level (retina.model.feature_stats.FeatureStats).  Target: the rate for level 3-4
   eyes no higher than for level 0.
--write puts the tables into BENCHMARKS.md, "Gradability: wrong grades caught".
"""
import csv
import io
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from report import cpu_model, replace_section, today  # noqa: E402

from retina.core.paths import IMAGE_EXTENSIONS  # noqa: E402
from retina.data.labels import held_out, load_labels  # noqa: E402

SHARED = REPO.parent / 'shared' / 'data'
SECTION = 'Gradability: wrong grades caught'
ICONS = ('drive-harddisk', 'input-keyboard', 'computer', 'printer', 'phone', 'media-optical',
         'audio-headphones', 'camera-photo', 'camera-web')


def _jpeg(quality):
    return lambda image: ('jpeg', image, dict(quality=quality))


def _png(transform):
    return lambda image: ('png', transform(image), {})


def _watermark(image):
    marked = image.copy()
    width, height = image.size
    draw = ImageDraw.Draw(marked)
    try:
        font = ImageFont.truetype('DejaVuSans-Bold.ttf', width // 6)
    except OSError:
        font = ImageFont.load_default(size=width // 6)
    draw.text((width * 0.12, height * 0.4), 'SAMPLE', fill=(255, 255, 255), font=font)
    return marked


def _q5_png(image):
    buffer = io.BytesIO()
    image.save(buffer, 'JPEG', quality=5)
    return Image.open(buffer).convert('RGB')


def _grey16(image):
    return Image.fromarray((np.asarray(image.convert('L'), dtype=np.uint16) * 257))


CASES = {
    'JPEG quality 50': _jpeg(50), 'JPEG quality 30': _jpeg(30), 'JPEG quality 20': _jpeg(20),
    'JPEG quality 10': _jpeg(10), 'JPEG quality 5': _jpeg(5),
    'JPEG quality 5, saved as PNG': _png(_q5_png),
    'blur radius 8': _png(lambda im: im.filter(ImageFilter.GaussianBlur(8))),
    'a quarter of the eye': _png(lambda im: im.crop((0, 0, im.size[0] // 2, im.size[1] // 2))),
    'large "SAMPLE" watermark': _png(_watermark),
    'rotated 90°': _png(lambda im: im.rotate(90, expand=True)),
    'grayscale, 8 bit': _png(lambda im: im.convert('L')),
    'grayscale, 16 bit': _png(_grey16),
}


def photos_of(folder, hold_out=0.15, limit=None, test_only=True):
    folder = Path(folder)
    images = folder / 'train' if (folder / 'train').is_dir() else folder
    labels = load_labels(folder / 'trainLabels.csv') if (folder / 'trainLabels.csv').is_file() \
        else {}
    paths = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                   and (not test_only or held_out(p.stem, hold_out)))
    return paths[:limit] if limit else paths, labels


def grade(folder, weights):
    command = [sys.executable, str(REPO / 'predict.py'), str(folder)]
    command += ['--weights_from', weights] if weights else []
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode not in (0, 1):
        raise SystemExit(f'predict.py failed on {folder}: {result.stderr[-2000:]}')
    return {row['image']: row for row in csv.DictReader(io.StringIO(result.stdout))}


def reasons_of(rows):
    counts = Counter(r for row in rows for r in row['reasons'].split('; ') if r)
    return ', '.join(f'{r} {n}' for r, n in counts.most_common())


def level(row):
    return int(row['level']) if row.get('level') not in (None, '') else None


def case_rows(sources, weights, limit, tmp):
    lines = ['| case | photographs | called ungradable | reasons | still graded: level moved '
             '| by more than one level |', '| --- | ---: | ---: | --- | ---: | ---: |']
    originals = tmp / 'originals'
    originals.mkdir()
    for name, folder in sources.items():
        paths, _ = photos_of(folder, limit=limit)
        for path in paths:
            Image.open(path).convert('RGB').save(originals / f'{path.stem}.png')
    reference = grade(originals, weights)
    graded = [n for n, row in reference.items() if row['gradable'] == 'yes']
    lines.append(f'| the photographs as they are | {len(reference)} | '
                 f'{1 - len(graded) / len(reference):.0%} | {reasons_of(reference.values())} | — | — |')
    for case, make in CASES.items():
        folder = tmp / case.replace(' ', '_').replace('"', '').replace(',', '')
        folder.mkdir()
        for path in sorted(originals.iterdir()):
            kind, image, options = make(Image.open(path).convert('RGB'))
            image.save(folder / f'{path.stem}.{kind}', **options)
        rows = grade(folder, weights)
        still = [n for n in graded if rows[n]['gradable'] == 'yes']
        moved = [abs(level(rows[n]) - level(reference[n])) for n in still]
        bad = np.mean([rows[n]['gradable'] == 'no' for n in rows])
        lines.append(f'| {case} | {len(rows)} | {bad:.0%} | {reasons_of(rows.values())} | '
                     + (f'{np.mean(np.array(moved) > 0):.0%} ({len(still)}) | '
                        f'{np.mean(np.array(moved) > 1):.0%} |' if still else '— | — |'))
        click.echo(lines[-1])
    icons = [p for name in ICONS for p in Path('/usr/share/icons/Adwaita').glob(f'512x512/*/{name}.png')]
    if icons:
        for label, frame in (('desktop icons', False), ('desktop icons on a black 1536-px frame', True)):
            folder = tmp / label.replace(' ', '_')
            folder.mkdir()
            for icon in icons:
                rgba = Image.open(icon).convert('RGBA')
                if frame:
                    black = Image.new('RGB', rgba.size)
                    black.paste(rgba, mask=rgba)
                    image = Image.new('RGB', (1536, 1024))
                    image.paste(black.resize((900, 900)), (318, 62))
                else:
                    image = Image.new('RGB', rgba.size, 'white')
                    image.paste(rgba, mask=rgba)
                image.save(folder / f'{icon.stem}.png')
            rows = grade(folder, weights)
            graded_icons = [n for n, row in rows.items() if row['gradable'] == 'yes']
            lines.append(f'| {label} (Adwaita: {", ".join(sorted(rows))}) | {len(rows)} | '
                         f'{1 - len(graded_icons) / len(rows):.0%} | {reasons_of(rows.values())} | '
                         f'graded: {", ".join(graded_icons) or "none"} | |')
            click.echo(lines[-1])
    return lines


def real_rows(sources, weights):
    lines = ['| source | photographs | called ungradable | reasons |', '| --- | ---: | ---: | --- |']
    graded = {}
    for name, (folder, test_only) in sources.items():
        paths, labels = photos_of(folder, test_only=test_only)
        with tempfile.TemporaryDirectory() as tmp:
            for path in paths:
                (Path(tmp) / path.name).symlink_to(path.resolve())
            rows = grade(tmp, weights)
        graded[name] = (rows, labels)
        bad = [row for row in rows.values() if row['gradable'] == 'no']
        lines.append(f'| {name}{" (test split)" if test_only else ""} | {len(rows)} | '
                     f'{len(bad) / len(rows):.1%} | {reasons_of(bad)} |')
        click.echo(lines[-1])
    return lines, graded


def unlike_by_level(graded):
    lines = ['| test split | level 0 | 1 | 2 | 3 | 4 | 3-4 |', '| --- |' + ' ---: |' * 6]
    for name, (rows, labels) in graded.items():
        if not labels:
            continue
        by = {k: [] for k in range(5)}
        for image, row in rows.items():
            if image in labels:
                by[labels[image]].append('unlike the training photos' in row['reasons'])
        cells = [f'{np.mean(by[k]):.1%} of {len(by[k])}' if by[k] else '—' for k in range(5)]
        severe = by[3] + by[4]
        cells.append(f'{np.mean(severe):.1%} of {len(severe)}' if severe else '—')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
        click.echo(lines[-1])
    return lines


def refit(weights, photos, labels, tmp):
    """A copy of the released or given checkpoint with its feature statistics refit with one
    mean per level on its own training split of `photos`."""
    import torch

    from retina.core.runtime import Runtime
    from retina.data import cache
    from retina.data.labels import labelled_images, split_rows
    from retina.model import checkpoint
    from retina.model.feature_stats import attach_feature_stats
    path = checkpoint.resolve_weights(weights)
    target = tmp / 'refit.pt'
    shutil.copy(path, target)
    config = checkpoint.config_of(checkpoint.load(target))
    image_paths, levels = labelled_images(photos, labels)
    names = [p.stem for p in image_paths]
    train_rows, valid_rows, _ = split_rows(names, levels, config.cnf.get('hold_out') or 0)
    attach_feature_stats(target, cache.load_images(image_paths, progress=False), train_rows,
                         valid_rows, Runtime(torch.device('cpu')), levels=levels)
    return str(target)


@click.command()
@click.option('--weights_from', default=None, help="A released name or checkpoint [default: "
                                                   "predict.py's default].")
@click.option('--limit', default=40, show_default=True, help='Photographs per source for the cases.')
@click.option('--odir', type=click.Path(file_okay=False), help='ODIR-5K as python -m '
                                                               'retina.datasets odir wrote it.')
@click.option('--refit_photos', type=click.Path(file_okay=False),
              help="The converted photographs the net trained on (for the per-level refit).")
@click.option('--refit_labels', type=click.Path(dir_okay=False), help='Their labels.')
@click.option('--cases/--no_cases', default=True, show_default=True,
              help='Grade the made-up cases (part 1); --no_cases: the real photographs only.')
@click.option('--real/--no_real', default=True, show_default=True,
              help='Grade the real photographs of every source (part 2); --no_real: the cases '
                   'only.')
@click.option('--write', is_flag=True, help='Write the tables into BENCHMARKS.md.')
def main(weights_from, limit, odir, refit_photos, refit_labels, cases, real, write):
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = case_rows({'eyepacs256': SHARED / 'eyepacs256', 'eyepacs_raw': SHARED / 'eyepacs_raw'},
                          weights_from, limit, tmp) if cases else ['(not run: --no_cases)']
        sources = {'eyepacs_raw': (SHARED / 'eyepacs_raw', False),
                   'eyepacs_raw1024': (SHARED / 'eyepacs_raw1024', False),
                   'heimed': (SHARED / 'heimed' / 'images', False),
                   'eyepacs256': (SHARED / 'eyepacs256', True)}
        if odir:
            sources['ODIR-5K'] = (Path(odir), True)
        real, graded = real_rows(sources, weights_from) if real else (['(not run: --no_real)'], {})
        unlike = unlike_by_level(graded)
        refit_lines = []
        if refit_photos:
            weights = refit(weights_from or 'eyepacs-256', refit_photos, refit_labels, tmp)
            _, regraded = real_rows({k: v for k, v in sources.items() if k in ('eyepacs256', 'ODIR-5K')},
                                    weights)
            refit_lines = unlike_by_level(regraded)
    body = (f'{today()}, {cpu_model()}; `python bench/bench_wrong_grades.py '
            + ' '.join(sys.argv[1:]) + f'` ({time.time() - started:.0f} s), graded by predict.py '
            f'({weights_from or "its default"}).\n\n**Cases** (test-split photographs of eyepacs256 '
            'and eyepacs_raw, made into each case):\n\n' + '\n'.join(cases)
            + '\n\n**Real photographs called ungradable** (target: at most 2% per source):\n\n'
            + '\n'.join(real)
            + "\n\n**'unlike the training photos' by level** (the checkpoint's statistics):\n\n"
            + '\n'.join(unlike)
            + ('\n\nRefit with one mean per level (retina.model.feature_stats.FeatureStats):\n\n'
               + '\n'.join(refit_lines) if refit_lines else '') + '\n')
    print(body)
    if write:
        replace_section(SECTION, body)


if __name__ == '__main__':
    main()
