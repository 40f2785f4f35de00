"""The demo: the whole pipeline on synthetic photographs, on a laptop, in minutes.

    python -m retina.demo --out demo

Generates synthetic fundus photos, then runs the real scripts in order, in
the output folder, printing each command as a user would type it:
convert.py -> train_nn.py (a 128-pixel RAM net) -> transform.py (a few TTA
iterations) -> blend.py (per patient; validation, then --predict) -> ram.py
(heat maps, scored against the generator's lesion masks beside an
image-blind map and the grid oracle).  It ends with the
validation kappa, the test kappa of the submission, its path and the
heat-map folder.
"""
import csv
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click

from retina.core import paths
from retina.core.errors import UserError, handle_errors
from retina.core.metrics import kappa
from retina.data.labels import load_labels

REPO = Path(__file__).resolve().parent.parent
CONFIG = 'c_128_5x5_32_ram'


def run_step(title, args, cwd, log):
    """Run a repository script, echoing its output live and keeping stdout for parsing."""
    script, rest = args[0], [str(a) for a in args[1:]]
    launcher = f'python {script}' if script.endswith('.py') else f'python -m {script}'
    shown = ' '.join([launcher, *(shlex.quote(a) for a in rest)])
    click.secho(f'\n== {title}\n$ {shown}', bold=True)
    command = ([sys.executable, '-m', script] if not script.endswith('.py')
               else [sys.executable, str(REPO / script)]) + rest
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, 'PYTHONPATH': str(REPO)})
    lines = []
    for line in process.stdout:
        click.echo(line, nl=False)
        lines.append(line.rstrip('\n'))
    if process.wait() != 0:
        raise UserError(f'demo step "{title}" failed (exit {process.returncode}); see above')
    seconds = time.perf_counter() - start
    log.append((title, seconds))
    return lines


def best_validation_kappa(workdir):
    with open(workdir / paths.train_log(CONFIG), newline='') as f:
        return max(float(row['valid_kappa']) for row in csv.DictReader(f))


def submission_kappa(submission, test_labels):
    truth = load_labels(test_labels)
    with open(submission, newline='') as f:
        rows = list(csv.DictReader(f))
    levels = [int(row['level']) for row in rows]
    return kappa([truth[row['image']] for row in rows], levels), len(rows)


def last_value(lines, prefix):
    for line in reversed(lines):
        if line.startswith(prefix):
            return line
    return None


@click.command(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--out', default='demo', show_default=True, type=click.Path(file_okay=False),
              help='Folder for everything the demo makes (photos, data/, weights/).')
@click.option('--n_patients', default=300, show_default=True, type=click.IntRange(min=10),
              help='Synthetic patients (about 1.85 photos each, a quarter of them test).')
@click.option('--epochs', default=100, show_default=True, type=click.IntRange(min=1),
              help='Training epochs of the 128-pixel RAM net (--max_epochs).')
@click.option('--tta', default=5, show_default=True, type=click.IntRange(min=1),
              help='Test-time augmentation iterations for transform.py.')
@click.option('--seed', default=0, show_default=True, type=click.IntRange(0, 2 ** 63 - 1),
              help='Seed of the synthetic data and of training.')
@handle_errors(resume_hint='Run the demo again: finished steps are skipped or resumed.')
def main(out, n_patients, epochs, tta, seed):
    """Run the whole pipeline on synthetic photographs and print the key figures."""
    started = time.perf_counter()
    work = Path(out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = []
    run_step('synthetic photographs', ['retina.synthetic', '--out', 'raw', '--n_patients',
                                       n_patients, '--seed', seed], work, log)
    (work / 'data').mkdir(exist_ok=True)
    (work / 'data' / 'trainLabels.csv').write_bytes((work / 'raw' / 'trainLabels.csv')
                                                    .read_bytes())
    for split in ('train', 'test'):
        run_step(f'crop and resize the {split} photos to 128 px',
                 ['convert.py', '--directory', f'raw/{split}', '--convert_directory',
                  f'data/{split}_tiny', '--crop_size', 128, '--extension', 'jpeg'], work, log)
    # A rerun after an interruption continues the run (a finished one stops at once).
    resume = ['--resume'] if (work / paths.resume_checkpoint(CONFIG)).is_file() else []
    run_step(f'train {CONFIG}', ['train_nn.py', '--cnf', CONFIG, '--max_epochs', epochs,
                                 '--seed', seed, *resume], work, log)
    run_step('test-time-augmented features', ['transform.py', '--cnf', CONFIG, '--n_iter', tta,
                                              '--train', '--test'], work, log)
    features = [paths.features(CONFIG, 'train', stat, tta, 0) for stat in ('mean', 'std')]
    blend_args = ['blend.py', '--cnf', CONFIG, '--per_patient', '--optimize_thresholds',
                  '--seed', seed]
    for path in features:
        blend_args += ['--features_file', path]
    validation = run_step('blend per patient: validation', blend_args, work, log)
    run_step('blend per patient: submission', blend_args + ['--predict'], work, log)
    ram_lines = run_step('regression activation maps',
                         ['ram.py', '--cnf', CONFIG, '--images', 'data/test_tiny', '--masks',
                          'raw/masks', '--photos', 'raw/test', '--labels', 'raw/testLabels.csv',
                          '--no_progress'], work, log)

    submission = max((work / 'data').glob('sub_*.csv'), key=lambda p: p.stat().st_mtime)
    test_kappa, rows = submission_kappa(submission, work / 'raw' / 'testLabels.csv')
    click.secho('\n== demo summary', bold=True)
    for title, seconds in log:
        click.echo(f'  {seconds:7.1f}s  {title}')
    click.echo(f'validation kappa (best epoch of {CONFIG}): {best_validation_kappa(work):.4f}')
    for line in validation:
        if 'valid kappa' in line:
            click.echo(f'blend validation, {line.strip()}')
    click.echo(f'test kappa of the submission ({rows} images): {test_kappa:.4f}')
    click.echo('heat maps, test photos of level >= 1, per image inside the fundus; columns: the RAM, '
               'the image-blind map (mean RAM of the other photos), the grid oracle (lesion mask '
               'pooled to the RAM\'s grid):')
    for name in ('auroc', 'pointing_exact', 'pointing_game', 'mass_in_lesions', '# auroc minus blind',
                 'deletion_excess_drop'):
        line = last_value(ram_lines, f'{name}: ')
        if line:
            click.echo(line.lstrip('# '))
    click.echo(f'submission: {submission}')
    click.echo(f'heat maps: {work / paths.ram_dir(CONFIG)}')
    click.echo(f'wall time: {time.perf_counter() - started:.0f}s')


if __name__ == '__main__':
    main()
