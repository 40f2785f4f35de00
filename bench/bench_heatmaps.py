#!/usr/bin/env python
"""Do the heat maps find lesions?  Every method of ram.py, scored honestly, on synthetic and real photos.

    python bench/bench_heatmaps.py \\
        --synthetic_weights weights/c_128_5x5_32_ram_fine/weights.pt \\
        --synthetic_weights weights/c_128_5x5_32_ram/weights.pt \\
        --synthetic_fuse weights/c_256_5x5_32_ram_fine/weights.pt weights/c_128_5x5_32_ram_fine/weights.pt \\
        --real_weights weights_real/c_256_5x5_32_ram/weights.pt --layers conv5

Trains nothing: it scores the weights it is given.  Nets trained on
synthetic photos are scored on a fresh synthetic test set (generated with
retina.synthetic under a seed of its own, or --synthetic_dir) against the
generator's lesion masks; nets trained on real photos are scored on the
HEI-MED photographs against their experts' lesion masks (exudate,
other_bright and red, each kind separately), through ram.py's full-size mask
path (--photos), every photo with a mask of the kind whatever its grade.
Each net is read from its checkpoint (config name and preprocessing), the
photos are converted for it with convert.py (its crop size, its --enhance),
and ram.py runs once per method with --scores_only --scores_json.

For every (set, net, method) the table gives the per-image AUROC of the map
as a lesion-pixel detector, exact and tolerant pointing and the mass in
lesions, each as map / image-blind / grid oracle (see
retina/heatmaps/scores.py), and the AUROC's lead over the blind map with a
bootstrap interval over patients.  A part whose weights or data are missing
is skipped with a note; the table is printed and written to BENCHMARKS.md.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from report import device_name, replace_section, today  # noqa: E402

HEIMED = REPO.parent / 'shared' / 'data' / 'heimed'
SECTION = 'Heat maps: do they find lesions?'
SCORES = ('auroc', 'pointing_exact', 'pointing_game', 'mass_in_lesions')


def script(args, cwd, check=True):
    """Run a repository script (or module), echoing the command; (return code, stdout)."""
    args = [str(a) for a in args]
    shown = ('python -m ' if not args[0].endswith('.py') else 'python ') + ' '.join(args)
    click.secho(f'$ {shown}', bold=True)
    command = [sys.executable, '-m', args[0]] if not args[0].endswith('.py') \
        else [sys.executable, str(REPO / args[0])]
    result = subprocess.run(command + args[1:], cwd=cwd, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONPATH': str(REPO)})
    if result.returncode != 0:
        click.echo(result.stdout[-3000:])
        if check:
            raise click.ClickException(f'{args[0]} failed ({result.returncode}); see above')
    return result.returncode, result.stdout


class Weights:
    """A checkpoint: its path, config name, converted size and preprocessing, read from the file."""

    def __init__(self, path):
        from retina.data.cache import converted_size
        from retina.model import checkpoint
        from retina.model import config as config_module
        from retina.model.nets import is_ram_net
        self.path = Path(path).resolve()
        state = checkpoint.load(self.path)
        self.config = state.get('config_name') or '?'
        self.epoch = state.get('epoch')
        config = checkpoint.config_of(state) if 'config' in state else config_module.load(self.config)
        self.input = config.input_size[1]
        self.size = converted_size(config.input_size)
        self.enhance = state.get('preprocessing', 'none') or 'none'
        self.is_ram = is_ram_net(config.layers)
        self.conv_layers = [opt['name'] for kind, opt in config.layers if kind == 'conv']
        self.last_conv = self.conv_layers[-1]

    def __str__(self):
        return self.config

    @property
    def label(self):
        """The net as the table names it: its config and the epoch its weights are from."""
        return self.config + (f' (epoch {self.epoch})' if self.epoch is not None else '')


def checkpoints(paths, what):
    """Weights of the paths that exist; the others are named and skipped."""
    found = []
    for path in paths:
        if not Path(path).is_file():
            click.secho(f'skipped: {what} weights {path} do not exist', fg='yellow')
            continue
        found.append(Weights(path))
    return found


def converted(photos, work, tag, size, enhance):
    """The photos of `photos` converted at `size` (and `enhance`) into work/tag_size[_enhance]
    (convert.py skips the images already there, so a rerun converts nothing)."""
    out = work / (f'{tag}_{size}' + ('' if enhance == 'none' else f'_{enhance}'))
    script(['convert.py', '--directory', photos, '--convert_directory', out, '--crop_size', size,
            '--extension', 'png', '--enhance', enhance, '--no_progress'], cwd=work)
    return out


def runs_of(weights, methods, layers):
    """(method, layer) pairs to score for a net: ram only for RAM nets; extra layers it has."""
    runs = [(method, None) for method in methods if method != 'ram' or weights.is_ram]
    runs += [(method, layer) for layer in layers if layer in weights.conv_layers
             and layer != weights.last_conv for method in methods if method != 'ram']
    return runs


def score(work, name, images, weights, method, layer, mask_args, fuse=None, fuse_images=None,
          batch_size=None, device='auto', limit=None):
    """ram.py --scores_only on one net (or a fused pair) and method; the scores dict, or None."""
    out = work / 'scores' / f'{name}.json'
    args = ['ram.py', '--cnf', weights.config, '--weights_from', weights.path, '--method', method,
            '--images', images, *mask_args, '--scores_only', '--scores_json', out, '--device', device,
            '--no_progress', '--output_dir', work / 'maps' / name, '--save_maps']
    if layer:
        args += ['--layer', layer]
    if fuse:
        args += ['--fuse', fuse.config, '--fuse_weights', fuse.path]
    if fuse_images:
        args += ['--fuse_images', fuse_images]
    if batch_size:
        args += ['--batch_size', batch_size]
    if limit:
        args += ['--limit', limit]
    started = time.perf_counter()
    code, _ = script(args, cwd=work, check=False)
    if code != 0 or not out.is_file():
        click.secho(f'skipped: ram.py failed for {name} (exit {code}); see above', fg='yellow')
        return None
    result = json.loads(out.read_text())
    result['seconds'] = time.perf_counter() - started
    return result


def disc_mass(maps_dir, suffix, plain_dir, window_size):
    """How much of the maps' positive mass sits on the optic disc (`scores.optic_disc`, found
    on the plain conversion of each photograph: enhanced ones hide it), averaged over the
    photographs: {'map', 'blind' (the leave-one-out mean map), 'area' (the disc's share of
    the fundus: what a flat map would put there)}; None without saved maps."""
    import numpy as np
    import torch

    from retina.heatmaps import figures, methods, scores
    from retina.heatmaps.ram import load_window
    pairs = [(Path(maps_dir) / f'{image.stem}{suffix}', image)
             for image in sorted(Path(plain_dir).glob('*.png'))]
    pairs = [(saved, image) for saved, image in pairs if saved.is_file()]
    if len(pairs) < 2:
        return None
    maps = torch.stack([torch.from_numpy(np.load(path)) for path, _ in pairs])
    blind = scores.blind_maps(maps)
    shares = {'map': [], 'blind': [], 'area': []}
    for i, (_, image) in enumerate(pairs):
        window = load_window(image, window_size)[0].permute(1, 2, 0).numpy()
        inside = figures.fundus_mask(window)
        disc = scores.optic_disc(window, inside)
        for variant, heat in (('map', maps[i]), ('blind', blind[i])):
            evidence = methods.upsample(heat[None].float(), window_size)[0].numpy()
            shares[variant].append(scores.lesion_mass_share(evidence, disc, inside))
        shares['area'].append(float((disc & inside).sum() / max(inside.sum(), 1)))
    return {k: float(np.nanmean(v)) for k, v in shares.items()}


def rows_of(set_name, net_name, method, result, disc=None):
    """Table rows, one per lesion kind of a result."""
    rows = []
    for kind, values in result['kinds'].items():
        if values['n'] == 0:          # no photo of the set has this kind of lesion in the window
            continue
        table = values['scores']
        lead = values['auroc_minus_blind']
        rows.append(dict(set=set_name, kind=kind, net=net_name, method=method, n=values['n'],
                         grid='x'.join(map(str, result['grid'])), disc=disc,
                         lead=lead, **{s: table[s] for s in SCORES}))
    return rows


def cell(values):
    return ' / '.join('—' if v is None or v != v else f'{v:.2f}' for v in
                      (values['map'], values['blind'], values['oracle']))


def disc_cell(disc):
    return '—' if not disc else f'{disc["map"]:.2f} / {disc["blind"]:.2f} / {disc["area"]:.2f}'


def table(rows):
    lines = ['| set | lesions | net | method | grid | images | AUROC | AUROC − blind [95% CI] | '
             'pointing exact | pointing ±½ cell | mass in lesions | mass on the disc |',
             '| --- | --- | --- | --- | --- | ---: | --- | --- | --- | --- | --- | --- |']
    for r in rows:
        lead = r['lead']
        lead_text = '—' if lead['mean'] != lead['mean'] else \
            f'{lead["mean"]:+.2f} [{lead["low"]:+.2f}, {lead["high"]:+.2f}]'
        lines.append(f'| {r["set"]} | {r["kind"]} | {r["net"]} | {r["method"]} | {r["grid"]} | {r["n"]} | '
                     f'{cell(r["auroc"])} | {lead_text} | {cell(r["pointing_exact"])} | '
                     f'{cell(r["pointing_game"])} | {cell(r["mass_in_lesions"])} | '
                     f'{disc_cell(r.get("disc"))} |')
    return '\n'.join(lines)


def synthetic_set(work, n_patients, seed):
    """A synthetic set generated for this benchmark (reused when one of these settings is there)."""
    out = work / f'synthetic_seed{seed}_n{n_patients}'
    if not (out / 'testLabels.csv').is_file() or not (out / 'masks_by_kind').is_dir():
        script(['retina.synthetic', '--out', out, '--n_patients', n_patients, '--seed', seed,
                '--masks_by_kind'], cwd=work)
    return out


def synthetic_masks(work, synthetic_dir):
    """The masks to score against: every lesion ('lesion', masks/) and, where the set has
    masks_by_kind/, each kind beside it (red, exudate, other_bright), as one folder of
    links that ram.py reads as one subfolder per kind."""
    by_kind = synthetic_dir / 'masks_by_kind'
    if not by_kind.is_dir():
        return synthetic_dir / 'masks'
    folder = work / f'{synthetic_dir.name}_masks'
    folder.mkdir(parents=True, exist_ok=True)
    targets = {'lesion': synthetic_dir / 'masks'}
    targets.update({kind.name: kind for kind in sorted(by_kind.iterdir()) if kind.is_dir()})
    for name, target in targets.items():
        link = folder / name
        if link.is_symlink() and link.resolve() != target.resolve():
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(target.resolve(), target_is_directory=True)
    return folder


def synthetic_part(work, nets, fuses, synthetic_dir, n_patients, seed, methods, layers, options):
    synthetic_dir = Path(synthetic_dir or synthetic_set(work, n_patients, seed)).resolve()
    tag = f'{synthetic_dir.name}_test'
    for needed in ('test', 'masks', 'testLabels.csv'):
        if not (synthetic_dir / needed).exists():
            click.secho(f'skipped: the synthetic part; {synthetic_dir / needed} is missing (make a set '
                        f'with python -m retina.synthetic --out DIR)', fg='yellow')
            return []
    mask_args = ['--masks', synthetic_masks(work, synthetic_dir), '--photos', synthetic_dir / 'test',
                 '--labels', synthetic_dir / 'testLabels.csv']
    rows = net_rows(work, 'synthetic', 'synthetic', tag, synthetic_dir / 'test', nets, methods,
                    layers, mask_args, options)
    rows += fused_rows(work, 'synthetic', tag, synthetic_dir / 'test', fuses, mask_args, options)
    return rows


def net_rows(work, set_name, prefix, tag, photos, nets, methods, layers, mask_args, options):
    """Rows of each net and method on `photos` (converted for the net into work/tag_...),
    with the maps' mass on the disc found on the plain conversion."""
    rows = []
    for weights in nets:
        images = converted(photos, work, tag, weights.size, weights.enhance)
        plain = converted(photos, work, tag, weights.size, 'none')
        for method, layer in runs_of(weights, methods, layers):
            tagged = method + (f'-{layer}' if layer else '')
            name = f'{prefix}_{weights}_{tagged}'
            result = score(work, name, images, weights, method, layer, mask_args, **options)
            if result:
                disc = disc_mass(work / 'maps' / name, f'_{tagged}_{weights}.npy', plain,
                                 (weights.input, weights.input))
                rows += rows_of(set_name, weights.label,
                                method + (f' @{layer}' if layer else ''), result, disc)
    return rows


def fused_rows(work, set_name, tag, photos, fuses, mask_args, options):
    """Rows of the fused pairs: the larger net's images, the smaller net's map fused in, each
    net on its own conversion of the photographs (ram.py --fuse_images), as predict.py --fuse
    runs them."""
    rows = []
    for pair in fuses:
        big, small = sorted(pair, key=lambda w: -w.input)
        images = converted(photos, work, tag, big.size, big.enhance)
        own = converted(photos, work, tag, small.size, small.enhance)
        result = score(work, f'{tag}_{big}+{small}_ram', images, big, 'ram', None, mask_args,
                       fuse=small, fuse_images=own, **options)
        if result:
            rows += rows_of(set_name, f'{big.label} + {small.label}', 'ram, fused', result)
    return rows


def heimed_part(work, nets, fuses, heimed, methods, layers, options):
    heimed = Path(heimed)
    if not (heimed / 'images').is_dir() or not (heimed / 'masks').is_dir():
        click.secho(f'skipped: the real-photo part; {heimed} has no images/ and masks/ (the HEI-MED '
                    f'set, see ../shared/data/README.md)', fg='yellow')
        return []
    mask_args = ['--masks', heimed / 'masks', '--photos', heimed / 'images', '--all_levels']
    rows = net_rows(work, 'HEI-MED', 'heimed', 'heimed', heimed / 'images', nets, methods,
                    layers, mask_args, options)
    rows += fused_rows(work, 'HEI-MED', 'heimed', heimed / 'images', fuses, mask_args, options)
    return rows


@click.command(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--synthetic_weights', multiple=True, type=click.Path(dir_okay=False),
              help='Checkpoint of a net trained on synthetic photos (repeat for several; RAM, fine '
                   'heat-map or baseline nets). Its config and preprocessing are read from the file.')
@click.option('--synthetic_fuse', nargs=2, multiple=True, type=click.Path(dir_okay=False),
              help='Two checkpoints (a 256-px and a 128-px heat-map net) whose RAMs are fused, scored '
                   'on the synthetic set.')
@click.option('--real_weights', multiple=True, type=click.Path(dir_okay=False),
              help='Checkpoint of a net trained on real photos (e.g. eyepacs256), scored on HEI-MED.')
@click.option('--real_fuse', nargs=2, multiple=True, type=click.Path(dir_okay=False),
              help='Two checkpoints of real-photo heat-map nets to fuse, scored on HEI-MED.')
@click.option('--synthetic_dir', type=click.Path(file_okay=False),
              help='A synthetic set (test/, masks/, testLabels.csv) [default: generate one into '
                   'WORK/synthetic with --n_patients and --seed].')
@click.option('--n_patients', default=300, show_default=True, type=click.IntRange(min=4),
              help='Patients of the generated synthetic set (about a quarter are test photos).')
@click.option('--seed', default=2015, show_default=True, type=click.IntRange(min=0),
              help='Seed of the generated set: keep it apart from the training set\'s seed, so the '
                   'scored photos are new to the nets.')
@click.option('--heimed', default=str(HEIMED), show_default=True, type=click.Path(file_okay=False),
              help='The HEI-MED set: images/ and masks/{exudate,other_bright,red}/.')
@click.option('--methods', default='ram,gradcam,layercam', show_default=True,
              help='Comma-separated ram.py methods (ram is skipped for baseline nets).')
@click.option('--layers', multiple=True, metavar='NAME',
              help='Also score gradcam/layercam at this conv layer (repeat; nets without it skip it), '
                   'e.g. conv5 for a finer map of a 6x6 net.')
@click.option('--work', default='data/bench_heatmaps', show_default=True, type=click.Path(file_okay=False),
              help='Work folder (converted photos, scores JSON); reruns reuse the conversions.')
@click.option('--device', default='auto', show_default=True, help='Passed to ram.py.')
@click.option('--batch_size', type=click.IntRange(min=1), help='Passed to ram.py [default: the config\'s].')
@click.option('--limit', type=click.IntRange(min=1),
              help='Only the first N images of each set (quick checks).')
@click.option('--note', default='', help='A sentence for BENCHMARKS.md on where the weights come from '
              '(data, epochs, machine): the benchmark cannot tell.')
@click.option('--write/--no_write', default=True, show_default=True,
              help=f'Write the table to BENCHMARKS.md ("## {SECTION}").')
@click.option('--section', default='', metavar='TEXT',
              help='Words added to the BENCHMARKS.md section title, so that a run on other weights '
                   'keeps its own table instead of replacing the last one.')
def main(synthetic_weights, synthetic_fuse, real_weights, real_fuse, synthetic_dir, n_patients, seed,
         heimed, methods, layers, work, device, batch_size, limit, note, write, section):
    """Score every method's heat maps against lesion masks, beside the blind map and the grid oracle."""
    from retina.core.errors import UserError
    methods = [m.strip() for m in methods.split(',') if m.strip()]
    unknown = set(methods) - {'ram', 'gradcam', 'layercam'}
    if unknown:
        raise click.BadParameter(f'{", ".join(sorted(unknown))}; use ram, gradcam, layercam',
                                 param_hint='--methods')
    if not (synthetic_weights or synthetic_fuse or real_weights or real_fuse):
        raise click.UsageError('give at least one of --synthetic_weights, --synthetic_fuse, --real_weights, '
                               '--real_fuse (checkpoints written by train_nn.py)')
    started = time.perf_counter()
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    options = dict(batch_size=batch_size, device=device, limit=limit)
    try:
        synthetic_nets = checkpoints(synthetic_weights, 'synthetic')
        real_nets = checkpoints(real_weights, 'real')
        synthetic_pairs = [tuple(checkpoints(pair, 'synthetic fuse')) for pair in synthetic_fuse]
        real_pairs = [tuple(checkpoints(pair, 'real fuse')) for pair in real_fuse]
    except UserError as error:
        raise click.ClickException(str(error)) from None
    rows = []
    if synthetic_nets or any(len(p) == 2 for p in synthetic_pairs):
        rows += synthetic_part(work, synthetic_nets, [p for p in synthetic_pairs if len(p) == 2],
                               synthetic_dir, n_patients, seed, methods, layers, options)
    if real_nets or any(len(p) == 2 for p in real_pairs):
        rows += heimed_part(work, real_nets, [p for p in real_pairs if len(p) == 2], heimed, methods,
                            layers, options)
    if not rows:
        raise click.ClickException('nothing was scored (see the notes above)')
    import torch
    from retina.core.runtime import resolve_device
    body = '\n'.join([
        f'{today()}, {device_name(torch.device(resolve_device(device)))}, '
        f'{time.perf_counter() - started:.0f} s. `python bench/bench_heatmaps.py '
        + ' '.join(sys.argv[1:]) + '`' + (f'  Weights: {note}' if note else ''),
        '',
        'Per image, inside the fundus, averaged over the images with a lesion of the kind in the network\'s '
        'window (synthetic: test photos labelled level >= 1, seed ' + str(seed) + '; HEI-MED: every photo '
        'with a mask of the kind, masks cropped like their photos). Each cell is **map / image-blind / '
        'grid oracle**: the blind map of image i is the mean map of the other images (it never sees the '
        'photo), the oracle is the lesion mask pooled to the map\'s grid and upsampled the same way. '
        'AUROC: the map as a lesion-pixel detector (0.5 = chance). Pointing: the map\'s maximum on a '
        'lesion pixel (exact) or within half a map cell of one. Mass: share of the map\'s positive part '
        'in lesions. The interval is a bootstrap over patients (an image whose name has no eye is its own '
        'patient) of the per-image AUROC minus the blind map\'s.',
        '',
        table(rows)])
    click.echo('\n' + table(rows))
    if write:
        title = f'{SECTION} ({section})' if section else SECTION
        replace_section(title, body)
        click.echo(f'\nwrote "## {title}" in BENCHMARKS.md')


if __name__ == '__main__':
    main()
