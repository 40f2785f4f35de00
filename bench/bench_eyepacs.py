#!/usr/bin/env python
"""The pipeline at 128 pixels on real photographs in the competition's layout.

    python bench/bench_eyepacs.py [--source ../shared/data/eyepacs64] [--epochs 30] [--tta 5]

Runs convert.py -> train_nn.py (c_128_5x5_32_ram) -> transform.py -> blend.py
in a work folder and prints the validation kappa (the same 10% of patients
throughout) of: the single net at its best epoch, the net's own linear head on
the TTA-averaged features, and the per-patient blend.  Writes the figures to
BENCHMARKS.md.
"""
import csv
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from report import device_name, replace_section, today  # noqa: E402
from retina import checkpoint, data, paths  # noqa: E402
from retina.features import load_features  # noqa: E402

CONFIG = 'c_128_5x5_32_ram'


def run(args, cwd):
    click.secho('$ python ' + ' '.join(map(str, args)), bold=True)
    result = subprocess.run([sys.executable, str(REPO / args[0]), *map(str, args[1:])], cwd=cwd,
                            stdout=subprocess.PIPE, text=True, env={'PYTHONPATH': str(REPO),
                                                                   **__import__('os').environ})
    click.echo(result.stdout)
    if result.returncode != 0:
        raise click.ClickException(f'{args[0]} failed ({result.returncode})')
    return result.stdout


def tta_head_kappa(work, tta):
    """Kappa of the RAM net's own output layer applied to the TTA-mean GAP features."""
    state = checkpoint.load(work / paths.best_kappa_weights(CONFIG))
    weight = state['model']['output.weight'].numpy()[0]
    bias = float(state['model']['output.bias'].numpy()[0])
    features, names = load_features(work / paths.features(CONFIG, 'train', 'mean', tta, 0))
    labels = data.load_labels(work / 'data' / 'trainLabels.csv')
    levels = np.array([labels[n] for n in names])
    _, valid = data.split_indices(names, levels)
    return data.kappa(levels[valid], features[valid] @ weight + bias), len(valid)


@click.command()
@click.option('--source', type=click.Path(exists=True, file_okay=False),
              default=str(REPO.parent / 'shared' / 'data' / 'eyepacs64'), show_default=True,
              help='Folder with train/ and trainLabels.csv.')
@click.option('--work', default='/tmp/eyepacs_bench', show_default=True,
              type=click.Path(file_okay=False), help='Work folder (data/, weights/).')
@click.option('--epochs', default=30, show_default=True, type=click.IntRange(min=1))
@click.option('--tta', default=5, show_default=True, type=click.IntRange(min=1))
@click.option('--write/--no_write', default=True, show_default=True)
def main(source, work, epochs, tta, write):
    """Validation kappas of net, TTA features and blend on real photographs."""
    source, work = Path(source).resolve(), Path(work).resolve()
    (work / 'data').mkdir(parents=True, exist_ok=True)
    (work / 'data' / 'trainLabels.csv').write_bytes((source / 'trainLabels.csv').read_bytes())
    started = time.perf_counter()
    run(['convert.py', '--directory', source / 'train', '--convert_directory',
         'data/train_tiny', '--crop_size', 128, '--extension', 'jpeg'], work)
    run(['train_nn.py', '--cnf', CONFIG, '--max_epochs', epochs, '--no_progress'], work)
    run(['transform.py', '--cnf', CONFIG, '--n_iter', tta, '--train', '--no_progress'], work)
    features = [paths.features(CONFIG, 'train', s, tta, 0) for s in ('mean', 'std')]
    blend = run(['blend.py', '--per_patient', '--labels', 'data/trainLabels.csv',
                 '--optimize_thresholds', *sum((['--features_file', f] for f in features), [])],
                work)
    with open(work / paths.train_log(CONFIG), newline='') as f:
        net_kappa = max(float(r['valid_kappa']) for r in csv.DictReader(f))
    head_kappa, n_valid = tta_head_kappa(work, tta)
    fixed = re.findall(r'valid kappa (-?[\d.]+) \(cut-offs', blend)
    fitted = re.findall(r'valid kappa (-?[\d.]+) \(fitted cut-offs', blend)
    minutes = (time.perf_counter() - started) / 60
    n_images = len(list((work / 'data' / 'train_tiny').glob('*.jpeg')))
    table = ['| stage | validation kappa |', '| --- | ---: |',
             f'| {CONFIG}, best of {epochs} epochs (centred window) | {net_kappa:.4f} |',
             f'| same net, its linear head on {tta}-iteration TTA mean features | '
             f'{head_kappa:.4f} |',
             f'| per-patient blend of mean+std TTA features, cut-offs 0.5..3.5 | '
             f'{float(fixed[-1]):.4f} |',
             f'| same blend, fitted cut-offs (fitted on these patients: optimistic) | '
             f'{float(fitted[-1]):.4f} |']
    body = (f'{source.name}: {n_images} photographs, {n_valid} validation images (10% of '
            f'patients, seed 9). Device: {device_name(__import__("torch").device("cpu"))}; '
            f'{today()}; {minutes:.1f} min in all.\nCommand: `python bench/bench_eyepacs.py '
            f'--epochs {epochs} --tta {tta}`.\n\n' + '\n'.join(table))
    click.echo('\n'.join(table))
    if write:
        replace_section(f'Real photographs at 128 px ({source.name})', body)


if __name__ == '__main__':
    main()
