#!/usr/bin/env python
"""Heat maps of a net: where its predicted level comes from, drawn and scored against lesion masks.

    python ram.py --cnf c_128_5x5_32_ram        # data/test_tiny -> data/ram/c_128_5x5_32_ram/
    python ram.py --cnf c_128_5x5_32_ram --images data/test_tiny/10_left.jpeg --signed
    python ram.py --cnf c_128_5x5_32 --method gradcam --layer conv8     # a baseline net
    python ram.py --cnf c_256_5x5_32_ram_fine --fuse c_128_5x5_32_ram_fine --images data/test_small
    python ram.py --cnf c_128_5x5_32_ram --images data/synthetic_tiny/test \\
        --masks data/synthetic/masks --photos data/synthetic/test --labels data/synthetic/testLabels.csv

The work is done by retina.heatmaps.ram (the run), retina.heatmaps.methods (the maps),
.scores (what they are worth) and .figures (the drawing).
"""
import difflib
import json
import sys

import click

from retina.core import paths
from retina.core.errors import UserError, handle_errors
from retina.core.options import (CONTEXT_SETTINGS, TRAINED_AS, batch_size_option, cnf_option,
                                 device_option, fuse_option, fuse_weights_option, images_option,
                                 labels_option, layer_option, no_progress_option,
                                 output_folder_option, save_maps_option, weights_option)
from retina.heatmaps import METHOD_HELP, METHOD_NAMES
from retina.model import checkpoint
from retina.model import config as config_module



def _check_cmap(_context, _parameter, value):
    if value is None:
        return value
    from matplotlib import colormaps
    if value not in colormaps:
        close = difflib.get_close_matches(value, list(colormaps), n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else ' (e.g. jet, inferno, RdBu_r)'
        raise click.BadParameter(f'{value!r} is not a matplotlib colour map{hint}')
    return value


@click.command(context_settings=CONTEXT_SETTINGS)
@cnf_option('The net to explain; --method ram needs a RAM config (global-average-pool head).',
            default_text=TRAINED_AS)
@weights_option('The weights to explain.')
@click.option('--method', type=click.Choice(METHOD_NAMES), default='ram', show_default=True,
              help=METHOD_HELP)
@layer_option()
@click.option('--include_bias', is_flag=True,
              help='With --method ram, add the output bias to every position, so the map\'s mean is '
                   'the prediction (the bias only shifts the colours; off as in the RAM repository).')
@fuse_option('Its config, e.g. --cnf c_256_5x5_32_ram_fine --fuse c_128_5x5_32_ram_fine.  Pass '
             'images converted for the larger net, or its own in --fuse_images.')
@fuse_weights_option()
@click.option('--fuse_images', type=click.Path(file_okay=False),
              help='The same photographs converted for the --fuse net (its own --crop_size and '
                   '--enhance, same names): it then sees its own images, as predict.py --fuse '
                   'runs it [default: the --images windows shrunk to its input].')
@click.option('--per_image_scale', is_flag=True,
              help='Scale each image\'s colours to its own peak [default: one colour scale for '
                   'every image, in score units: 0 to 4, where 4 everywhere would make a level-4 '
                   'score, so a weak map looks weak; see retina/heatmaps/figures.py].')
@images_option("Converted images (convert.py's output).", default_text="the config's test_dir")
@output_folder_option('--output_dir', 'output_dir',
                      'where {image}_{METHOD}_{CNF}.png and {METHOD}_{CNF}_by_level.png go '
                      f'[default: {paths.RAM_DIR}/CNF, or CNF+FUSE].')
@click.option('--signed', is_flag=True,
              help='Show negative evidence too, on a diverging scale centred at 0 (files end in '
                   '_signed); without it only the positive part is coloured.')
@click.option('--cmap', callback=_check_cmap,
              help='matplotlib colour map [default: jet, or RdBu_r with --signed].')
@click.option('--alpha', default=0.6, show_default=True, type=click.FloatRange(0, 1),
              help='Opacity of the map where it reaches the top of the colour scale (less '
                   'evidence, more of the eye shows through).')
@click.option('--masks', type=click.Path(file_okay=False),
              help='Folder of lesion masks {image}.png (white = lesion), or of one subfolder of them '
                   'per lesion kind (scored separately): prints the per-image AUROC, pointing game '
                   '(exact and within half a map cell) and mass in lesions, each beside the image-blind '
                   'map (mean map of the other images) and the grid oracle (the mask pooled to the '
                   'map\'s grid), and the deletion check. Masks at the converted size are used as '
                   'they are; masks at the photographs\' resolution need --photos. Do not convert '
                   'masks with convert.py: it cannot find the eye in a mask.')
@click.option('--photos', type=click.Path(file_okay=False),
              help='The original photographs the images were converted from, so that full-size '
                   'masks are cropped to the eye exactly like their photographs.')
@labels_option('shown on the maps, the by-level figure picks its examples by label, and with '
               '--masks the scored images are those labelled level >= 1 instead of those '
               'predicted level >= 1.')
@click.option('--all_levels', is_flag=True,
              help='With --masks, score every image with a lesion in its mask, whatever its level '
                   '(for masks of photos without grades, e.g. HEI-MED).')
@click.option('--scores_json', type=click.Path(dir_okay=False),
              help='With --masks, also write the scores to this JSON file (for benchmarks).')
@click.option('--deletion_fill', type=click.Choice(['black', 'mean']), default='mean', show_default=True,
              help='With --masks, what the deletion check blanks pixels to: the data set\'s mean '
                   'colour, or black (raw 0, like the surround of the eye; black blobs inside the '
                   'eye look like haemorrhages and can raise the prediction).')
@click.option('--scores_only', is_flag=True,
              help='With --masks, only score: draw no figures (for benchmarks over many images).')
@save_maps_option('With --scores_only too, into --output_dir.')
@click.option('--limit', type=click.IntRange(min=1), help='Only the first N images.')
@device_option()
@batch_size_option(default_text="the config's batch_size_test")
@no_progress_option()
@handle_errors()
def main(cnf, weights_from, method, layer, include_bias, fuse_cnf, fuse_weights, fuse_images,
         per_image_scale,
         images, output_dir, signed, cmap, alpha, masks, photos, labels, all_levels, scores_json,
         deletion_fill, scores_only, save_maps, limit, device, batch_size, no_progress):
    """Draw a heat map of every image over the window the network sees, inside the fundus.

    Writes one picture per image (the window enlarged to 1024 px, the map on one colour
    scale in score units with its colour bar, the score, level and net written above), as
    predict.py draws them, and one figure with an example of each level.  Exits with status
    1 if any image could not be read (each is named on stderr; the others are still drawn).
    """
    if (fuse_weights or fuse_images) and not fuse_cnf:
        option = '--fuse_weights' if fuse_weights else '--fuse_images'
        raise UserError(f'{option} needs --fuse CONFIG (the net to fuse)')
    if include_bias and method != 'ram':
        raise UserError(f'--include_bias is for --method ram; {method} maps have no output bias to add')
    if (scores_json or scores_only) and not masks:
        option = '--scores_json' if scores_json else '--scores_only'
        raise UserError(f'{option} needs --masks (there is nothing to score without lesion masks)')
    from retina.core import atomic
    from retina.core.runtime import resolve_device
    from retina.data.crop import encoding_warning
    from retina.data.images import collect_images
    from retina.heatmaps import ram
    ram.methods.check_layer(method, layer)
    config = config_module.load(checkpoint.config_name(cnf, weights_from))
    device = resolve_device(device)
    loaded = ram.net_for_method(config, weights_from, device, method)
    if loaded.trained_as and loaded.trained_as != config.name:
        click.echo(f'note: {loaded.weights} was trained with {loaded.trained_as}, not {config.name}')
    ram.methods.check_layer(method, layer, loaded.net, config.name)
    cuts = checkpoint.describe_cuts(checkpoint.level_cuts([loaded]))
    click.echo(f'levels: the score cut at {cuts}, as predict.py cuts this net')
    fuse_with = None
    if fuse_cnf:
        fuse_config = config_module.load(fuse_cnf)
        fuse_with = ram.net_for_method(fuse_config, fuse_weights, device, method)
    image_paths = collect_images(images or [config.cnf['test_dir']],
                                 what='converted images')[:limit]
    fuse_paths = collect_images([fuse_images], what='converted images') if fuse_images else None
    if fuse_images:
        ram.check_preprocessing(fuse_paths, [fuse_with])
    ram.check_preprocessing(image_paths, [loaded] + ([fuse_with] if fuse_with and not fuse_images
                                                     else []))
    for net, net_paths in ((loaded, image_paths), (fuse_with, fuse_paths or image_paths)):
        warning = net and net.encoding_known and encoding_warning(net_paths, net.spec.encoding,
                                                                  net.weights)
        if warning:
            click.echo(warning, err=True)
    title = config.name + (f'+{fuse_config.name}' if fuse_cnf else '')
    output_dir = output_dir or paths.ram_dir(title)
    if not scores_only or save_maps:
        ram.check_output_dir(output_dir, image_paths, masks, photos)
    summary = ram.make_maps(
        loaded, image_paths, output_dir, method=method, layer=layer, include_bias=include_bias,
        fuse_with=fuse_with, per_image_scale=per_image_scale, signed=signed, cmap=cmap,
        alpha=alpha, masks=masks, photos=photos, labels=labels, all_levels=all_levels,
        batch_size=batch_size, deletion_fill=deletion_fill, draw=not scores_only,
        progress=not no_progress, save_maps=save_maps, fuse_images=fuse_images)
    if summary.by_level is not None:
        click.echo(f'wrote {len(summary.written)} heat map(s) to {output_dir}/ and {summary.by_level}')
    if summary.scores is not None:
        for line in summary.scores.lines():
            click.echo(line)
        if scores_json:
            atomic.write_text(scores_json, json.dumps(summary.scores.as_dict(), indent=1))
    if summary.failed:
        click.echo(f'error: {len(summary.failed)} file(s) could not be read (named above); '
                   f'replace or remove them and run again', err=True)
        sys.exit(1)


if __name__ == '__main__':
    main()
