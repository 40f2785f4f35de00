#!/usr/bin/env python
"""Regression activation maps of a RAM net: where its predicted level comes from.

    python ram.py --cnf c_128_5x5_32_ram        # data/test_tiny -> data/ram/c_128_5x5_32_ram/
    python ram.py --cnf c_128_5x5_32_ram --images data/test_tiny/10_left.jpeg --signed
    python ram.py --cnf c_128_5x5_32_ram --images data/synthetic_tiny/test \\
        --masks data/synthetic/masks --photos data/synthetic/test --labels data/synthetic/testLabels.csv

The work is done by retina.ram; see its docstring for the map, the geometry
and the scores.
"""
import difflib
import sys

import click

from retina import config as config_module, paths
from retina.errors import handle_errors


def _check_cmap(_context, _parameter, value):
    if value is None:
        return value
    from matplotlib import colormaps
    if value not in colormaps:
        close = difflib.get_close_matches(value, list(colormaps), n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else ' (e.g. jet, inferno, RdBu_r)'
        raise click.BadParameter(f'{value!r} is not a matplotlib colour map{hint}')
    return value


@click.command(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--cnf', required=True, metavar='CONFIG',
              help='A RAM config (global-average-pool head), e.g. c_128_5x5_32_ram or '
                   'configs/c_512_5x5_32_ram.py.')
@click.option('--weights_from', type=click.Path(dir_okay=False),
              help='Weights to explain [default: weights/CNF/weights.pt, the best validation kappa].')
@click.option('--images', multiple=True, type=click.Path(),
              help='Converted images: a folder or single files; repeat the option for several '
                   "[default: the config's test_dir].")
@click.option('--output_dir', type=click.Path(file_okay=False),
              help='Where {image}_{CNF}.png and {CNF}_by_level.png go '
                   f'[default: {paths.RAM_DIR}/CNF].')
@click.option('--signed', is_flag=True,
              help='Show negative evidence too, on a diverging scale centred at 0 (files end in '
                   '_signed); without it only the positive part is coloured.')
@click.option('--cmap', callback=_check_cmap,
              help='matplotlib colour map [default: jet, or RdBu_r with --signed].')
@click.option('--alpha', default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help='Opacity of the map over the image.')
@click.option('--masks', type=click.Path(file_okay=False),
              help='Folder of lesion masks {image}.png (white = lesion): prints ram_mass_in_lesions, '
                   'pointing_game and the deletion check. Masks at the converted size are used as '
                   'they are; masks at the photographs\' resolution need --photos. Do not convert '
                   'masks with convert.py: it cannot find the eye in a mask.')
@click.option('--photos', type=click.Path(file_okay=False),
              help='The original photographs the images were converted from, so that full-size '
                   'masks are cropped to the eye exactly like their photographs.')
@click.option('--labels', type=click.Path(dir_okay=False),
              help='Labels CSV (image,level): shown on the maps, and with --masks the scored images '
                   'are those labelled level >= 1 instead of those predicted level >= 1.')
@click.option('--deletion_fill', type=click.Choice(['black', 'mean']), default='mean', show_default=True,
              help='With --masks, what the deletion check blanks pixels to: the data set\'s mean '
                   'colour, or black (raw 0, like the surround of the eye; black blobs inside the '
                   'eye look like haemorrhages and can raise the prediction).')
@click.option('--limit', type=click.IntRange(min=1), help='Only the first N images.')
@click.option('--device', default='auto', show_default=True,
              help='auto (CUDA if present), cpu, cuda or cuda:N.')
@click.option('--batch_size', type=click.IntRange(min=1),
              help="Images per forward pass [default: the config's batch_size_test].")
@click.option('--no_progress', is_flag=True, help='No progress bar (for logs).')
@handle_errors()
def main(cnf, weights_from, images, output_dir, signed, cmap, alpha, masks, photos, labels,
         deletion_fill, limit, device, batch_size, no_progress):
    """Draw the regression activation map of every image over the window the network sees.

    Writes one heat map per image, with the predicted level (continuous and
    rounded) and the map's mean, and one figure with an example of each
    predicted level.  Exits with status 1 if any image could not be read
    (each is named on stderr; the others are still drawn).
    """
    from retina import ram
    from retina.train import resolve_device
    config = config_module.load(cnf)
    net, weights, trained_with = ram.load_ram_net(config, weights_from, resolve_device(device))
    if trained_with and trained_with != config.name:
        click.echo(f'note: {weights} was trained with {trained_with}, not {config.name}')
    image_paths = ram.collect_images(images or [config.cnf['test_dir']])[:limit]
    output_dir = output_dir or paths.ram_dir(config.name)
    summary = ram.run(config, net, image_paths, output_dir, signed=signed, cmap=cmap, alpha=alpha,
                      masks=masks, photos=photos, labels=labels, batch_size=batch_size,
                      deletion_fill=deletion_fill, progress=not no_progress)
    click.echo(f'wrote {len(summary.written)} heat map(s) to {output_dir}/ and {summary.by_level}')
    if summary.scores is not None:
        for line in summary.scores.lines():
            click.echo(line)
    if summary.failed:
        click.echo(f'error: {len(summary.failed)} file(s) could not be read (named above); '
                   f'replace or remove them and run again', err=True)
        sys.exit(1)


if __name__ == '__main__':
    main()
