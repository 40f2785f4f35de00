#!/usr/bin/env python
"""Extract test-time-augmented features of a trained net for blend.py."""
import click

from retina.core.errors import handle_errors
from retina.core.options import (CONTEXT_SETTINGS, PRECISION_AUTO_FEATURES, TRAINED_AS,
                                 batch_size_option, cnf_option, compile_option, device_option,
                                 no_progress_option, precision_option, test_dir_option,
                                 train_dir_option, tta_iterations_option, weights_option)
from retina.model import config as config_module
from retina.model.augment import TTA_SEQUENCES, TTA_SEQUENCE_HELP


@click.command(context_settings=CONTEXT_SETTINGS)
@cnf_option('The trained net.', default_text=TRAINED_AS)
@tta_iterations_option('The features of each image are the mean and std over the iterations, '
                       'saved every 5 iterations.')
@click.option('--skip', default=0, show_default=True, type=click.IntRange(min=0),
              help='Start at this point of the Halton sequence (to draw other augmentations).')
@click.option('--test', is_flag=True,
              help="The test set, not a preview: extract features of the test images (--test_dir). "
                   '(convert.py --test is a preview of crops.)')
@click.option('--train', is_flag=True,
              help='Extract features of the training images (--train_dir).')
@weights_option('The trained net to extract with.')
@test_dir_option('Given without --train, --test or --train_dir, only the test features are '
                 'extracted (as the original did).')
@train_dir_option('Given without --train, --test or --test_dir, only the training features are '
                  'extracted.')
@device_option()
@batch_size_option("Halved (with a note) while it does not fit in memory.",
                   default_text="the config's batch_size_test, at least 512 on a GPU")
@compile_option()
@precision_option(PRECISION_AUTO_FEATURES,
                  'bf16 on a CPU with native bf16 gives about 2.5x the images per second at '
                  '128 px.  Saved iterations of the other precision are not continued: the '
                  'extraction starts again.')
@click.option('--tta_sequence', type=click.Choice(TTA_SEQUENCES), default='scrambled',
              show_default=True, help=TTA_SEQUENCE_HELP + '  Saved iterations of the other '
                                                          'sequence are not continued.')
@click.option('--restart', is_flag=True,
              help='Ignore the saved iterations of an interrupted run and start from the first.')
@no_progress_option()
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
