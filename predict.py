#!/usr/bin/env python
"""Grade raw photographs in one command: crop to the eye in memory, score, blend, draw.

    python predict.py data/new_photos/  # c_512_5x5_32_ram if trained here, else the released model
    python predict.py photo.jpeg --cnf c_512_5x5_32 --cnf c_512_4x4_32 --n_iter 10
    python predict.py data/new_photos --blend data/sub_abc1234_20261126-1015_blend.pt --per_patient
    python predict.py photo.jpeg --heatmap data/predict_maps --output grades.csv

The work is done by retina.grade.predict; see its docstring for how each photograph
is prepared (exactly as convert.py, then as the net's training images were).
"""
import sys

import click

from retina.core.errors import UserError, handle_errors
from retina.core.options import (CONTEXT_SETTINGS, batch_size_option, cnf_option, crop_size_option,
                                 device_option, fuse_option, fuse_weights_option,
                                 images_option, layer_option, no_progress_option,
                                 output_file_option, per_patient_option, save_maps_option,
                                 tta_iterations_option, weights_option)
from retina.heatmaps import METHOD_HELP, METHOD_NAMES
from retina.model import released

DEFAULT_CNF = 'c_512_5x5_32_ram'


@click.command(context_settings=CONTEXT_SETTINGS)
@images_option('Photographs (.jpeg, .jpg, .png, .tif, .tiff), or folders of them.',
               positional=True)
@cnf_option('A trained net; repeat for several nets, each gets a score column and the nets are '
            'averaged.', multiple=True,
            default_text='the config each --weights_from was trained as, else the nets of --blend, '
                         f'else {DEFAULT_CNF} if weights/{DEFAULT_CNF}/weights.pt exists, else the '
                         'released model (models/index.json: said on stderr)')
@weights_option('Those of each --cnf, in the same order (repeat as often as --cnf, or leave out); '
                "a released model's name (its checksum checked) needs no --cnf.", multiple=True)
@tta_iterations_option('Per net: its score is its output averaged over them.')
@click.option('--blend', 'blend_file', type=click.Path(dir_okay=False),
              help='A blend saved by blend.py --predict (data/sub_..._blend.pt), or a released '
                   'chain\'s name (models/index.json: its nets are the released ones, per patient '
                   'if it was fitted so): adds its score (column blend) and its level replaces '
                   'the mean\'s. Its features are computed with the TTA iterations it was fitted '
                   'on; its nets are used when no --cnf is given.')
@per_patient_option('Apply one fitted by blend.py --per_patient (needs --blend): the eyes of a '
                    'patient among the photographs are blended together.')
@click.option('--fast', is_flag=True,
              help='When the released default is a chain (nets, their TTA and a per-patient '
                   'blend): grade with its fast net alone, on the centred window (one pass '
                   'per photograph instead of one plus the TTA views of every net; a weaker '
                   'grader: BENCHMARKS.md says by how much).  Without a chain default it changes nothing.')
@click.option('--heatmap', 'heatmap_dir', type=click.Path(file_okay=False),
              help='Write the heat map of each net over each uncropped photograph to this '
                   'folder ({image}_{method}_{cnf}.png; the outline is the net\'s window), made, '
                   'upsampled and coloured as ram.py does it; its caption gives the level the '
                   'photograph is given (a blend\'s, with a blend).  A released chain without '
                   '--method, --layer or --fuse draws one map a photograph: its fast net\'s '
                   'measured best.')
@click.option('--method', type=click.Choice(METHOD_NAMES),
              help='The heat map of --heatmap.  ' + METHOD_HELP + '  [default: ram; for a '
                   'released model without --layer or --fuse, the map measured best for it '
                   '(retina/heatmaps/__init__.py RELEASED_DEFAULT_MAPS, bench/heatmap_default.md)]')
@layer_option()
@fuse_option('Its config, with --heatmap; each net sees its own conversion of the photograph.',
             default_text='the config --fuse_weights was trained as')
@fuse_weights_option()
@save_maps_option('With --heatmap, as {image}_{method}_{cnf}.npy.')
@click.option('--report', type=click.Path(dir_okay=False),
              help='Also write an HTML report of the photographs (e.g. report.html; retina/'
                   'report.py): the model, its sha256 and card figures, a sortable table, each '
                   'photograph beside its heat map with both eyes of a patient together, the '
                   'ungradable ones set apart.  It opens offline; its pictures go in the folder '
                   'REPORT_files beside it (the heat maps too, unless --heatmap is given).')
@output_file_option('the results (- is standard output).', default='-', show_default=True,
                    type=click.Path(dir_okay=False, allow_dash=True))
@click.option('--json', 'as_json', is_flag=True,
              help='Write JSON (the nets, one record per photograph, the failures) instead of CSV '
                   '(image, score per net, mean, [blend,] level).')
@crop_size_option('those the nets were trained on, from the window to the default '
                  "[default: the net's input / 0.875: 512 for 448-px nets, 256 for 224, 128 for "
                  '112].')
@batch_size_option('Photographs are decoded and scored together.', default=8)
@click.option('--grade_anyway', is_flag=True,
              help='Give a level to ungradable photographs too.  Without it every photograph '
                   'is checked (retina/data/gradability.py: the eye found, exposure, contrast, '
                   'focus, size, and for nets that carry them the features of their training '
                   'photographs); an ungradable one keeps its scores, gets no level, and is '
                   'named on stderr.  The columns gradable (yes/no) and reasons say why.')
@click.option('--check_stability', is_flag=True,
              help='Also re-save each photograph as a JPEG of quality 75 (what a viewer or mail '
                   'client does) and grade it again: a level that moves by more than one is not '
                   "given (reason 'unstable under re-encoding').  Off by default: the released "
                   "nets are that fragile for 13-16% of good raw photographs (BENCHMARKS.md, "
                   '"Gradability: wrong grades caught"); about twice the time per photograph.')
@device_option()
@no_progress_option()
@handle_errors()
def main(images, cnf, weights_from, n_iter, blend_file, per_patient, fast, heatmap_dir, method, layer,
         fuse_cnf, fuse_weights, save_maps, report, output, as_json, crop_size, batch_size, grade_anyway,
         check_stability, device, no_progress):
    """Grade IMAGES (photographs, or folders of them: .jpeg, .jpg, .png, .tif, .tiff) on the
    0-4 scale.

    Each photograph is cropped to the eye exactly as convert.py would crop it
    (EXIF orientation applied), preprocessed as the net's training images were,
    and scored by every net.  Output columns: image, score_CNF per net, mean,
    level (the mean cut at 0.5, 1.5, 2.5, 3.5, or a lone released net's own
    cut-offs for its centred window; the blend's level with --blend; empty for an
    ungradable photograph, null in JSON), gradable (yes/no), reasons, model and
    model_sha256 (the released names or weights files that graded, and their sha256).
    Photographs converted with the net's look already (convert.py --enhance: their
    folder's conversion.json says so, or their statistics do) are not given it twice.
    Files of other image formats in a folder (.bmp, .webp, ...) are named on stderr.
    A photograph that cannot be read is named on stderr and the others are
    graded; the exit status is then 1.
    """
    from retina.core import atomic
    from retina.core.runtime import resolve_device
    from retina.data.images import collect_images
    from retina.grade.grader import LoadedBlend, load_grader
    from retina.grade.predict import check_outputs, format_csv, format_json, grade, ungradable_note

    if layer and not heatmap_dir:
        raise UserError('--layer chooses the layer of the --heatmap maps: add --heatmap DIR')
    if report:
        from retina.grade.report import check_report_path, files_folder
        check_report_path(report)
        heatmap_dir = heatmap_dir or str(files_folder(report))
    if (fuse_cnf or fuse_weights) and not heatmap_dir:
        raise UserError('--fuse fuses a second net\'s map into the --heatmap maps: add --heatmap '
                        'DIR')
    if weights_from and cnf and len(weights_from) != len(cnf):
        raise UserError(f'{len(weights_from)} --weights_from for {len(cnf)} --cnf; give one '
                        f'--weights_from per --cnf, in the same order, or none')
    if fast and (cnf or weights_from or blend_file):
        raise UserError('--fast grades with the released default chain\'s fast net; it does '
                        'not go with --cnf, --weights_from or --blend (name the net instead)')
    # a wrong path fails now, before the nets are loaded
    photos = collect_images(images, keep_odd_names=True, what='photographs')
    chain_nets = chain_name = None  # the released nets of a released chain, and its name
    if blend_file is None and not (cnf or weights_from):
        blend_file, chain_nets, chain_name = default_grader(fast)
    elif blend_file is not None and released.is_chain(blend_file):
        chain_name = blend_file
        blend_file, chain_nets = released.chain(blend_file)
    if per_patient and not blend_file:
        raise UserError('--per_patient applies a fitted per-patient blend: pass --blend '
                        'data/sub_..._blend.pt (written by blend.py --per_patient --predict)')
    check_outputs(images, photos, output, heatmap_dir, weights_from, blend_file)
    if output != '-':
        atomic.check_writable(output)
    blend = LoadedBlend(blend_file) if blend_file else None
    if chain_nets is not None and blend is not None:
        per_patient = blend.per_patient  # a released chain is applied as it was fitted
    if blend is not None and blend.per_patient != per_patient:
        raise UserError(f'{blend_file}: fitted {"with" if blend.per_patient else "without"} '
                        f'--per_patient; {"add" if blend.per_patient else "drop"} --per_patient')
    device = resolve_device(device)
    if cnf:
        nets = list(zip(cnf, weights_from or [None] * len(cnf)))
    elif weights_from:  # each checkpoint names its own config (a released model's too)
        nets = [(trained_config(w), w) for w in weights_from]
    elif chain_nets is not None:
        nets = [(c, str(w)) for c, w in chain_nets]
    elif blend is not None:
        nets = blend.nets()
    else:
        nets = [default_net()]
    graders = [load_grader(c, w, device, crop_size) for c, w in nets]
    map_graders = None  # every net draws its map
    if heatmap_dir and method is None and not layer and not (fuse_cnf or fuse_weights):
        method, layer, fuse_weights, map_graders = default_heatmap(
            graders, chain_name if chain_nets is not None and not cnf else None)
    method = method or 'ram'
    fuse = None
    if fuse_cnf or fuse_weights:
        fuse = load_grader(fuse_cnf or trained_config(fuse_weights), fuse_weights, device)
    result = grade(graders, images, n_iter=n_iter, blend=blend, heatmap_dir=heatmap_dir,
                   batch_size=batch_size, progress=not no_progress, grade_anyway=grade_anyway,
                   heatmap_method=method, heatmap_layer=layer, save_maps=save_maps,
                   heatmap_fuse=fuse, check_stability=check_stability,
                   heatmap_graders=map_graders)
    text = format_json(result, graders) if as_json else format_csv(result)
    if output == '-':
        click.echo(text, nl=False)
    else:
        atomic.write_text(output, text)
        click.echo(f'wrote {output} ({len(result.rows)} photographs)', err=True)
    if result.heat_maps:
        click.echo(f'wrote {len(result.heat_maps)} heat maps to {heatmap_dir}', err=True)
    if report:
        from retina.grade.report import write_report
        write_report(report, result, photos, [g.weights for g in graders] +
                     ([blend.path] if blend else []) + ([fuse.weights] if fuse else []), command=' '.join(['predict.py', *sys.argv[1:]]))
        click.echo(f'wrote {report} (its pictures in {files_folder(report)})', err=True)
    note = ungradable_note(result, grade_anyway)
    if note:
        click.echo(note, err=True)
    if result.failed:
        total = len(result.failed) + len(result.rows)
        click.echo(f'error: {len(result.failed)} of {total} photographs could not be graded '
                   f'(listed above); replace or remove them', err=True)
        sys.exit(1)


def default_heatmap(graders, chain=None):
    """(method, layer, fuse weights, the graders that draw or None for all) of the map to draw
    when none is asked for: a lone released model's measured best (RELEASED_DEFAULT_MAPS, said
    on stderr), else its RAM.  A released `chain` draws one map a photograph, its fast net's
    (its measured best, or its RAM): the chain's other nets are weaker mappers
    (bench/heatmap_default.md)."""
    from retina.heatmaps import RELEASED_DEFAULT_MAPS, released_default_map, released_name
    drawn = None
    if chain is not None:
        fast = released.index()['models'][chain]['fast']
        drawn = [g for g in graders if released_name(g.weights) == fast]
        chosen = RELEASED_DEFAULT_MAPS.get(fast, dict(method='ram', layer=None, fuse=None))
        found = (f'{chain} (its fast net {fast})', chosen) if drawn else None
    else:
        found = released_default_map(graders[0].weights) if len(graders) == 1 else None
    if found is None:
        return 'ram', None, None, None
    name, chosen = found
    what = chosen['method'] + (f' at {chosen["layer"]}' if chosen['layer'] else '') + (
        f' fused with {chosen["fuse"]}' if chosen['fuse'] else '')
    click.echo(f'note: heat maps of {name}: {what}, its best measured map (bench/'
               f'heatmap_default.md); --method ram draws '
               + ('each net\'s RAM' if chain else 'its RAM alone'), err=True)
    return chosen['method'], chosen['layer'], chosen['fuse'], drawn


def trained_config(weights):
    """The config name a checkpoint (a file or a released model's name) was trained as."""
    from retina.model import checkpoint
    return checkpoint.trained_config(weights)


def default_net():
    """(config, weights) to grade with when none are named: DEFAULT_CNF's trained weights if
    this folder has them, else the released default model's (its fast net for a chain; said
    once on stderr)."""
    from retina.core import paths
    from retina.model import released
    if paths.best_kappa_weights(DEFAULT_CNF).is_file():
        return DEFAULT_CNF, None
    shipped = released.default()
    if shipped is None:
        return DEFAULT_CNF, None  # its 'weights file not found' error says what to do
    name, config_name, path = shipped
    entry = released.index()['models'][name]
    card = released.default_folder() / entry['card']
    click.echo(f'note: no trained weights in {paths.best_kappa_weights(DEFAULT_CNF).parent}; '
               f'grading with the released model {name}'
               + (f"'s fast net {entry['fast']}" if 'fast' in entry else '')
               + f' ({config_name}; see {card})', err=True)
    return config_name, str(path)


def default_grader(fast):
    """(blend file, [(config, weights)] of its nets, its name) of the released default when it
    is a chain and neither --fast nor this folder's trained DEFAULT_CNF weights say otherwise;
    else (None, None, None): grade with `default_net`."""
    from retina.core import paths
    from retina.model import released
    if fast or paths.best_kappa_weights(DEFAULT_CNF).is_file():
        return None, None, None
    if not (released.default_folder() / released.INDEX_NAME).is_file():
        return None, None, None  # default_net says the folder is missing
    found = released.index()
    name = found['default']
    entry = found['models'].get(name) if name else None
    if not entry or 'nets' not in entry:
        return None, None, None
    blend_file, nets = released.chain(name)
    click.echo(f'note: no trained weights in {paths.best_kappa_weights(DEFAULT_CNF).parent}; '
               f'grading with the released chain {name} ({" + ".join(entry["nets"])}, blended; '
               f'see {released.default_folder() / entry["card"]}); --fast grades with '
               f'{entry["fast"]} alone', err=True)
    return blend_file, nets, name


if __name__ == '__main__':
    main()
