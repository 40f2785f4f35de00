#!/usr/bin/env python
"""Blend transform.py features with a small net: validate, or write a submission (step 4).

    python blend.py --per_patient                         # validate the runs of blend.yml
    python blend.py --per_patient --predict               # write data/sub_*.csv
    python blend.py --cnf c_512_5x5_32 --per_patient      # that config's latest features
    python blend.py --features_file data/features/c_512_5x5_32_train_mean_iter_50_skip_0.npy \\
                    --features_file data/features/c_512_5x5_32_train_std_iter_50_skip_0.npy

The work is done by retina.blend.blending.run_blend; see its docstring.
"""
import click

from retina.blend import blending as blend
from retina.blend import files as blend_files
from retina.blend import fitting
from retina.core import paths
from retina.core.errors import UserError, handle_errors
from retina.core.options import (CONTEXT_SETTINGS, cnf_option, labels_option,
                                 output_file_option, per_patient_option, seed_option,
                                 test_dir_option)
from retina.model import config as config_module


@click.command(context_settings=CONTEXT_SETTINGS)
@cnf_option('Without --features_file and --blend_cnf its latest train mean+std features are the '
            'one run; it also sets the defaults of --test_dir and --labels.')
@click.option('--predict', is_flag=True,
              help='Fit the blend on the images --fit_on names (unseen, the default: only the '
                   "validation patients of the nets' split, or every training image when they "
                   f'are fewer than {fitting.MIN_UNSEEN_PATIENTS}; all: every training image), '
                   'never on the test split of train_nn.py --hold_out; average the runs\' test '
                   'predictions and write the submission (image,level) and the fitted blend.  '
                   'Without it: validation only.')
@per_patient_option('Fit it: the eyes of a patient are blended together.')
@click.option('--features_file', multiple=True, metavar='FILE',
              help='A train feature file (repeat for several; they are concatenated into one '
                   'run, used instead of the blend config). A bare name is looked up in '
                   'data/features/. Test features: the same name with _train_ -> _test_.')
@click.option('--n_iter', default=1, show_default=True, type=click.IntRange(min=1),
              help="Fits of the blend net per run, each from another seed; their predictions "
                   'are averaged.  (Not test-time augmentation: the TTA iterations of the '
                   "features are transform.py's --n_iter, in the feature files' names.)")
@click.option('--blend_cnf', type=click.Path(dir_okay=False), metavar='YAML',
              help='Blend config: run name -> list of train feature files. '
                   '[default: blend.yml, used when neither --features_file nor --cnf is given]')
@test_dir_option('The images the submission must cover.',
                 default_text=f'the config\'s test_dir with --cnf, else '
                              f'{blend_files.DEFAULT_TEST_DIR}; if the default folder is missing, the '
                              'test feature names are used')
@labels_option(f'the training labels [default: the config\'s labels with --cnf, else '
               f'{paths.LABELS_FILE}].')
@seed_option("of the blend nets' initialisation and batches.")
@click.option('--optimize_thresholds', is_flag=True,
              help='Fit the four cut-offs to maximise kappa on the validation predictions and '
                   'report both kappas; with --predict a validation fit is made first and its '
                   'fitted cut-offs are used for the submission (else 0.5, 1.5, 2.5, 3.5).')
@output_file_option('the submission (with --predict).  The fitted blend is saved beside it as '
                    'NAME_blend.pt, for predict.py --blend.  [default: '
                    'data/sub_{git sha}_{time}.csv]')
@click.option('--scores', is_flag=True,
              help='With --predict: add a third column, score, with each image\'s continuous '
                   'prediction (the runs averaged) before it is cut into a level.')
@click.option('--fit_on', type=click.Choice(fitting.FIT_ON), default='unseen', show_default=True,
              help=fitting.FIT_ON_HELP)
@click.option('--no_pictures', is_flag=True,
              help='Do not draw the validation confusion matrices (by default each is written '
                   'as data/blend/RUN_confusion.png beside its printout).')
@handle_errors()
def main(cnf, predict, per_patient, features_file, n_iter, blend_cnf, test_dir, labels, seed,
         optimize_thresholds, output, scores, fit_on, no_pictures):
    """Fit the blend net on each run's features: report validation kappa and the
    confusion matrix per run (and for the runs averaged; also drawn as a PNG),
    or with --predict write the submission and the fitted blend, and print
    their paths."""
    if scores and not predict:
        raise UserError('--scores adds a column to the submission: use it with --predict')
    config = config_module.load(cnf) if cnf else None
    runs = blend_files.runs_from_options(features_file, blend_cnf, config.name if config else None)
    result = blend.run_blend(
        runs,
        labels_file=labels or (config.cnf['labels'] if config else paths.LABELS_FILE),
        per_patient=per_patient, n_iter=n_iter, seed=seed, predict=predict,
        test_dir=test_dir or (config.cnf['test_dir'] if config else None),
        test_dir_required=test_dir is not None,
        optimize_thresholds=optimize_thresholds, output=output, echo=click.echo, scores=scores,
        pictures=not no_pictures, fit_on=fit_on)
    if result.submission is not None:
        click.echo(f'wrote {result.submission.path}')
        click.echo(f'wrote {result.submission.fitted_blend} (the fitted blend, for predict.py '
                   f'--blend)')


if __name__ == '__main__':
    main()
