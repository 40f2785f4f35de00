#!/usr/bin/env python
"""How predict.py's gradability checks (retina/data/gradability.py) split real photographs, degraded
copies of them and images with no eye.

    python bench/bench_gradability.py [--weights W.pt --photos data/real/e128 --labels L.csv]

Real photographs: every photograph of ../shared/data eyepacs_raw, eyepacs_raw1024 and heimed
(raw camera photographs of three sources).  Target: at most 2% of them ungradable.  Degraded
copies of the same photographs, made on the decoded photograph before the crop: darkened to
30% (and, milder, 60%), blurred (a Gaussian of 1.5% of the photograph's width; milder 0.5%),
overexposed (brightness × 2.5; milder × 1.5).  Target: at least 90% of the strong copies
ungradable.  Images with no eye: black, white and grey frames, noise, a text screenshot, a
blue sky, a 20 × 20 thumbnail of a fundus.  With --weights (a RAM net and the converted
photographs it trained on), the feature distance too: fitted on its training split, the
threshold at the 99th percentile of its validation split, then the distances of the real
photographs and of the images with no eye.  Prints the measures' percentiles and writes
the table to BENCHMARKS.md ("Gradability").
"""
import sys
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from report import replace_section, today  # noqa: E402

from retina.data import crop, gradability  # noqa: E402
from retina.data.images import IMAGE_EXTENSIONS  # noqa: E402
from retina.model import feature_stats  # noqa: E402

SHARED = REPO.parent / 'shared' / 'data'
FOLDERS = {'eyepacs_raw': SHARED / 'eyepacs_raw' / 'train',
           'eyepacs_raw1024': SHARED / 'eyepacs_raw1024' / 'train',
           'heimed': SHARED / 'heimed' / 'images'}
CROP = 128


def darken(factor):
    return lambda image: Image.eval(image, lambda v: int(v * factor))


def brighten(factor):
    return lambda image: Image.eval(image, lambda v: min(255, int(v * factor)))


def blur(fraction):
    return lambda image: image.filter(ImageFilter.GaussianBlur(fraction * image.size[0]))


DEGRADATIONS = {'darkened to 30%': darken(0.3), 'blurred, 1.5% of the width': blur(0.015),
                'overexposed × 2.5': brighten(2.5), 'darkened to 60% (mild)': darken(0.6),
                'blurred, 0.5% (mild)': blur(0.005), 'overexposed × 1.5 (mild)': brighten(1.5)}


def no_eye_images(sample_photo):
    rng = np.random.default_rng(0)
    text = Image.new('RGB', (1280, 800), 'white')
    draw = ImageDraw.Draw(text)
    for row in range(30):
        draw.text((20, 20 + 25 * row), 'File  Edit  View  quarterly report, page 3 ' * 3,
                  fill='black')
    sky = np.zeros((600, 900, 3), dtype=np.uint8)
    sky[...] = np.linspace(120, 230, 600)[:, None, None] * np.array([0.5, 0.7, 1.0])
    return {'black frame': Image.new('RGB', (1024, 768)),
            'white frame': Image.new('RGB', (1024, 768), 'white'),
            'grey frame': Image.new('RGB', (1024, 768), (128, 128, 128)),
            'noise': Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)),
            'text screenshot': text, 'blue sky': Image.fromarray(sky),
            '20 × 20 fundus thumbnail': sample_photo.resize((20, 20))}


def verdict(image):
    """(reasons, measures, the converted 128-px photograph) of a decoded photograph, without
    the file's measures (compression) and with the focus on its own 512-px crop."""
    box = crop.find_eye_box_fast(image)
    converted = np.asarray(crop.crop_to_eye(image, CROP, box))
    side = min(box[2] - box[0], box[3] - box[1])
    detail = np.asarray(crop.crop_to_eye(image, gradability.detail_size(side), box))
    found = gradability.measures(converted, detail)
    return gradability.reasons(found, side, CROP), found, converted


def file_verdict(path, crop_size=CROP):
    """predict.py's image checks on the file `path` (its decode for a `crop_size` net; the focus
    on the eye decoded again at its detail size, the compression from the file)."""
    image = crop.load_for_crop(path, crop_size)
    box = crop.find_eye_box_fast(image)
    rgb = np.asarray(crop.crop_to_eye(image, crop_size, box))
    return crop.gradability_reasons(path, image, box, crop_size, rgb)


def photographs(limit):
    """(folder name, its photographs) for each shared folder that exists."""
    for name, folder in FOLDERS.items():
        if not folder.is_dir():
            continue
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        yield name, paths[:limit] if limit else paths


def feature_rows(weights, photos, labels, real, others):
    """Feature distances: the statistics fitted on the net's training split, their threshold,
    and the share beyond it per group of photographs."""
    import torch

    from retina.data import cache
    from retina.data.labels import labelled_images, split_rows
    from retina.grade.grader import load_grader, passes
    from retina.grade.photos import prepare_photo
    from retina.model import checkpoint
    state = checkpoint.load(weights)
    config = checkpoint.config_of(state)
    image_paths, levels = labelled_images(photos, labels)
    names = [p.stem for p in image_paths]
    train_rows, valid_rows, test_rows = split_rows(names, levels,
                                                        config.cnf.get('hold_out') or 0)
    images = cache.load_images(image_paths, progress=False)
    grader = load_grader(config.name, weights)

    def features_of(uint8):  # (N, 3, S, S)
        out = []
        for start in range(0, len(uint8), 256):
            batch = torch.from_numpy(np.ascontiguousarray(uint8[start:start + 256]))
            out.append(passes(grader, batch, [None])[1][0])
        return np.concatenate(out)
    valid = features_of(images[valid_rows])
    stats = feature_stats.FeatureStats.fit(features_of(images[train_rows]), valid)
    rows = [('validation split (sets the threshold)', valid),
            ('test split (held-out patients)', features_of(images[test_rows]))]
    key = (grader.crop_size, grader.preprocessing)
    for name, paths in real:
        converted = []
        for path in paths:
            converted.append(prepare_photo(path, {key}).converted[key])
        rows.append((f'{name} (raw photographs)',
                     features_of(np.stack(converted).transpose(0, 3, 1, 2))))
    from retina.data import preprocess
    other = [preprocess.apply(np.asarray(crop.crop_to_eye(image, grader.crop_size)),
                              grader.preprocessing) for image in others.values()]
    rows.append(('images with no eye', features_of(np.stack(other).transpose(0, 3, 1, 2))))
    return stats, [(label, stats.distances(f)) for label, f in rows]


@click.command()
@click.option('--limit', type=click.IntRange(min=1), help='Photographs per folder (a quick run).')
@click.option('--weights', type=click.Path(dir_okay=False),
              help='A RAM net (trained with --hold_out) for the feature-distance rows.')
@click.option('--photos', type=click.Path(file_okay=False),
              help='The converted photographs it trained on.')
@click.option('--labels', type=click.Path(dir_okay=False), help='Their labels.')
@click.option('--write/--no_write', default=True, show_default=True)
def main(limit, weights, photos, labels, write):
    """Share of real photographs, degraded copies and non-fundus images called ungradable."""
    started = time.perf_counter()
    real = list(photographs(limit))
    if not real:
        raise click.ClickException(f'none of {", ".join(map(str, FOLDERS.values()))} found')
    table = ['| photographs | images | ungradable | reasons |', '| --- | ---: | ---: | --- |']
    measured, sample = [], None
    degraded = {name: [] for name in DEGRADATIONS}
    brightness = []  # of each original, in the order of the copies
    for name, paths in real:
        flagged, why = 0, {}
        for path in paths:
            # The real photograph as predict.py checks its file; the degraded copies are made
            # on a decode large enough for the focus's detail size, as predict.py decodes a
            # degraded file for it (a decode at the net's size alone blurs the detail).
            reasons = file_verdict(path)
            image = crop.load_for_crop(path, 2 * gradability.DETAIL_SIZE)
            sample = sample or image
            _, found, _ = verdict(image)
            measured.append(found)
            brightness.append(found['brightness'])
            flagged += bool(reasons)
            for r in reasons:
                why[r] = why.get(r, 0) + 1
            for label, degrade in DEGRADATIONS.items():
                degraded[label].append(verdict(degrade(image))[0])
        table.append(f'| {name} (real) | {len(paths)} | {flagged / len(paths):.1%} | '
                     + ', '.join(f'{r} {n}' for r, n in sorted(why.items())) + ' |')
        click.echo(table[-1])
    for label, verdicts in degraded.items():
        caught = sum(bool(v) for v in verdicts)
        why = {}
        for v in verdicts:
            for r in v:
                why[r] = why.get(r, 0) + 1
        table.append(f'| {label} copies | {len(verdicts)} | {caught / len(verdicts):.1%} | '
                     + ', '.join(f'{r} {n}' for r, n in sorted(why.items())) + ' |')
        click.echo(table[-1])
        if label.startswith('overexposed'):  # brightening a dim photograph can correct it
            bright = np.array(brightness) >= np.median(brightness)
            hit = np.array([bool(v) for v in verdicts])
            table.append(f'| {label} copies of the photographs at or above the median '
                         f'brightness / below it | {bright.sum()} / {(~bright).sum()} | '
                         f'{hit[bright].mean():.1%} / {hit[~bright].mean():.1%} | |')
            click.echo(table[-1])
    others = no_eye_images(sample)
    for label, image in others.items():
        reasons, _, _ = verdict(image)
        table.append(f'| {label} | 1 | {"yes" if reasons else "no"} | {", ".join(reasons)} |')
        click.echo(table[-1])
    keys = ('fill', 'corners', 'brightness', 'green_saturated', 'contrast', 'focus')
    spread = ['| measure (real photographs) | 0.5% | 1% | 5% | 50% | 95% | 99% | 99.5% |',
              '| --- |' + ' ---: |' * 7]
    for key in keys:
        values = np.array([m[key] for m in measured])
        spread.append(f'| {key} | ' + ' | '.join(
            f'{np.percentile(values, q):.3f}' for q in (0.5, 1, 5, 50, 95, 99, 99.5)) + ' |')
    click.echo('\n'.join(spread))
    distances = ''
    if weights:
        stats, rows = feature_rows(weights, photos, labels, real, others)
        lines = [f'Feature distance of `{weights}` (threshold {stats.threshold:.1f}: '
                 f'{feature_stats.FEATURE_MARGIN} × the {feature_stats.FEATURE_PERCENTILE}th '
                 f'percentile of its validation split\'s distances):', '',
                 '| photographs | images | beyond the threshold | distance: min | 50% | 99% | '
                 'max |', '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
        for label, d in rows:
            lines.append(f'| {label} | {len(d)} | {(d > stats.threshold).mean():.1%} | '
                         + ' | '.join(f'{v:.1f}' for v in np.percentile(d, [0, 50, 99, 100]))
                         + ' |')
        distances = '\n'.join(lines)
        click.echo(distances)
    if write:
        body = (f'Each photograph is decoded, degraded where the row says so, cropped to the eye '
                f'and resized to {CROP} px as convert.py does, then measured '
                f'(`retina/data/gradability.py`). {today()}; {time.perf_counter() - started:.0f} s.\n'
                f'Command: `python bench/bench_gradability.py {" ".join(sys.argv[1:])}`.\n\n'
                + '\n'.join(table) + '\n\n' + '\n'.join(spread)
                + (f'\n\n{distances}' if distances else ''))
        replace_section('Gradability: what predict.py calls ungradable', body)


if __name__ == '__main__':
    main()
