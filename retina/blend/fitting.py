"""Fitting the blend's nets: which images they are fitted on (the fit_on policy), the
validation fits (out of fold by patient under fit_on 'unseen') and the fits for the
submission.

The images are split as train_nn.py split them (`retina.data.labels.split_rows`): the nets'
test split (--hold_out) is never fitted on, and the rest is split into the nets' training and
validation patients.  fit_on 'unseen' (the default) fits on the validation patients only, whose
images no net trained on: validation reports their out-of-fold predictions (FOLDS folds by
patient), prediction fits on all of them.  fit_on 'all' (the original) fits validation on the
training patients and scores the validation patients, and prediction fits on both.  A net's
features of its own training images are tighter than of any new image, so a blend fitted on
them learns the wrong spread (BENCHMARKS.md, "The chain on real photographs").
"""
import time

import numpy as np

from retina.blend import fitted as fitted_blend
from retina.blend import net as blend_net
from retina.blend.files import load_run, matching_test_file
from retina.blend.net import per_patient_inputs, prepare_inputs
from retina.blend.reports import validation_report
from retina.core import metrics
from retina.core.errors import UserError

FOLDS = 5  # --fit_on unseen: out-of-fold validation predictions, folds by patient
MIN_UNSEEN_PATIENTS = 100


# ---------------------------------------------------------------- which images

FIT_ON = ('unseen', 'all')
FIT_ON_HELP = ('unseen: fit the blend on the images no net trained on, the validation '
               f'patients of train_nn.py\'s split (scored out of fold, {FOLDS} folds by '
               'patient); all: on every training image, the nets\' own training images '
               'included (the original; make_kaggle_solution.sh uses it).  unseen needs at least '
               f'{MIN_UNSEEN_PATIENTS} validation patients and falls back to all, with a note, '
               'below that.  Patients of the nets\' test split (train_nn.py --hold_out) are '
               'never fitted on in either mode; their kappa is printed beside the validation.')


def patients_in(names, rows):
    """The patients of the images `names[rows]`."""
    return set(metrics.patients([names[i] for i in rows]))


def resolve_fit_on(fit_on, names, valid_rows, echo):
    """'unseen' unless the validation patients are too few to fit a net on (then 'all')."""
    if fit_on not in FIT_ON:
        raise UserError(f'fit_on {fit_on!r}: use one of {", ".join(FIT_ON)}')
    count = len(patients_in(names, valid_rows))
    if fit_on == 'unseen' and count < MIN_UNSEEN_PATIENTS:
        echo(f'note: only {count} validation patients (fewer than {MIN_UNSEEN_PATIENTS}): the '
             f'blend is fitted on every training image instead (--fit_on all)')
        return 'all'
    return fit_on


def submission_rows(split, fit_on):
    """The rows the submission's nets are fitted on, of `split` (training, validation, test
    rows): the validation patients under 'unseen', the training and validation patients under
    'all'; never the test split."""
    return split[1] if fit_on == 'unseen' else np.sort(np.concatenate(split[:2]))


def folds_by_patient(names, rows, k=FOLDS, seed=0):
    """`rows` in k folds by patient (both eyes in one fold), a fixed shuffle of the patients."""
    patients = metrics.patients([names[i] for i in rows])
    unique = sorted(set(patients))
    np.random.default_rng(seed).shuffle(unique)
    fold_of = {p: i % k for i, p in enumerate(unique)}
    return [rows[[fold_of[p] == f for p in patients]] for f in range(min(k, len(unique)))]


# ---------------------------------------------------------------- the fits

def _fit_seed(seed, run_index, iteration, phase):
    return np.random.SeedSequence([seed, run_index, iteration, phase]).generate_state(1)[0]


def _fit_and_predict(inputs, levels, fit_rows, predict_inputs, seed, label, echo, keep=None):
    """Fit one net and predict `predict_inputs`; the net is appended to `keep` if given."""
    started = time.perf_counter()
    net, mse = blend_net.fit_net(inputs[fit_rows], levels[fit_rows], seed)
    predictions = blend_net.net_predictions(net, predict_inputs)
    echo(f'  {label}: {len(fit_rows)} images, last epoch train MSE {mse:.4f}, '
         f'{time.perf_counter() - started:.1f} s')
    if keep is not None:
        keep.append(net)
    return predictions


def _fit_rows_predict(features, names, levels, fit_rows, predict_rows, per_patient, seed, label,
                      echo):
    """Standardise on `fit_rows`, fit one net there and predict `predict_rows`."""
    inputs, _ = prepare_inputs(features, names, fit_rows, per_patient)
    return _fit_and_predict(inputs, levels, fit_rows, inputs[predict_rows], seed, label, echo)


def validate_run(features, names, levels, split, fit_on, per_patient, n_iter, seed, run_index,
                 optimize_thresholds, echo):
    """Validation predictions of one run `n_iter` times, averaged: (its ValidationReport, its
    predictions for the test rows).  `split` is (training, validation, test) rows.

    fit_on 'all': fitted on the training patients, scored on the validation patients (the
    original).  fit_on 'unseen': fitted on the validation patients only, the images no net
    trained on, and scored out of fold (FOLDS folds by patient); the test rows get the
    folds' mean.  Test rows are never fitted on."""
    train_rows, valid_rows, test_rows = split
    valid = np.zeros((n_iter, len(valid_rows)))
    test = np.zeros((n_iter, len(test_rows)))
    position = {row: i for i, row in enumerate(valid_rows)}
    folds = ([(train_rows, valid_rows)] if fit_on == 'all' else
             [(np.setdiff1d(valid_rows, held), held)
              for held in folds_by_patient(names, valid_rows)])
    for iteration in range(n_iter):
        label = f'validation fit {iteration + 1}/{n_iter}'
        for fold, (fit_rows, held) in enumerate(folds):
            phase = 0 if fit_on == 'all' else 2 + fold
            predicted = _fit_rows_predict(
                features, names, levels, fit_rows, np.concatenate([held, test_rows]),
                per_patient, _fit_seed(seed, run_index, iteration, phase),
                label if fit_on == 'all' else f'{label}, fold {fold + 1}/{len(folds)}', echo)
            valid[iteration, [position[row] for row in held]] = predicted[:len(held)]
            test[iteration] += predicted[len(held):] / len(folds)
    report = validation_report([names[i] for i in valid_rows], levels[valid_rows],
                               valid.mean(0), optimize_thresholds,
                               [metrics.kappa(levels[valid_rows], fit) for fit in valid])
    return report, test.mean(0)


def predict_run(features, plan, files, fit_rows, per_patient, n_iter, seed, run_index, echo,
                run='run'):
    """Fit on the training images `fit_rows` `n_iter` times: (the summed predictions for
    plan.test_names, the fitted run for `fitted_blend.save`)."""
    test_files = [matching_test_file(f) for f in files]
    test_features, test_names = load_run(test_files)
    if test_features.shape[1] != features.shape[1]:
        raise UserError(f'{test_files[0]}: {test_features.shape[1]} features per image but '
                        f'{files[0]} has {features.shape[1]}; extract train and test features '
                        f'with the same config (transform.py --train --test)')
    inputs, scaler = prepare_inputs(features, plan.names, fit_rows, per_patient)
    test_inputs = scaler.transform(test_features).astype(np.float32, copy=False)
    if per_patient:
        test_inputs = per_patient_inputs(test_inputs, test_names)
    row_of = {name: i for i, name in enumerate(test_names)}
    test_inputs = test_inputs[[row_of[name] for name in plan.test_names]]
    nets = []
    total = sum(_fit_and_predict(inputs, plan.levels, fit_rows, test_inputs,
                                 _fit_seed(seed, run_index, iteration, 1),
                                 f'full fit {iteration + 1}/{n_iter}', echo, keep=nets)
                for iteration in range(n_iter))
    return total, fitted_blend.fitted_run(run, files, scaler, nets)
