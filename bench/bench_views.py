#!/usr/bin/env python
"""How many TTA views the chain's blend should see: its test-split figures and how far its score
moves when the photograph is turned or re-saved, at each view count.

    python bench/bench_views.py --blend multi-chain --labels data/real2/labels.csv \\
        --images c_128_5x5_32_ram=data/real2/e128 --images c_256_5x5_32_ram=data/real2/e256 \\
        --views 10 --views 20 --work data/real2/views

The blend (blend.py --predict's file, or a released chain's name) was fitted on features over
its own number of views (transform.py --n_iter); each net's features of the test-split
photographs (the patients `held_out(name, --hold_out)`, as train_nn.py --hold_out split them)
are computed here over more views with the same TTA sequence (a 20-view run's first 10 views
are the 10-view run's), and the blend applied to them as predict.py applies it (per patient).
Each row: the blend's kappa at its own cut-offs and the referable-DR AUROC (level >= 2) of its
score on the photographs as converted, with 95% patient-bootstrap intervals; then, for each
change (`--change`: rot90 turns each converted image a quarter turn, pixel for pixel, stored
lossless; jpegQ re-saves it at JPEG quality Q), the mean absolute change of the score and the
share of photographs whose level changes.  The converted images of every `--images` folder are
those the nets' training images were (convert.py's output); their features land in --work and
are reused (transform.py's rule: the same weights, images and views).  Writes its table to
BENCHMARKS.md unless --no_write.
"""
import io
import os
import sys
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from report import cpu_model, replace_section, today  # noqa: E402

SECTION = 'Real photographs: how many TTA views the chain sees'


def changed_copy(source, target, change):
    """Write the converted image `source` changed by `change` ('rot90' or 'jpegQ') to `target`."""
    from PIL import Image
    with Image.open(source) as image:
        rgb = image.convert('RGB')
    if change == 'rot90':
        rgb.transpose(Image.Transpose.ROTATE_90).save(target, format='PNG')
        return
    buffer = io.BytesIO()
    rgb.save(buffer, format='JPEG', quality=int(change[4:]))
    target.write_bytes(buffer.getvalue())


def folder_of(work, cnf, source_folder, names, change):
    """work/CNF/CHANGE: the test-split images of `source_folder` (links, or changed copies),
    with the folder's conversion record (its look)."""
    import shutil

    from retina.data.images import image_name, list_images
    folder = Path(work) / cnf / change
    folder.mkdir(parents=True, exist_ok=True)
    record = Path(source_folder) / 'conversion.json'
    if record.is_file():
        shutil.copyfile(record, folder / 'conversion.json')
    for path in list_images(source_folder):
        name = image_name(path)
        if name not in names:
            continue
        if change == 'as converted':
            target = folder / path.name
            if not target.exists():
                os.symlink(Path(path).resolve(), target)
        else:
            target = folder / (name + ('.png' if change == 'rot90' else '.jpeg'))
            if not target.exists():
                changed_copy(path, target, change)
    return folder


def features(work, cnf, loaded, folder, split, n_iter, skip, sequence):
    """(names, mean, std) of `loaded`'s features of `folder` over `n_iter` views (computed in
    `work`, or read back)."""
    from retina.core import paths
    from retina.features.extract import extract_features
    from retina.features.files import load_features
    from retina.model import config as config_module
    here = os.getcwd()
    os.chdir(work)
    try:
        config = config_module.load(cnf)
        extract_features(config, loaded, str(folder), split, n_iter, skip, progress=True,
                         echo=lambda *a, **k: None, sequence=sequence)
        mean, names = load_features(paths.features(cnf, split, 'mean', n_iter, skip))
        std, _ = load_features(paths.features(cnf, split, 'std', n_iter, skip))
    finally:
        os.chdir(here)
    return names, mean, std


@click.command()
@click.option('--blend', 'blend_name', required=True,
              help="The fitted blend: a released chain's name (multi-chain) or blend.py's file.")
@click.option('--labels', required=True, type=click.Path(exists=True, dir_okay=False),
              help='The training labels (image, level, ...): the test split is taken from it.')
@click.option('--images', 'image_folders', multiple=True, required=True, metavar='CNF=FOLDER',
              help="Each net's converted images (convert.py's output, as it trained on).")
@click.option('--views', multiple=True, type=click.IntRange(1), default=(10, 20),
              show_default=True, help='TTA view counts to compare (transform.py --n_iter).')
@click.option('--change', 'changes', multiple=True, default=('rot90', 'jpeg50'),
              show_default=True, help='rot90, or jpegQ (re-saved at JPEG quality Q).')
@click.option('--hold_out', default=0.15, show_default=True, type=float,
              help='The --hold_out the nets were trained with.')
@click.option('--limit', type=click.IntRange(1), default=None,
              help='At most this many test-split patients (the first by name), for a trial.')
@click.option('--work', default='data/views', show_default=True,
              help='Folder for the changed copies and the features (reused).')
@click.option('--cut_offs', default=None, metavar='A,B,C,D',
              help="Cut the scores into levels here instead of at the blend's own cut-offs "
                   '(e.g. 0.5,1.5,2.5,3.5): how far the levels move depends on where they lie.')
@click.option('--write/--no_write', default=True, show_default=True,
              help='Write the table to BENCHMARKS.md.')
def main(blend_name, labels, image_folders, views, changes, hold_out, limit, work, cut_offs,
         write):
    from retina.blend import fitted as fitted_blend
    from retina.core import metrics
    from retina.core.paths import patient_and_eye
    from retina.data.labels import held_out, load_labels
    from retina.model import checkpoint, released

    started = time.time()
    for change in changes:
        if change != 'rot90' and not (change.startswith('jpeg') and change[4:].isdigit()):
            raise click.BadParameter(f'{change}: rot90 or jpegQ (jpeg50)', param_hint='--change')
    if released.is_chain(blend_name):
        blend_path, chain_nets = released.chain(blend_name)
        weights_of = dict(chain_nets)
    else:
        blend_path, weights_of = Path(blend_name), {}
    state = fitted_blend.load(blend_path)
    thresholds = tuple(state['thresholds'])
    if cut_offs:
        try:
            thresholds = tuple(float(v) for v in cut_offs.split(','))
        except ValueError:
            thresholds = ()
        if len(thresholds) != 4 or list(thresholds) != sorted(thresholds):
            raise click.BadParameter(f'{cut_offs}: four rising numbers, e.g. 0.5,1.5,2.5,3.5',
                                     param_hint='--cut_offs')
    entries = fitted_blend.entries(state)
    folders = dict(item.split('=', 1) for item in image_folders)
    known = load_labels(labels)
    test = sorted(n for n in known if held_out(n, hold_out))
    if limit:
        keep = sorted({patient_and_eye(n)[0] for n in test})[:limit]
        test = [n for n in test if patient_and_eye(n)[0] in keep]
    work = Path(work).resolve()
    nets = {}
    for entry in entries:
        if entry['cnf'] not in folders:
            raise click.UsageError(f'the blend needs {entry["cnf"]}: pass --images '
                                   f'{entry["cnf"]}=FOLDER')
        nets.setdefault(entry['cnf'], checkpoint.load_net(
            entry['cnf'], weights_of.get(entry['cnf'], entry['weights']), 'cpu'))
    fitted_views = sorted({entry['n_iter'] for entry in entries})
    rows, scores = [], {}
    for change in ('as converted',) + tuple(changes):
        for n_iter in views:
            per_file, names = {}, None
            for entry in entries:
                cnf = entry['cnf']
                folder = folder_of(work, cnf, folders[cnf], set(test), change)
                run_dir = work / 'features' / change.replace(' ', '_')
                run_dir.mkdir(parents=True, exist_ok=True)
                _, skip, sequence = fitted_blend.tta_of(entry)
                found, mean, std = features(run_dir, cnf, nets[cnf], folder, 'test', n_iter, skip,
                                            sequence)
                names = names or found
                if found != names:
                    raise click.ClickException(f'{folder}: other images than the first net\'s')
                per_file[id(entry)] = mean if entry['stat'] == 'mean' else std
            predictions = fitted_blend.predict(state, lambda e: per_file[id(e)], names)
            scores[change, n_iter] = dict(zip(names, predictions))
            click.echo(f'{change}, {n_iter} views: {len(names)} photographs '
                       f'({time.time() - started:.0f} s)', err=True)
    for n_iter in views:
        base = scores['as converted', n_iter]
        names = sorted(base)
        levels = np.array([known[n] for n in names])
        predictions = np.array([base[n] for n in names])
        kappa = metrics.bootstrap(names, lambda lv, pr: metrics.kappa(lv, pr, thresholds),
                                  levels, predictions)
        auroc = metrics.bootstrap(names, lambda lv, pr: _auroc(lv >= 2, pr), levels,
                                  predictions)
        row = [f'{n_iter}' + (' (fitted on)' if n_iter in fitted_views else ''),
               f'{len(names)}', str(kappa), str(auroc)]
        for change in changes:
            other = scores[change, n_iter]
            moved = np.array([other[n] for n in names]) - predictions
            level_before = metrics.to_levels(predictions, thresholds)
            level_after = metrics.to_levels(predictions + moved, thresholds)
            row.append(f'{np.mean(np.abs(moved)):.2f} / {100 * np.mean(level_before != level_after):.1f}%')
        rows.append('| ' + ' | '.join(row) + ' |')
    head = ('| views | photographs | kappa (' + (f'cut-offs {cut_offs}' if cut_offs else 'its cut-offs')
            + ') | referable AUROC | '
            + ' | '.join(f'{c}: mean abs. score change / level changed' for c in changes) + ' |')
    table = '\n'.join([head, '|' + ' --- |' * (4 + len(changes)), *rows])
    seconds = time.time() - started
    command = 'python bench/bench_views.py ' + ' '.join(sys.argv[1:])
    text = (f'{today()}, {cpu_model()}, fp32, {seconds:.0f} s: `{command}`.  The blend {blend_name} '
            f'(fitted on {", ".join(map(str, fitted_views))}-view features) applied per patient '
            f'to each net\'s features over more views (the same TTA sequence), on the test-split '
            f'photographs of every source as converted (patients no net, cut-off or blend fit saw;'
            f' 95% patient-bootstrap intervals), then to the same photographs turned a quarter '
            f'(rot90, pixel for pixel) or re-saved as JPEG (jpegQ) after conversion.\n\n{table}\n')
    click.echo(text)
    if write:
        replace_section(SECTION, text)


def _auroc(positive, scores):
    from sklearn.metrics import roc_auc_score
    return roc_auc_score(positive, scores) if 0 < positive.sum() < len(positive) else float('nan')


if __name__ == '__main__':
    main()
