#!/usr/bin/env python
"""Extract test-time-augmented features of a trained net for blend.py."""
import click

from retina.core import paths
from retina.core.errors import handle_errors
from retina.core.precision import PRECISIONS
from retina.features.files import MAX_TTA_ITERATIONS
from retina.model import config as config_module
from retina.model import released
from retina.model.augment import TTA_SEQUENCES, TTA_SEQUENCE_HELP


@click.command(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--cnf', metavar='CONFIG',
              help='Config module of the trained net (path or name, e.g. c_512_5x5_32). '
                   '[default: the config --weights_from was trained as, e.g. of a released '
                   'model]')
@click.option('--n_iter', default=1, show_default=True, type=click.IntRange(1, MAX_TTA_ITERATIONS),
              help='Test-time augmentation iterations (1: no augmentation; the original used '
                   '50, at most 10000). Running mean and std are saved every 5 iterations.')
@click.option('--skip', default=0, show_default=True, type=click.IntRange(min=0),
              help='Start at this point of the Halton sequence (to draw other augmentations).')
@click.option('--test', is_flag=True, help='Extract features of the test images.')
@click.option('--train', is_flag=True, help='Extract features of the training images.')
@click.option('--weights_from', type=click.Path(dir_okay=False),
              help='Weights file, or a released model\'s name (models/index.json, e.g. eyepacs-128) '
                   '[default: weights/CNF/weights.pt, the best validation kappa].')
@click.option('--test_dir', type=click.Path(file_okay=False),
              help="Folder of test images [default: the config's test_dir]. Given without "
                   "--train, --test or --train_dir, only the test features are extracted (as the "
                   "original did).")
@click.option('--train_dir', type=click.Path(file_okay=False),
              help="Folder of training images [default: the config's train_dir]. Given without "
                   "--train, --test or --test_dir, only the training features are extracted.")
@click.option('--device', default='auto', show_default=True, help='auto, cpu, cuda or cuda:N.')
@click.option('--batch_size', type=click.IntRange(min=1),
              help="Images per batch [default: the config's batch_size_test, at least 512 on a "
                   'GPU]; halved (with a note) while it does not fit in memory.')
@click.option('--compile/--no_compile', 'compile_model', default=None,
              help='torch.compile the network [default: on a GPU yes, on the CPU no]; a compiler '
                   'that fails falls back to eager with a warning.')
@click.option('--precision', type=click.Choice(PRECISIONS), default='auto', show_default=True,
              help='auto: bf16 autocast on a GPU, fp32 on the CPU; bf16: bf16 autocast (on a '
                   'CPU with native bf16 about 2.5x the images per second at 128 px, but the '
                   "features then depend on the batch: predict.py's, computed a few photographs "
                   "at a time, differ by up to 0.02 on a blend's score); fp32: none.  Saved "
                   'iterations of the other precision are not continued: the extraction starts '
                   'again.')
@click.option('--tta_sequence', type=click.Choice(TTA_SEQUENCES), default='scrambled',
              show_default=True, help=TTA_SEQUENCE_HELP + '  Saved iterations of the other '
                                                          'sequence are not continued.')
@click.option('--restart', is_flag=True,
              help='Ignore the saved iterations of an interrupted run and start from the first.')
@click.option('--no_progress', is_flag=True, help='No progress bars.')
@handle_errors(resume_hint='Run the same command again: it continues from the last saved '
                           'iteration (every 5).')
def main(cnf, n_iter, skip, test, train, weights_from, test_dir, train_dir, device, batch_size,
         compile_model, precision, tta_sequence, restart, no_progress):
    """Write data/features/CNF_{train,test}_{mean,std}_iter_N_skip_K.npy.

    Features come from the RMS-pool layer (baseline nets) or the global-
    average-pool layer (RAM nets).  With neither --train nor --test: the split
    whose folder is given (--test_dir or --train_dir alone), else both.
    """
    from retina.core.runtime import resolve_device
    from retina.features.extract import extract_features
    from retina.model.checkpoint import config_name, load_net

    config = config_module.load(config_name(cnf, weights_from))
    device = resolve_device(device)
    loaded = load_net(config, weights_from, device)
    splits = splits_to_extract(train, test, train_dir, test_dir)
    folders = dict(train=train_dir or config.cnf['train_dir'],
                   test=test_dir or config.cnf['test_dir'])
    for split in splits:
        result = extract_features(config, loaded, folders[split], split, n_iter, skip, device,
                                  batch_size, not no_progress, click.echo, restart,
                                  weights=str(loaded.weights), compile_model=compile_model,
                                  precision=precision, sequence=tta_sequence)
        click.echo(f'{split}: {result["rows"]} images × {result["features"]} features -> '
                   f'{result["mean"]}, {result["std"]}')


def splits_to_extract(train, test, train_dir, test_dir):
    """--train/--test choose; without them a lone --test_dir (or --train_dir) picks its split."""
    chosen = [s for s, wanted in (('train', train), ('test', test)) if wanted]
    if chosen:
        return chosen
    if test_dir and not train_dir:
        return ['test']
    if train_dir and not test_dir:
        return ['train']
    return ['train', 'test']


if __name__ == '__main__':
    main()
