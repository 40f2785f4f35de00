"""Blending transform.py features into levels and a submission (blend.py), as the original did it.

A *run* is a list of train feature files (e.g. the mean and std features of
two configs) that are concatenated side by side; blend.yml names the runs
(`retina.blend.files`).  Per run: standardise (StandardScaler fitted on the rows the net is
fitted on), optionally build per-eye inputs [this eye, other eye, right-eye flag]
(`retina.blend.net.per_patient_inputs`), and fit a small maxout net on the level with MSE.

Which images the nets are fitted on, and how validation is scored, is the fit_on policy
(`retina.blend.fitting`): the nets' test split (--hold_out) is never fitted on, and by
default the blend is fitted on the validation patients only, whose images no net trained on.
Prediction averages the runs' test predictions, cuts them into levels and writes
`image,level` rows matched to the test images by name (`retina.blend.submission`); the
held-out test split, if any, is scored beside the validation (`retina.blend.reports`).

Choices the original leaves open: the class-balanced batches draw every
level equally often (inverse class frequency of the rows being fitted, which
on the Kaggle data is the original's BALANCE_WEIGHTS); every names file is
checked (against each other, the labels and the test folder) before the
first fit; `metrics.fit_thresholds` can replace the fixed cut-offs 0.5 .. 3.5 with
ones fitted on the validation predictions.

`run_blend` is the entry point for other code; blend.py only parses options (the names its
options need are importable from here too).
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retina.blend import fitting
from retina.blend.files import check_runs, load_run, reorder_rows, runs_hold_out
from retina.blend.reports import (FIXED_THRESHOLDS, echo_report, echo_test, format_cuts,
                                  note_lone_eyes, test_report, validation_report)
from retina.blend.submission import submission_path, submit
from retina.core import paths
from retina.core.errors import UserError
from retina.data.labels import VALIDATION_FRACTION, load_labels, split_rows


@dataclass
class BlendResult:
    """What `run_blend` did."""
    fit_on: str               # the fitting mode used (`fitting.resolve_fit_on`)
    hold_out: float = None    # the nets' test split (`files.runs_hold_out`), or None
    validation: dict = field(default_factory=dict)  # {run: reports.ValidationReport}
    blend: object = None      # ValidationReport of the runs averaged (with several runs)
    held_out: dict = field(default_factory=dict)    # {run or 'all_runs': reports.TestReport}
    submission: object = None  # submission.Submission (with predict), else None

    @property
    def kappas(self):
        """{run: validation kappa at the fixed cut-offs}."""
        return {run: report.kappa for run, report in self.validation.items()}


def run_blend(runs, labels_file=paths.LABELS_FILE, per_patient=False, n_iter=1, seed=0,
              predict=False, test_dir=None, optimize_thresholds=False, output=None, echo=print,
              test_dir_required=False, scores=False, pictures=True, fit_on='unseen'):
    """Fit the blend net on each run's features; validate, and with `predict` write a submission.

    `runs` maps a run name to its train feature files (test files: _train_ -> _test_).
    Validation runs unless `predict` is set without `optimize_thresholds`; with
    both, the submission uses the cut-offs fitted on the validation predictions
    of the runs averaged.  `test_dir` (default data/test_medium) lists the
    images the submission must cover; when it is missing the first run's test
    feature names are used instead, unless `test_dir_required`.  `scores` adds the
    continuous prediction to the submission as a third column.  The fitted blend is
    saved beside the submission (`paths.fitted_blend`) for predict.py --blend; with
    `pictures` each validation confusion matrix is also drawn (`paths.confusion_picture`).
    `fit_on` (`fitting.FIT_ON_HELP`): which images the blend nets are fitted on.

    Returns a `BlendResult`.
    """
    if not runs:
        raise UserError('no runs to blend; name train feature files in blend.yml or with '
                        '--features_file')
    runs = {run: [Path(f) for f in files] for run, files in runs.items()}
    path = submission_path(output) if predict else None
    labels = load_labels(labels_file)
    plan = check_runs(runs, labels, labels_file, predict, test_dir, test_dir_required, echo)
    hold_out = runs_hold_out(runs, echo)
    split = split_rows(plan.names, plan.levels, hold_out)
    result = BlendResult(fitting.resolve_fit_on(fit_on, plan.names, split[1], echo), hold_out)
    validate = not predict or optimize_thresholds
    if validate and (len(split[0]) == 0 or len(split[1]) == 0):
        patients = len(fitting.patients_in(plan.names, np.concatenate(split[:2])))
        raise UserError(f'{labels_file}: too few patients per level for a '
                        f'{VALIDATION_FRACTION:.0%} validation split ({patients} '
                        f'patients); use more images, or --predict alone')
    test_rows = split[2]
    if len(test_rows):
        echo(f'held-out test split: {len(test_rows)} of the {len(plan.names)} images (hold_out '
             f'{hold_out} of the nets\' training: '
             f'{len(fitting.patients_in(plan.names, test_rows))} patients), never fitted on; '
             f'scored beside the validation')
    test_sum, first_file, fitted, test_of_runs = 0.0, next(iter(runs.values()))[0], [], []
    for run_index, (run, files) in enumerate(runs.items()):
        features, names = load_run(files)
        features = reorder_rows(features, names, plan.names, files[0], first_file)
        shape = f'{len(files)} file(s), {features.shape[1]} features'
        if per_patient:
            shape += f', {2 * features.shape[1] + 1} inputs per eye'
        echo(f'run {run}: {shape}, {len(plan.names)} training images')
        if per_patient and run_index == 0:
            note_lone_eyes(plan.names, 'training images', echo)
        if validate:
            report, test_predictions = fitting.validate_run(
                features, plan.names, plan.levels, split, result.fit_on, per_patient, n_iter,
                seed, run_index, optimize_thresholds, echo)
            result.validation[run] = report
            echo_report(f'run {run}', report, echo,
                        paths.confusion_picture(run) if pictures else None)
            if len(test_rows):
                test_of_runs.append(test_predictions)
                result.held_out[run] = test_report(plan.names, plan.levels, test_rows,
                                                   test_predictions, report.thresholds)
                echo_test(f'run {run}', result.held_out[run], echo)
        if predict:
            run_sum, fitted_run = fitting.predict_run(
                features, plan, files, fitting.submission_rows(split, result.fit_on),
                per_patient, n_iter, seed, run_index, echo, run)
            test_sum = test_sum + run_sum
            fitted.append(fitted_run)

    if validate and len(runs) > 1:
        reports = list(result.validation.values())
        result.blend = validation_report(reports[0].names, reports[0].levels,
                                         np.mean([r.predictions for r in reports], axis=0),
                                         optimize_thresholds)
        echo_report(f'all {len(runs)} runs averaged', result.blend, echo,
                    paths.confusion_picture('all_runs') if pictures else None)
        if len(test_rows):
            result.held_out['all_runs'] = test_report(
                plan.names, plan.levels, test_rows, np.mean(test_of_runs, axis=0),
                result.blend.thresholds)
            echo_test(f'all {len(runs)} runs averaged', result.held_out['all_runs'], echo)

    if predict:
        chosen = result.blend or next(iter(result.validation.values()), None)
        thresholds = chosen.thresholds if optimize_thresholds else FIXED_THRESHOLDS
        result.submission = submit(path, plan.test_names, test_sum / (len(runs) * n_iter),
                                   thresholds, fitted, per_patient, replace=output is not None,
                                   scores=scores)
        echo(f'cut-offs {format_cuts(thresholds)}; {len(plan.test_names)} test images')
    return result
