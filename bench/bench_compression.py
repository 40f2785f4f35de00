#!/usr/bin/env python
"""The grade against JPEG quality: test-split photographs re-saved at qualities 95 ... 5 and
graded by predict.py as a user would, for one or more graders.

    python bench/bench_compression.py --weights_from eyepacs-256 [--weights_from W2.pt ...]
        [--blend multi-chain ...]
        [--set eyepacs256=../shared/data/eyepacs256 --set raw=../shared/data/eyepacs_raw ...]
        [--limit 150] [--hold_out 0.15] [--write]

Each set is a folder with train/ (or the photographs) beside trainLabels.csv; only the patients
of the test split (retina.data.labels.held_out at --hold_out, the rule train_nn.py --hold_out uses) are
taken, the first --limit of them by name.  Each photograph is decoded, re-saved with PIL at each
quality (4:2:0, as cameras and viewers save), and the copies graded by predict.py (its default:
centred window, the net's own cut-offs, the gradability checks).  Per grader and quality: the
share called ungradable, and among the photographs graded both as saved and at that quality,
the mean absolute change in score and the share whose level changed (and changed by more than
one level).  The reference is the photograph as it was saved (quality "as saved").  --write
puts the table into BENCHMARKS.md, "Compression: the grade against JPEG quality".
"""
import csv
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from report import cpu_model, replace_section, today  # noqa: E402

from retina.core.paths import IMAGE_EXTENSIONS  # noqa: E402
from retina.data.labels import held_out, load_labels  # noqa: E402

QUALITIES = (95, 75, 50, 30, 20, 10, 5)
SHARED = REPO.parent / 'shared' / 'data'
DEFAULT_SETS = (f'eyepacs256={SHARED / "eyepacs256"}', f'eyepacs_raw={SHARED / "eyepacs_raw"}')
SECTION = 'Compression: the grade against JPEG quality'


def test_split(folder, hold_out, limit):
    folder = Path(folder)
    images = folder / 'train' if (folder / 'train').is_dir() else folder
    labels = load_labels(folder / 'trainLabels.csv')
    paths = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                   and p.stem in labels and held_out(p.stem, hold_out))
    return paths[:limit]


def write_copies(paths, out):
    """out/as_saved/ (the files) and out/q{Q}/ (each re-saved at quality Q)."""
    (out / 'as_saved').mkdir(parents=True)
    for quality in QUALITIES:
        (out / f'q{quality}').mkdir()
    for path in paths:
        (out / 'as_saved' / path.name).symlink_to(path.resolve())
        image = Image.open(path).convert('RGB')
        for quality in QUALITIES:
            image.save(out / f'q{quality}' / f'{path.stem}.jpeg', 'JPEG', quality=quality)


def grade(folder, args):
    """predict.py FOLDER ARGS: {image: its CSV row}."""
    result = subprocess.run([sys.executable, str(REPO / 'predict.py'), str(folder), *args],
                            capture_output=True, text=True, cwd=REPO)
    if result.returncode not in (0, 1):
        raise SystemExit(f'predict.py failed on {folder}: {result.stderr[-2000:]}')
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    return {row['image']: row for row in rows}


def blend_args(blend):
    """predict.py's options for `blend`: a released chain is applied as it was fitted; a
    blend.py file fitted per patient needs --per_patient."""
    from retina.blend import fitted
    from retina.model import released
    if released.is_chain(blend):
        return ['--blend', blend]
    if not Path(blend).is_file():
        raise click.BadParameter(f'{blend}: no such file or released chain', param_hint='--blend')
    return ['--blend', blend] + (['--per_patient'] if fitted.load(blend)['per_patient'] else [])


def score_of(row):
    return float(row.get('blend') or row['mean'])


def compare(reference, copy):
    """(ungradable share, mean |Δscore|, level changed, changed by more than one) of `copy`."""
    ungradable = np.mean([copy[n]['gradable'] == 'no' for n in reference])
    both = [n for n in reference if reference[n]['gradable'] == 'yes' and copy[n]['gradable'] == 'yes']
    if not both:
        return ungradable, float('nan'), float('nan'), float('nan')
    delta = np.array([abs(score_of(copy[n]) - score_of(reference[n])) for n in both])
    steps = np.array([abs(int(copy[n]['level']) - int(reference[n]['level'])) for n in both])
    return ungradable, delta.mean(), (steps > 0).mean(), (steps > 1).mean()


@click.command()
@click.option('--weights_from', 'nets', multiple=True,
              help='A released name or checkpoint to grade with (repeat to compare).')
@click.option('--blend', 'blends', multiple=True,
              help="A released chain's name (or a blend.py --predict file) to grade with, as "
                   'predict.py --blend does (each eye with its partner: a test split holds both '
                   'eyes of its patients); repeatable.')
@click.option('--set', 'sets', multiple=True, default=DEFAULT_SETS, show_default=True,
              help='NAME=FOLDER (train/ beside trainLabels.csv); repeatable.')
@click.option('--limit', default=150, show_default=True, help='Photographs per set.')
@click.option('--hold_out', default=0.15, show_default=True,
              help='The test split of the graders (train_nn.py --hold_out).')
@click.option('--write', is_flag=True, help='Write the table into BENCHMARKS.md.')
def main(nets, blends, sets, limit, hold_out, write):
    start = time.time()
    graders = [(n, ['--weights_from', n]) for n in nets] + [(b, blend_args(b)) for b in blends]
    if not graders:
        raise click.UsageError('name a grader: --weights_from NAME or --blend NAME')
    lines = ['| grader | set (photographs) | quality | ungradable | mean abs. score change | '
             'level changed | by more than one |', '| --- | --- | --- | --- | --- | --- | --- |']
    for spec in sets:
        name, _, folder = spec.partition('=')
        paths = test_split(folder, hold_out, limit)
        with tempfile.TemporaryDirectory() as tmp:
            write_copies(paths, Path(tmp))
            for label, args in graders:
                reference = grade(Path(tmp) / 'as_saved', args)
                un = np.mean([r['gradable'] == 'no' for r in reference.values()])
                lines.append(f'| {label} | {name} ({len(paths)}) | as saved | {un:.1%} | — | — | — |')
                for quality in QUALITIES:
                    copy = grade(Path(tmp) / f'q{quality}', args)
                    un, delta, changed, far = compare(reference, copy)
                    lines.append(f'| {label} | {name} | {quality} | {un:.1%} | {delta:.2f} | '
                                 f'{changed:.1%} | {far:.1%} |')
                    print(lines[-1], flush=True)
    body = (f'{today()}, {cpu_model()}; `python bench/bench_compression.py '
            + ' '.join(f'--weights_from {n}' for n in nets)
            + ''.join(f' --blend {b}' for b in blends)
            + ' ' + ' '.join(f'--set {s}' for s in sets) + f' --limit {limit}` '
            f'({time.time() - start:.0f} s).  Test-split photographs (hold_out {hold_out}) '
            're-saved with PIL at each quality and graded by predict.py (a net: its centred window and '
            "its cut-offs; a chain: its TTA features and blend; the gradability checks).  Score and level changes are among the "
            'photographs graded both as saved and at that quality.\n\n' + '\n'.join(lines) + '\n')
    print(body)
    if write:
        replace_section(SECTION, body)


if __name__ == '__main__':
    main()
