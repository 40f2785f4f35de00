#!/usr/bin/env python
"""The chain on real photographs, scored on a test split of patients that nothing was tuned on.

    python bench/bench_chain.py --work data/real --labels data/real/eyepacs_labels.csv \\
        --net c_128_5x5_32_ram:e128 [--net c_256_5x5_32_ram:e256] --tta 10

Every net was trained with `train_nn.py --hold_out FRACTION` on its folder (the same
photographs at its size, e.g. eyepacs256 converted to 128 and 256 px with --enhance
local_contrast); weights are each run's weights/CNF/weights.pt under `--work` (best validation
kappa).  The test split is `held_out(name, FRACTION)`: patients that no training,
epoch choice, cut-off or blend fit ever saw; the validation split is the one training used
(`split_indices` of the other patients).  Anything fitted here (the pixel floor,
cut-offs, blends) is fitted on the training or validation patients only.

Rows of the table, each on the test split with a 95% patient-bootstrap interval:
the pixel floor (ridge on 24 × 24 pixels); each net on the centred window and its own linear
head on the TTA-mean features (transform.py, run here: resumable); per-patient blends of the
nets' TTA features fitted (a) on the training patients, as blend.py does, (b) on the
validation patients by cross-fitting (features the nets never trained on), and (c) a linear
per-patient blend of the nets' TTA head scores fitted on the validation patients.  Each row:
kappa at the fixed cut-offs 0.5..3.5, kappa at cut-offs fitted on validation predictions of
the same kind (out of fold where the validation patients were fitted on), the AUROC of
referable DR (level >= 2) and the Spearman correlation with the level (neither depends on the
cut-offs).  Cross-camera rows (`--raw`) grade raw photographs through predict.py, on the
patients that no net trained or validated on.  Labels with a `source` column (python -m
retina.datasets writes one: eyepacs256, odir, eyepacs_raw1024...) get each row per source too,
on that source's test patients.  Writes the table to BENCHMARKS.md.
"""
import csv
import os
import sys
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from bench_real import FLOOR_SIDE, pixel_floor, run, shrink  # noqa: E402
from report import device_name, replace_section, today  # noqa: E402

from retina.blend.fitting import FOLDS, folds_by_patient  # noqa: E402
from retina.core import metrics, paths  # noqa: E402
from retina.core.paths import patient_and_eye  # noqa: E402
from retina.data import cache  # noqa: E402
from retina.data.images import image_name  # noqa: E402
from retina.data.labels import held_out, labelled_images, load_labels  # noqa: E402
from retina.data.labels import split_rows  # noqa: E402
from retina.publish.release import centred_scores  # noqa: E402

SHARED = REPO.parent / 'shared' / 'data'


# ---------------------------------------------------------------- the pieces

def head(work, name, tta, names):
    """The RAM net's own linear output on its TTA-mean features, in `names` order; and the
    mean and std features themselves."""
    from retina.features.files import load_features
    from retina.model import checkpoint
    state = checkpoint.load(work / paths.best_kappa_weights(name))
    weight = state['model']['output.weight'].numpy()[0]
    bias = float(state['model']['output.bias'].numpy()[0])
    mean, rows = load_features(work / paths.features(name, 'train', 'mean', tta, 0))
    std, _ = load_features(work / paths.features(name, 'train', 'std', tta, 0))
    order = [{n: i for i, n in enumerate(rows)}[n] for n in names]
    return mean[order] @ weight + bias, np.hstack([mean[order], std[order]])


def blend_py(work, nets, tta, labels, fit_on, names, valid_rows, test_rows):
    """blend.py's per-patient blend of the nets' TTA mean and std features (`run_blend`, as
    blend.py --per_patient --optimize_thresholds --fit_on FIT_ON runs it, in `work`):
    (predictions for every row, NaN outside the validation and test rows; the validation
    predictions its cut-offs are fitted on)."""
    from retina.blend.blending import run_blend
    files = [work / paths.features(name, 'train', stat, tta, 0)
             for name, _ in nets for stat in ('mean', 'std')]
    labels, here = Path(labels).resolve(), os.getcwd()
    os.chdir(work)  # the feature files name their weights relative to it
    try:
        result = run_blend({'chain': files}, labels_file=Path(labels), per_patient=True,
                           optimize_thresholds=True, fit_on=fit_on, pictures=False,
                           echo=lambda line: None)
    finally:
        os.chdir(here)
    if not result.held_out:
        raise click.ClickException(f'blend.py found no test split in the weights of {files[0]}')
    report = result.validation['chain']
    row_of = {name: i for i, name in enumerate(names)}
    predictions = np.full(len(names), np.nan)
    predictions[[row_of[n] for n in report.names]] = report.predictions
    held = result.held_out['chain']
    predictions[[row_of[n] for n in held.names]] = held.predictions
    if np.isnan(predictions[np.concatenate([valid_rows, test_rows])]).any():
        raise click.ClickException('blend.py split the photographs unlike train_nn.py')
    return predictions, predictions[valid_rows], result.fit_on


def cross_fitted(fit, names, levels, rows):
    """(out-of-fold predictions for `rows`, the folds' mean prediction for every row) of
    `fit(fit_rows) -> predictions for every row`, with folds by patient over `rows`."""
    out_of_fold = np.zeros(len(names))
    total = 0.0
    folds = folds_by_patient(names, rows, FOLDS)
    for held in folds:
        rest = np.setdiff1d(rows, held)
        predictions = fit(rest)
        out_of_fold[held] = predictions[held]
        total = total + predictions
    return out_of_fold, total / len(folds)


def linear_blend(inputs, levels, fit_rows):
    from sklearn.linear_model import RidgeCV
    model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(inputs[fit_rows], levels[fit_rows])
    return model.predict(inputs)


def raw_test(work, raw, labels_file, nets, hold_out, trained_patients, log):
    """predict.py (the user's path: raw photographs, the nets' own crop and look) on the
    photographs of `raw` whose patients no net trained or validated on; rows per choice of
    patients: (label, names, levels, mean score of the nets)."""
    labels = load_labels(labels_file)
    photos = sorted(p for p in (raw / 'train').iterdir() if image_name(p) in labels)
    unseen = [p for p in photos if patient_and_eye(image_name(p))[0] not in trained_patients]
    if not unseen:
        return []
    # Named by the nets and their weights' checksums: a rerun with other nets, or with the
    # same nets retrained, grades again instead of reusing the grades.
    from retina.model.released import sha256_of
    out = work / (f'raw_{raw.name}_' + '+'.join(
        f'{name}-{sha256_of(work / paths.best_kappa_weights(name))[:8]}' for name, _ in nets)
        + '.csv')
    if not out.is_file():
        listing = work / f'raw_{raw.name}'
        listing.mkdir(exist_ok=True)
        for p in unseen:
            if not (listing / p.name).exists():
                (listing / p.name).symlink_to(p.resolve())
        args = ['predict.py', listing, '--output', out, '--no_progress']
        for name, _ in nets:
            args += ['--cnf', name, '--weights_from', work / paths.best_kappa_weights(name)]
        run(args, work, log)
    with open(out, newline='') as f:
        rows = list(csv.DictReader(f))
    names = [r['image'] for r in rows]
    scores_ = np.array([float(r['mean']) for r in rows])
    levels = np.array([labels[n] for n in names])
    held = np.array([held_out(n, hold_out) for n in names])
    result = [(f'all {len(unseen)} photographs of patients no net saw', names, levels, scores_)]
    if held.any() and not held.all():
        result.append((f'the {int(held.sum())} of test-split patients', list(np.array(names)[held]),
                       levels[held], scores_[held]))
    return result


# ---------------------------------------------------------------- the table

def sources_of(labels_file):
    """{image: source} from a labels CSV's `source` column, or {} without one."""
    with open(labels_file, newline='', encoding='utf-8-sig') as f:
        reader = csv.DictReader(f)
        if 'source' not in (reader.fieldnames or []):
            return {}
        return {row['image'].strip(): row['source'].strip() for row in reader}


def table_rows(rows):
    head_ = ('| stage (test split) | kappa, cut-offs 0.5..3.5 | kappa, cut-offs fitted on '
             'validation | referable AUROC | Spearman |')
    lines = [head_, '| --- | ---: | ---: | ---: | ---: |']
    for label, (fixed, fitted, auroc, rank) in rows:
        lines.append(f'| {label} | {fixed} | {fitted if np.isfinite(fitted.value) else "–"} | '
                     f'{auroc} | {rank} |')
    return '\n'.join(lines)


@click.command(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--work', required=True, type=click.Path(exists=True, file_okay=False),
              help='Folder the nets were trained in (weights/CNF/ under it); features and '
                   'the log are written there.')
@click.option('--labels', required=True, type=click.Path(exists=True, dir_okay=False),
              help='Labels of the training folders (image,level).')
@click.option('--net', 'nets', multiple=True, required=True, metavar='CNF:FOLDER',
              help='A trained config and the folder of converted photographs it trained on '
                   '(relative to --work); repeat for each net of the chain.')
@click.option('--hold_out', default=0.15, show_default=True, type=float,
              help='The fraction the nets were trained with (train_nn.py --hold_out).')
@click.option('--tta', default=10, show_default=True, type=click.IntRange(min=2),
              help='TTA iterations of transform.py.')
@click.option('--raw', multiple=True, type=click.Path(file_okay=False),
              default=[str(SHARED / 'eyepacs_raw'), str(SHARED / 'eyepacs_raw1024')],
              show_default=True, help='Raw photographs (train/, trainLabels.csv) graded by '
                                      'predict.py; skipped when absent.')
@click.option('--section', default='Real photographs: the chain on held-out patients',
              show_default=True, help='The BENCHMARKS.md section written.')
@click.option('--note', default='', help='A sentence for the section (epochs, machine).')
@click.option('--write/--no_write', default=True, show_default=True)
def main(work, labels, nets, hold_out, tta, raw, section, note, write):
    """Test-split kappa, AUROC and Spearman of every stage of the chain, with intervals."""
    import torch
    work = Path(work).resolve()
    log = work / 'bench_chain.log'
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')  # transform.py's auto
    nets = [tuple(n.split(':', 1)) for n in nets]
    started = time.perf_counter()
    first_paths, levels = labelled_images(work / nets[0][1], labels)
    names = [image_name(p) for p in first_paths]
    fit_rows, valid_rows, test_rows = split_rows(names, levels, hold_out)
    test_names, test_levels = [names[i] for i in test_rows], levels[test_rows]
    source = sources_of(labels)
    by_source = {}
    for i, name in enumerate(test_names):
        by_source.setdefault(source.get(name, ''), []).append(i)
    by_source = {k: np.array(v) for k, v in sorted(by_source.items()) if k} \
        if len(by_source) > 1 else {}
    click.echo(f'{len(names)} photographs: {len(fit_rows)} training, {len(valid_rows)} '
               f'validation, {len(test_rows)} test ({len(set(metrics.patients(test_names)))} '
               f'patients)')
    rows = []

    def add(label, predictions, cut_source=None):
        """A row from predictions for every image; cut-offs fitted on `cut_source` (validation
        predictions of the same kind) [default: `predictions` at the validation rows]."""
        source = predictions[valid_rows] if cut_source is None else cut_source
        cuts = metrics.fit_thresholds(levels[valid_rows], source)
        rows.append((label + (' — all sources' if by_source else ''),
                     metrics.score_intervals(test_names, test_levels, predictions[test_rows],
                                             cuts)))
        click.echo(f'{rows[-1][0]}: ' + ', '.join(str(v) for v in rows[-1][1]))
        for name, at in by_source.items():  # the same cut-offs, this source's test patients
            rows.append((f'{label} — {name} ({len(at)})',
                         metrics.score_intervals([test_names[i] for i in at], test_levels[at],
                                                 predictions[test_rows][at], cuts)))
            click.echo(f'{rows[-1][0]}: ' + ', '.join(str(v) for v in rows[-1][1]))

    images = cache.load_images(first_paths, progress=False)
    add(f'pixel floor: ridge on {FLOOR_SIDE}×{FLOOR_SIDE} pixels of the {nets[0][1]} photos',
        pixel_floor(shrink(images[fit_rows]), levels[fit_rows], [shrink(images)])[0])
    heads, features = [], []
    for name, folder in nets:
        paths_, levels_ = labelled_images(work / folder, labels)
        if [image_name(p) for p in paths_] != names:
            raise click.ClickException(f'{folder}: not the photographs of {nets[0][1]}')
        epochs = sum(1 for _ in open(work / paths.train_log(name))) - 1
        add(f'{name} ({epochs} epochs), centred window',
            centred_scores(name, work / paths.best_kappa_weights(name), work / folder, paths_))
        run(['transform.py', '--cnf', name, '--train', '--n_iter', tta, '--train_dir', folder,
             '--weights_from', paths.best_kappa_weights(name), '--no_progress'], work, log)
        score, feature = head(work, name, tta, names)
        add(f'{name}: its head on {tta}-iteration TTA features', score)
        heads.append(score)
        features.append(feature)
    for fit_on in ('all', 'unseen'):
        predictions, cut_source, used = blend_py(work, nets, tta, labels, fit_on, names,
                                                 valid_rows, test_rows)
        add(f'per-patient blend of the TTA features, blend.py --fit_on {fit_on}'
            + (' (the default: fitted on the validation patients, 5-fold)' if used == 'unseen'
               else ' (fitted on the training patients, the original)' if fit_on == 'all'
               else ' (too few validation patients: ran as --fit_on all)'),
            predictions, cut_source)
    from retina.blend.net import per_patient_inputs
    head_inputs = per_patient_inputs(np.stack(heads, 1).astype(np.float32), names)
    out_of_fold, mean = cross_fitted(lambda r: linear_blend(head_inputs, levels, r), names,
                                     levels, valid_rows)
    add('per-patient linear blend of the TTA head scores (this eye, other eye), fitted on the '
        f'validation patients ({FOLDS}-fold)', mean, out_of_fold[valid_rows])

    trained = set(metrics.patients([names[i] for i in (*fit_rows, *valid_rows)]))
    for folder in raw:
        folder = Path(folder)
        if not (folder / 'train').is_dir():
            continue
        for label, r_names, r_levels, r_scores in raw_test(
                work, folder, folder / 'trainLabels.csv', nets, hold_out, trained, log):
            rows.append((f'cross-camera, predict.py on {folder.name}: {label}',
                         metrics.score_intervals(r_names, r_levels, r_scores)))
            click.echo(f'{rows[-1][0]}: ' + ', '.join(str(v) for v in rows[-1][1]))
    text = table_rows(rows)
    click.echo(text)
    if write:
        command = ('python bench/bench_chain.py --work WORK --labels LABELS '
                   + ' '.join(f'--net {n}:{f}' for n, f in nets) + f' --tta {tta}')
        body = (f'{len(names)} photographs ({nets[0][1]}), {len(test_rows)} of '
                f'{len(set(metrics.patients(test_names)))} patients in the test split (hold_out '
                f'{hold_out}), {len(valid_rows)} validation images. Intervals: 95%, '
                f'{metrics.BOOTSTRAP_ROUNDS} patient-bootstrap resamples of the test patients. '
                f'{note} {device_name(device)}; {today()}; '
                f'{(time.perf_counter() - started) / 60:.1f} min.\nCommand: `{command}`.\n\n'
                f'{text}')
        replace_section(section, body)


if __name__ == '__main__':
    main()
