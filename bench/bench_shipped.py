#!/usr/bin/env python
"""What a user gets: each grader run as predict.py runs it, on the test-split photographs of
every source, per source and over all of them, with patient-bootstrap intervals.

    python bench/bench_shipped.py --labels data/real2/labels.csv \\
        --source eyepacs256=../shared/data/eyepacs256/train \\
        --source odir=data/real2/odir/train --source raw1024=data/real2/raw1024/train \\
        --unseen eyepacs_raw=../shared/data/eyepacs_raw/train:../shared/data/eyepacs_raw/trainLabels.csv \\
        --grader 'eyepacs-256 (old default)=--weights_from eyepacs-256' \\
        --grader 'new 256=--weights_from data/real2/weights/c_256_5x5_32_ram/weights.pt' \\
        --work data/real2/shipped

`--labels` is the training labels file (image, level, patient, eye, source; python -m
retina.datasets writes the source column): a `--source` folder's photographs count where
their patient is in the test split (`held_out(name, --hold_out)`, the rule train_nn.py
--hold_out used), so no net trained, validated or was tuned on them.  An `--unseen` folder
(FOLDER:LABELS) counts the photographs of patients on no training or validation side of
`--labels` (other photographs of test-split patients, or patients it does not hold).  Each
`--grader LABEL=ARGS` is predict.py run with ARGS on each folder (its CSV is kept in --work
and reused).  Each row: kappa of the level predict.py gives (the grader's own cut-offs) on
the gradable photographs, the AUROC of referable DR (level >= 2) from its score, the share
it called ungradable; 95% intervals resample patients.  Writes its table to BENCHMARKS.md.
"""
import csv
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from report import replace_section, today, cpu_model  # noqa: E402

from retina.core import metrics  # noqa: E402
from retina.core.paths import patient_and_eye  # noqa: E402
from retina.data.images import image_name, list_images  # noqa: E402
from retina.data.labels import held_out, load_labels  # noqa: E402

SECTION = 'Real photographs: the shipped grader on every source'


def grader_key(args):
    """A short digest of predict.py's ARGS and the index entries (checksums, the storage of
    their training images...) of the released models they grade with (the default's when they
    name none): a re-released model is graded again instead of being read from the cache of its
    predecessor."""
    import hashlib
    import json

    from retina.model import released
    found = released.index()
    models = found['models']
    tokens = shlex.split(args)
    names = [t for t in tokens if t in models]
    if not {'--weights_from', '--blend', '--cnf'} & set(tokens) and found['default']:
        names.append(found['default'])
    for name in list(names):
        names += models[name].get('nets', [])
    text = args + ''.join(f'|{n}:{json.dumps(models[n], sort_keys=True)}'
                          for n in sorted(set(names)))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def graded(work, label, args, folder, photos, log):
    """predict.py ARGS on `photos` (linked into a folder of their own): {image: row}."""
    slug = ''.join(c if c.isalnum() else '_' for c in label)
    out = work / f'{slug}_{grader_key(args)}_{folder}.csv'
    if not out.is_file():
        listing = work / f'photos_{folder}'
        listing.mkdir(parents=True, exist_ok=True)
        for p in photos:
            if not (listing / p.name).exists():
                (listing / p.name).symlink_to(p.resolve())
        command = [sys.executable, str(REPO / 'predict.py'), str(listing), '--output', str(out),
                   '--no_progress', *shlex.split(args)]
        started = time.perf_counter()
        with open(log, 'a') as f:
            f.write('$ ' + shlex.join(command) + '\n')
            f.flush()
            result = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        if result.returncode not in (0, 1) or not out.is_file():
            raise click.ClickException(f'predict.py failed for {label} on {folder}; see {log}')
        click.echo(f'{label} on {folder}: {len(photos)} photographs in '
                   f'{time.perf_counter() - started:.0f} s')
    with open(out, newline='') as f:
        return {row['image']: row for row in csv.DictReader(f)}


def figures(names, levels, rows):
    """(kappa of the given levels on gradable photographs, referable AUROC of the score on
    them, share ungradable), each with its patient-bootstrap interval; and the photo count."""
    names = list(names)
    gradable = np.array([rows[n]['gradable'] == 'yes' for n in names])
    score_column = 'blend' if 'blend' in rows[names[0]] else 'mean'
    score = np.array([float(rows[n][score_column] or 'nan') for n in names])
    level = np.array([float(rows[n]['level']) if rows[n]['level'] else np.nan for n in names])
    levels = np.asarray(levels)

    def statistic(truth, graded, score, usable):
        if not usable.any():
            return float('nan'), float('nan'), 1.0
        return (metrics.kappa(truth[usable], graded[usable]),
                metrics.scores(truth[usable], score[usable])[2], 1.0 - usable.mean())

    return metrics.bootstrap(names, statistic, levels, level, score, gradable), len(names)


def table(results, graders):
    lines = ['| photographs (patients no net saw) | grader | photos | kappa (gradable) | '
             'referable AUROC | ungradable |', '| --- | --- | ---: | ---: | ---: | ---: |']
    for (group, label), ((kappa, auroc, ungradable), count) in results.items():
        lines.append(f'| {group} | {label} | {count} | {kappa} | {auroc} | '
                     f'{100 * ungradable.value:.1f}% |')
    return '\n'.join(lines)


def parse_pairs(values, what):
    pairs = []
    for value in values:
        name, sep, rest = value.partition('=')
        if not sep or not name or not rest:
            raise click.BadParameter(f'{value!r}: expected NAME=VALUE', param_hint=what)
        pairs.append((name.strip(), rest.strip()))
    return pairs


@click.command(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--labels', required=True, type=click.Path(exists=True, dir_okay=False),
              help='The training labels (image, level[, patient, eye, source]).')
@click.option('--source', 'sources', multiple=True, metavar='NAME=FOLDER',
              help='Photographs of a source in --labels; their test-split patients count.')
@click.option('--unseen', multiple=True, metavar='NAME=FOLDER:LABELS',
              help='Photographs with their own labels file; those of patients no net trained or '
                   'validated on count.')
@click.option('--grader', 'graders', multiple=True, required=True, metavar='LABEL=ARGS',
              help="A grader: predict.py's arguments (quoted), e.g. '--weights_from eyepacs-256'.")
@click.option('--hold_out', default=0.15, show_default=True, type=click.FloatRange(0, 1,
              min_open=True, max_open=True), help='The --hold_out the nets were trained with.')
@click.option('--work', required=True, type=click.Path(file_okay=False),
              help="Where predict.py's CSVs are kept (and reused by a rerun).")
@click.option('--note', default='', help='A sentence for the section (epochs, machine).')
@click.option('--write/--no_write', default=True, show_default=True)
def main(labels, sources, unseen, graders, hold_out, work, note, write):
    """The graders as predict.py runs them on every source's unseen patients."""
    started = time.perf_counter()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / 'predict.log'
    training = load_labels(labels)
    seen = {patient_and_eye(n)[0] for n in training if not held_out(n, hold_out)}
    groups = []  # (group name, folder key, photographs, their levels)
    for name, folder in parse_pairs(sources, '--source'):
        photos = [p for p in list_images(folder)
                  if image_name(p) in training and held_out(image_name(p), hold_out)]
        groups.append((f'{name} test split', name, photos, [training[image_name(p)] for p in photos]))
    for name, spec in parse_pairs(unseen, '--unseen'):
        folder, _, labels_file = spec.rpartition(':')
        own = load_labels(labels_file)
        photos = [p for p in list_images(folder) if image_name(p) in own
                  and patient_and_eye(image_name(p))[0] not in seen]
        groups.append((f'{name}, unseen patients', name, photos, [own[image_name(p)] for p in photos]))
    results = {}
    for label, args in parse_pairs(graders, '--grader'):
        every_name, every_level, every_row = [], [], {}
        for group, key, photos, levels in groups:
            if not photos:
                click.echo(f'{group}: no photographs; skipped')
                continue
            rows = graded(work, label, args, key, photos, log)
            names = [image_name(p) for p in photos]
            results[(group, label)] = figures(names, levels, rows)
            click.echo(f'{group} | {label} | {results[(group, label)][0][0]}')
            if group.endswith('test split'):
                every_name += names
                every_level += list(levels)
                every_row.update(rows)
        if every_name:
            results[('all test splits', label)] = figures(every_name, every_level, every_row)
    body = table(results, graders)
    click.echo(body)
    if write:
        commands = '\n'.join(f'- {label}: `predict.py {args}`'
                             for label, args in parse_pairs(graders, '--grader'))
        replace_section(SECTION, (
            f'{note + " " if note else ""}Each grader run as a user runs predict.py, on the '
            f'photographs of patients no net trained, validated or was tuned on (the test split '
            f'at --hold_out {hold_out}, or patients nowhere in the training labels).  Kappa of '
            f"predict.py's level on the photographs it calls gradable; 95% intervals resample "
            f'patients.  `python bench/bench_shipped.py {shlex.join(sys.argv[1:])}` ({today()}, {cpu_model()}, '
            f'{time.perf_counter() - started:.0f} s).\n\n{commands}\n\n{body}\n'))


if __name__ == '__main__':
    main()
