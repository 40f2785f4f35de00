#!/usr/bin/env python
"""The 128-pixel pipeline on real photographs, against a pixel floor, and across cameras.

    python bench/bench_real.py                       # full schedules (200 epochs), both looks
    python bench/bench_real.py --epochs 30 --tta 5   # a shorter run (the table says so)

For each look (`--looks`: convert.py --enhance none and local_contrast) in
its own work folder: convert `--source` (eyepacs256: 5,332 EyePACS photos,
both eyes) to 128 px, train each config of `--configs` on it with
train_nn.py, extract TTA features with transform.py, blend them per patient
with blend.py; all validation figures are on the pipeline's own split (10%
of patients, seed 9).  The pixel floor is a ridge regression on the
photographs shrunk to 24 × 24 pixels (what a model gets without any
convolution), fitted on the training split.  Then the cross-camera rows:
the trained nets grade `--raw` (raw camera photographs, other colours),
converted with the same look.

Every step is resumable: run the same command again after an interruption
(finished nets are continued with --resume, which stops at once; features
continue from their last save).  Writes the table to BENCHMARKS.md.
"""
import csv
import os
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
from PIL import Image  # noqa: E402

from retina.core import paths  # noqa: E402
from retina.core.atomic import save_image  # noqa: E402
from retina.core.metrics import fit_thresholds, kappa  # noqa: E402
from retina.data import cache, preprocess  # noqa: E402
from retina.data.crop import save_options  # noqa: E402
from retina.data.images import image_name, list_images, load_rgb  # noqa: E402
from retina.data.labels import load_labels, split_indices  # noqa: E402
from retina.features.files import load_features  # noqa: E402
from retina.model import checkpoint  # noqa: E402
from retina.model import config as config_module  # noqa: E402
from retina.model.checkpoint import load_net  # noqa: E402
from retina.model.nets import is_ram_net  # noqa: E402

SHARED = REPO.parent / 'shared' / 'data'
FLOOR_SIDE = 24


def run(args, cwd, log):
    """Run one of the pipeline's scripts in `cwd`; its output goes to `log` and is returned."""
    line = 'python ' + ' '.join(map(str, args))
    click.secho(f'[{cwd.name}] $ {line}', bold=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / args[0]), *map(str, args[1:])], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, 'PYTHONPATH': str(REPO)})
    with open(log, 'a') as f:
        f.write(f'$ {line}\n{result.stdout}\n')
    tail = result.stdout.strip().splitlines()[-3:]
    click.echo('\n'.join(tail) + f'\n({time.perf_counter() - started:.0f} s)')
    if result.returncode != 0:
        raise click.ClickException(f'{args[0]} failed ({result.returncode}); see {log}')
    return result.stdout


def convert(source, target, look, work, log):
    """convert.py `source` -> `target` at 128 px with --enhance `look`.

    A `source` that is itself a converted 128-px folder (its conversion.json says so,
    e.g. photos converted elsewhere and carried to a GPU machine) is not cropped
    again: each image only gets the look, exactly convert.py's last step.
    """
    record = preprocess.read_record(source)
    if not (record and record['crop_size'] == 128 and record['preprocessing'] == 'none'):
        run(['convert.py', '--directory', source, '--convert_directory', target, '--crop_size',
             128, '--extension', 'jpeg', '--enhance', look, '--no_progress'], work, log)
        return
    target = work / target
    target.mkdir(parents=True, exist_ok=True)
    preprocess.claim_folder(target, 128, look, has_images=False)
    for path in list_images(source):
        if not (target / path.name).is_file():
            rgb = np.asarray(load_rgb(path))
            save_image(target / path.name, Image.fromarray(preprocess.apply(rgb, look)),
                       **save_options(path))
    click.echo(f'[{work.name}] {source} (converted at 128 px) -> {target} with --enhance {look}')


def labelled(folder, labels_file):
    image_paths = list_images(folder)
    labels = load_labels(labels_file)
    keep = [p for p in image_paths if image_name(p) in labels]
    return keep, np.array([labels[image_name(p)] for p in keep])


def shrink(images, side=FLOOR_SIDE):
    """(N, 3, S, S) uint8 -> (N, 3·side²) float: area-averaged pixels, the floor's inputs."""
    import torch
    import torch.nn.functional as F
    out = []
    for start in range(0, len(images), 512):
        batch = torch.from_numpy(np.asarray(images[start:start + 512])).float()
        out.append(F.adaptive_avg_pool2d(batch, side).flatten(1).numpy())
    return np.concatenate(out)


def pixel_floor(train_x, train_y, tests):
    """Ridge on shrunk pixels, regularisation chosen by cross-validation on the training rows;
    returns predictions for each array of `tests`."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(0, 5, 11)))
    model.fit(train_x, train_y)
    return [model.predict(x) for x in tests]


def kappas(levels, predictions):
    """(kappa at cut-offs 0.5..3.5, kappa at cut-offs fitted on these very predictions)."""
    cuts = fit_thresholds(levels, predictions)
    return kappa(levels, predictions), kappa(levels, predictions, cuts)


def best_and_last(log_file):
    with open(log_file, newline='') as f:
        rows = list(csv.DictReader(f))
    values = [float(r['valid_kappa']) for r in rows]
    return max(values), values[-1], len(rows), sum(float(r['seconds']) for r in rows)


def head_on_features(work, config_name, tta, valid, names_order):
    """A RAM net's own linear output on its TTA-mean global-average-pool features."""
    state = checkpoint.load(work / paths.best_kappa_weights(config_name))
    weight = state['model']['output.weight'].numpy()[0]
    bias = float(state['model']['output.bias'].numpy()[0])
    features, names = load_features(work / paths.features(config_name, 'train', 'mean', tta, 0))
    row = {n: i for i, n in enumerate(names)}
    return features[[row[names_order[i]] for i in valid]] @ weight + bias


def grade(work, config_name, image_paths, device):
    """The trained net's predictions (best-kappa weights, centred window) for `image_paths`."""
    from retina.model.inference import centred_scores
    loaded = load_net(config_module.load(config_name),
                      work / paths.best_kappa_weights(config_name), device)
    return centred_scores(loaded, image_paths, device=device, cache_dir=work / 'data' / 'cache')


def one_look(look, source, raw, work, configs, epochs, tta, device, compile_model, log):
    """Every figure of one look; returns {row name: value} and timings."""
    work.mkdir(parents=True, exist_ok=True)
    (work / 'data').mkdir(exist_ok=True)
    (work / 'data' / 'trainLabels.csv').write_bytes((source / 'trainLabels.csv').read_bytes())
    convert(source / 'train', 'data/train_tiny', look, work, log)
    if raw is not None:
        (work / 'data' / 'rawLabels.csv').write_bytes((raw / 'trainLabels.csv').read_bytes())
        convert(raw / 'train', 'data/raw_tiny', look, work, log)
    figures, seconds = {}, {}
    image_paths, levels = labelled(work / 'data' / 'train_tiny', work / 'data' / 'trainLabels.csv')
    names = [image_name(p) for p in image_paths]
    train_idx, valid_idx = split_indices(names, levels)
    truth = levels[valid_idx]
    figures['n_images'], figures['n_valid'] = len(names), len(valid_idx)

    images = cache.load_images(image_paths, progress=False, cache_dir=work / 'data' / 'cache')
    pixels = shrink(images)
    tests = [pixels[valid_idx]]
    if raw is not None:
        raw_paths, raw_levels = labelled(work / 'data' / 'raw_tiny', work / 'data' / 'rawLabels.csv')
        raw_images = cache.load_images(raw_paths, progress=False, cache_dir=work / 'data' / 'cache')
        tests.append(shrink(raw_images))
    floor = pixel_floor(pixels[train_idx], levels[train_idx], tests)
    figures['floor'] = kappas(truth, floor[0])
    if raw is not None:
        figures['raw floor'] = kappas(raw_levels, floor[1])

    features = []
    for name in configs:
        started = time.perf_counter()
        args = ['train_nn.py', '--cnf', name, '--train_dir', 'data/train_tiny', '--labels',
                'data/trainLabels.csv', '--device', device, '--no_progress']
        if epochs:
            args += ['--max_epochs', epochs]
        if compile_model:
            args += ['--compile']
        if (work / paths.resume_checkpoint(name)).is_file():
            args += ['--resume']
        run(args, work, log)
        seconds[f'train {name}'] = time.perf_counter() - started
        best, last, n_epochs, _ = best_and_last(work / paths.train_log(name))
        figures[f'net {name}'] = (best, last, n_epochs)
        started = time.perf_counter()
        run(['transform.py', '--cnf', name, '--train', '--n_iter', tta, '--train_dir',
             'data/train_tiny', '--device', device, '--no_progress'], work, log)
        seconds[f'features {name}'] = time.perf_counter() - started
        features += [paths.features(name, 'train', s, tta, 0) for s in ('mean', 'std')]
        if is_ram_net(config_module.load(name).layers):
            figures[f'head {name}'] = kappas(truth, head_on_features(work, name, tta, valid_idx,
                                                                      names))
        if raw is not None:
            figures[f'raw {name}'] = kappas(raw_levels, grade(work, name, raw_paths, device))
    started = time.perf_counter()
    blend = run(['blend.py', '--per_patient', '--labels', 'data/trainLabels.csv',
                 '--optimize_thresholds', '--no_pictures',
                 *sum((['--features_file', f] for f in features), [])], work, log)
    seconds['blend'] = time.perf_counter() - started
    fixed = re.findall(r'valid kappa (-?[\d.]+) \(cut-offs', blend)
    fitted = re.findall(r'valid kappa (-?[\d.]+) \(fitted cut-offs', blend)
    figures['blend'] = (float(fixed[-1]), float(fitted[-1]))
    return figures, seconds


def table(results, configs, epochs, tta, raw_name):
    looks = list(results)
    head = '| stage | ' + ' | '.join(f'--enhance {look}' for look in looks) + ' |'
    rows = [head, '| --- |' + ' ---: |' * len(looks)]

    def row(label, cell):
        rows.append(f'| {label} | ' + ' | '.join(cell(results[look]) for look in looks) + ' |')

    row(f'pixel floor: ridge on {FLOOR_SIDE}×{FLOOR_SIDE} pixels (cut-offs 0.5..3.5 / fitted)',
        lambda f: '{:.3f} / {:.3f}'.format(*f['floor']))
    for name in configs:
        row(f'{name}: best epoch / last epoch (centred window)',
            lambda f, n=name: '{:.3f} / {:.3f} ({} epochs)'.format(*f[f'net {n}']))
        if is_ram_net(config_module.load(name).layers):
            row(f'{name}: its linear head on {tta}-iteration TTA mean features (0.5..3.5 / '
                f'fitted)', lambda f, n=name: '{:.3f} / {:.3f}'.format(*f[f'head {n}']))
    row(f'per-patient blend of {" + ".join(configs)} TTA features, cut-offs 0.5..3.5',
        lambda f: f'{f["blend"][0]:.3f}')
    row('same blend, cut-offs fitted on the validation patients (optimistic)',
        lambda f: f'{f["blend"][1]:.3f}')
    if raw_name:
        row(f'cross-camera ({raw_name}): pixel floor fitted on the training photos',
            lambda f: '{:.3f} / {:.3f}'.format(*f['raw floor']))
        for name in configs:
            row(f'cross-camera ({raw_name}): {name}, centred window (0.5..3.5 / fitted)',
                lambda f, n=name: '{:.3f} / {:.3f}'.format(*f[f'raw {n}']))
    return '\n'.join(rows)


@click.command(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--source', type=click.Path(exists=True, file_okay=False),
              default=str(SHARED / 'eyepacs256'), show_default=True,
              help='Folder with train/ and trainLabels.csv (the photographs to learn from).')
@click.option('--raw', type=click.Path(file_okay=False), default=str(SHARED / 'eyepacs_raw'),
              show_default=True,
              help='Folder with train/ and trainLabels.csv of photographs from other cameras, '
                   'graded by the trained nets (skipped when absent).')
@click.option('--work', default='/tmp/real_bench', show_default=True,
              type=click.Path(file_okay=False), help='Work folder (one sub-folder per look).')
@click.option('--configs', default='c_128_5x5_32_ram,c_128_5x5_32', show_default=True,
              help='Comma-separated configs to train and blend.')
@click.option('--looks', default='none,local_contrast', show_default=True,
              help='Comma-separated convert.py --enhance methods, one column each.')
@click.option('--epochs', type=click.IntRange(min=1),
              help='Train this many epochs (--max_epochs) [default: the full schedule].')
@click.option('--tta', default=10, show_default=True, type=click.IntRange(min=1),
              help='Test-time augmentation iterations of transform.py.')
@click.option('--device', default='auto', show_default=True, help='auto, cpu or cuda.')
@click.option('--compile', 'compile_model', is_flag=True, help='train_nn.py --compile.')
@click.option('--note', default='', help='A sentence added to the section (how the data came).')
@click.option('--write/--no_write', default=True, show_default=True,
              help='Write the table into BENCHMARKS.md.')
def main(source, raw, work, configs, looks, epochs, tta, device, compile_model, note, write):
    """Validation kappa of nets, TTA head and blend on real photographs, beside a pixel floor."""
    import torch
    from retina.core.runtime import resolve_device
    source, work = Path(source).resolve(), Path(work).resolve()
    raw = Path(raw).resolve() if raw and (Path(raw) / 'train').is_dir() else None
    configs, looks = configs.split(','), looks.split(',')
    device = str(resolve_device(device))
    work.mkdir(parents=True, exist_ok=True)
    log = work / 'bench_real.log'
    started = time.perf_counter()
    results, timings = {}, {}
    for look in looks:
        results[look], timings[look] = one_look(look, source, raw, work / look, configs, epochs,
                                                tta, device, compile_model, log)
    minutes = (time.perf_counter() - started) / 60
    first = results[looks[0]]
    command = ('python bench/bench_real.py' + (f' --epochs {epochs}' if epochs else '')
               + f' --tta {tta}' + (f' --configs {",".join(configs)}'
                                    if configs != ['c_128_5x5_32_ram', 'c_128_5x5_32'] else '')
               + (' --compile' if compile_model else ''))
    if preprocess.read_record(source / 'train'):
        note = (f' (converted to 128 px beforehand and carried as {source.name}; each look '
                f'applied to those images{"; " + note if note else ""})')
    elif note:
        note = f' ({note})'
    text = table(results, configs, epochs, tta, raw.name if raw else None)
    spent = '; '.join(f'{look}: ' + ', '.join(f'{k} {v / 60:.1f} min' for k, v in t.items())
                      for look, t in timings.items())
    body = (f'{source.name}: {first["n_images"]} photographs at 128 px, {first["n_valid"]} '
            f'validation images (10% of patients, seed 9){note}; '
            f'{"full schedules" if not epochs else f"{epochs} epochs"}, {tta} TTA iterations. '
            f'Device: {device_name(torch.device(device))}; {today()}; {minutes:.1f} min in all '
            f'({spent}).\nCommand: `{command}`.\n\n{text}')
    click.echo(text)
    if write:
        replace_section(f'Real photographs at 128 px ({source.name})', body)


if __name__ == '__main__':
    main()
