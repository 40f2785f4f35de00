"""Blending transform.py features into levels and a submission (blend.py), as the original did it.

A *run* is a list of train feature files (e.g. the mean and std features of
two configs) that are concatenated side by side; blend.yml names the runs.
Per run: standardise (StandardScaler fitted on the rows the net is fitted
on), optionally build per-eye inputs [this eye, other eye, right-eye flag]
(`per_patient_inputs`), and fit a small maxout net on the level with MSE.

The images are split as train_nn.py split them (`split_rows`): the nets' test split
(--hold_out, read from the weights behind the features) is never fitted on, and the rest
is split into the nets' training and validation patients.  By default (fit_on 'unseen')
the blend is fitted on the validation patients only, whose images no net trained on:
validation reports their out-of-fold predictions, prediction fits on all of them.  With
fit_on 'all' (the original) validation fits on the training patients and scores the
validation patients, and prediction fits on both.  A net's features of its own training
images are tighter than of any new image, so a blend fitted on them learns the wrong
spread (measured on eyepacs256 in BENCHMARKS.md, "The chain on real photographs").
Prediction averages the runs' test predictions, cuts them into levels and writes
`image,level` rows matched to the test images by name; the held-out test split, if any,
is scored beside the validation.

Choices the original leaves open: the class-balanced batches draw every
level equally often (inverse class frequency of the rows being fitted, which
on the Kaggle data is the original's BALANCE_WEIGHTS); every names file is
checked (against each other, the labels and the test folder) before the
first fit; `fit_thresholds` can replace the fixed cut-offs 0.5 .. 3.5 with
ones fitted on the validation predictions.

`run_blend` is the entry point for other code; blend.py only parses options.
"""
import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from retina.blend import fitted as fitted_blend
from retina.blend import net as blend_net
from retina.blend.net import per_patient_inputs, prepare_inputs
from retina.core import atomic, metrics, paths
from retina.core.errors import UserError, first_few
from retina.data.images import csv_safe, image_name, list_images
from retina.data.labels import VALIDATION_FRACTION, load_labels, lone_eyes, split_rows
from retina.features.files import load_features, names_file_for, read_names, source_of

FIXED_THRESHOLDS = metrics.FIXED_CUTS
FOLDS = 5  # --fit_on unseen: out-of-fold validation predictions, folds by patient
MIN_UNSEEN_PATIENTS = 100
DEFAULT_BLEND_CONFIG = Path('blend.yml')
DEFAULT_TEST_DIR = paths.DATA_DIR / 'test_medium'


# ---------------------------------------------------------------- which files

def resolve_feature_path(entry):
    """A bare file name is looked up in data/features/ (then the working directory);
    anything with a folder part is used as given."""
    path = Path(entry).expanduser()
    if path.is_absolute() or path.parent != Path('.'):
        return path
    in_features = paths.FEATURES_DIR / path
    return path if path.is_file() and not in_features.is_file() else in_features


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice (plain YAML keeps the last: a run would vanish)."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f'{key!r} is given twice (each run needs its own name)',
                key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _mapping_without_duplicates)


def load_blend_config(path):
    """{run name: [train feature paths]} from a YAML mapping; every file must exist."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: blend config not found; create it (a YAML mapping of run name '
                        f'to a list of train feature files, like blend.yml in the repository) '
                        f'or pass --features_file or --cnf')
    try:
        content = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, 'problem_mark', None)
        where = f', line {mark.line + 1}' if mark is not None else ''
        problem = getattr(error, 'problem', None) or str(error).splitlines()[0]
        raise UserError(f'{path}{where}: not valid YAML ({problem}); fix the file') from None
    except UnicodeDecodeError:
        raise UserError(f'{path}: not a text file; expected a YAML mapping of run name to '
                        f'train feature files') from None
    if not isinstance(content, dict) or not content:
        raise UserError(f'{path}: expected a mapping of run name to a list of train feature '
                        f'files (e.g. "my_run: [c_512_5x5_32_train_mean_iter_50_skip_0.npy]"), '
                        f'found {type(content).__name__ if content is not None else "nothing"}')
    runs = {}
    for name, files in content.items():
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise UserError(f'{path}: run {name!r} must be a list of train feature file names '
                            f'(e.g. - c_512_5x5_32_train_mean_iter_50_skip_0.npy)')
        resolved = [resolve_feature_path(f) for f in files]
        for entry, file in zip(files, resolved):
            if not file.is_file():
                raise UserError(f'{path}: run {name!r} names {entry}, but {file} does not exist; '
                                f'run transform.py for that config (python transform.py --cnf CNF '
                                f'--n_iter N --train --test) or fix the entry')
        if str(name) in runs:  # e.g. 1 and '1'
            raise UserError(f'{path}: run name {str(name)!r} is given twice; give each run its '
                            f'own name')
        runs[str(name)] = resolved
    return runs


def latest_features(cnf_name):
    """The most recently written train mean+std feature pair of a config."""
    candidates = []
    for mean in paths.FEATURES_DIR.glob(f'{cnf_name}_train_mean_iter_*_skip_*.npy'):
        parts = paths.parse_features(mean)
        if parts is None or parts.cnf != cnf_name:
            continue
        std = paths.features(cnf_name, 'train', 'std', parts.n_iter, parts.skip)
        if std.is_file():
            candidates.append((mean.stat().st_mtime, parts.n_iter, mean, std))
    if not candidates:
        raise UserError(f'{paths.FEATURES_DIR}: no train mean+std features of {cnf_name} '
                        f'(looked for {cnf_name}_train_mean_iter_N_skip_K.npy and its _std_ '
                        f'partner); run python transform.py --cnf {cnf_name} --train --test '
                        f'first, or name the files with --features_file')
    _, _, mean, std = max(candidates, key=lambda c: (c[0], c[1]))
    return [mean, std]


def runs_from_options(features_files=(), blend_config=None, cnf_name=None):
    """The runs blend.py fits: --features_file, else --blend_cnf, else the config's latest
    features (--cnf), else blend.yml in the working directory."""
    if features_files and blend_config:
        raise UserError(f'{blend_config}: --blend_cnf and --features_file both given; use one '
                        f'(--features_file replaces the blend config)')
    if features_files:
        return {cnf_name or 'features': [resolve_feature_path(f) for f in features_files]}
    if blend_config:
        return load_blend_config(blend_config)
    if cnf_name:
        return {cnf_name: latest_features(cnf_name)}
    return load_blend_config(DEFAULT_BLEND_CONFIG)


def matching_test_file(train_path):
    """X_train_mean_iter_5_skip_0.npy -> X_test_mean_iter_5_skip_0.npy, in the same folder."""
    train_path = Path(train_path)
    parts = paths.parse_features(train_path)
    if parts is None or parts.split != 'train':
        raise UserError(f'{train_path}: cannot tell its test features: the name has no _train_ '
                        f'before mean/std (expected CNF_train_mean_iter_N_skip_K.npy)')
    return train_path.with_name(paths.features(parts.cnf, 'test', parts.stat, parts.n_iter,
                                               parts.skip).name)


# ---------------------------------------------------------------- features

def run_names(files):
    """The image names of a run's files, which must list the same images in the same order."""
    names = read_names(files[0])
    for file in files[1:]:
        other = read_names(file)
        if other != names:
            row = next((i for i, pair in enumerate(zip(other, names)) if pair[0] != pair[1]),
                       min(len(other), len(names)))
            found = other[row] if row < len(other) else 'nothing'
            expected = names[row] if row < len(names) else 'nothing'
            raise UserError(f'{file}: its rows are not the images of {files[0]} in the same order '
                            f'(row {row + 1} is {found}, not {expected}); extract the features of '
                            f'a run from the same image folder (run transform.py again)')
    return names


def load_run(files):
    """Concatenate a run's feature files side by side: (array, names); rows must be finite."""
    names = run_names(files)
    blocks = []
    for file in files:
        array, file_names = load_features(file)
        if file_names != names:
            raise UserError(f'{file}: its names file changed while blend.py was reading it; run '
                            f'blend.py again once transform.py has finished')
        if not np.isfinite(array).all():
            raise UserError(f'{file}: contains NaN or infinite values; run transform.py again')
        blocks.append(array)
    return (blocks[0] if len(blocks) == 1 else np.hstack(blocks)), names


def reorder_rows(array, names, order, file, reference):
    """`array`'s rows put in the order of the image names `order` (same set required)."""
    if names == order:
        return array
    row_of = {name: i for i, name in enumerate(names)}
    if set(row_of) != set(order):
        raise UserError(f'{file}: its images are not those of {reference} ({len(names)} vs '
                        f'{len(order)}); all runs need features of the same training images')
    return array[[row_of[name] for name in order]]


def note_lone_eyes(names, what, echo):
    """One line naming the eyes a per-patient blend pairs with themselves (no partner)."""
    alone = lone_eyes(names)
    if alone:
        echo(f'note: {len(alone)} of the {len(names)} {what} have no other eye of their '
             f'patient and are blended alone: {first_few(alone)}')


def labels_for(names, labels, labels_file, names_source):
    missing = [name for name in names if name not in labels]
    if missing:
        raise UserError(f'{labels_file}: no label for {len(missing)} of the {len(names)} images '
                        f'of {names_source} ({first_few(missing)}); use the labels of the images '
                        f'transform.py read (--labels) or extract features of labelled images')
    return np.array([labels[name] for name in names], dtype=np.int64)


# ---------------------------------------------------------------- reports

@dataclass
class ValidationReport:
    """Validation predictions of one run (or of all runs averaged) and their scores."""
    names: list
    levels: np.ndarray
    predictions: np.ndarray
    kappa: float
    confusion: np.ndarray
    thresholds: tuple = None
    kappa_fitted: float = None
    confusion_fitted: np.ndarray = None
    fit_kappas: list = field(default_factory=list)


def validation_report(names, levels, predictions, optimize_thresholds, fit_kappas=()):
    report = ValidationReport(names=list(names), levels=levels, predictions=predictions,
                              kappa=metrics.kappa(levels, predictions),
                              confusion=metrics.confusion_matrix(levels, predictions),
                              fit_kappas=list(fit_kappas))
    if optimize_thresholds:
        report.thresholds = metrics.fit_thresholds(levels, predictions)
        report.kappa_fitted = metrics.kappa(levels, predictions, report.thresholds)
        report.confusion_fitted = metrics.confusion_matrix(levels, predictions, report.thresholds)
    return report


def format_confusion(confusion, indent='    '):
    width = max(5, len(str(confusion.max())) + 1)
    lines = [f'{indent}true\\pred' + ''.join(f'{level:>{width}}' for level in metrics.LEVELS)]
    for level, row in zip(metrics.LEVELS, confusion):
        lines.append(f'{indent}{level:>9}' + ''.join(f'{count:>{width}}' for count in row))
    return '\n'.join(lines)


def format_cuts(thresholds):
    return ' '.join(f'{t:.3f}' for t in thresholds)


def echo_report(title, report, echo, picture=None):
    echo(f'{title}: valid kappa {report.kappa:.4f} (cut-offs {format_cuts(FIXED_THRESHOLDS)})'
         + metrics.few_images_warning(len(report.levels)))
    if report.kappa_fitted is not None:
        echo(f'{title}: valid kappa {report.kappa_fitted:.4f} (fitted cut-offs '
             f'{format_cuts(report.thresholds)})')
    if len(report.fit_kappas) > 1:
        echo(f'{title}: valid kappa of each fit ' +
             ' '.join(f'{k:.4f}' for k in report.fit_kappas))
    echo('  confusion matrix, fixed cut-offs:')
    echo(format_confusion(report.confusion))
    if report.confusion_fitted is not None:
        echo('  confusion matrix, fitted cut-offs:')
        echo(format_confusion(report.confusion_fitted))
    if picture is not None:
        from retina.core import plots
        fitted = report.confusion_fitted is not None
        plots.confusion_matrix(report.confusion_fitted if fitted else report.confusion, picture,
                               f'{title}: kappa '
                               f'{report.kappa_fitted if fitted else report.kappa:.4f}'
                               + (' (fitted cut-offs)' if fitted else ''))
        echo(f'  confusion matrix picture: {picture}')


# ---------------------------------------------------------------- the blend

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


def submission_images(test_dir, test_dir_required, first_test_file, first_test_names, echo):
    """Names the submission needs: the images of `test_dir`, or the first run's test names.

    Returns (names, where they come from)."""
    test_dir = Path(test_dir) if test_dir is not None else DEFAULT_TEST_DIR
    if test_dir.is_dir():
        return [image_name(p) for p in list_images(test_dir)], str(test_dir)
    if test_dir_required:
        raise UserError(f'{test_dir}: no such folder; pass the folder of converted test images '
                        f'(--test_dir) that transform.py --test read')
    names_path = names_file_for(first_test_file)
    echo(f'note: {test_dir} not found; writing one row per image named in {names_path} '
         f'({len(first_test_names)} images)')
    return list(first_test_names), str(names_path)


def check_same_weights(train_file, test_file):
    """Train and test features of a run must come from the same weights (the fingerprints
    transform.py records beside them); features from before those records are not checked."""
    train, test = source_of(train_file), source_of(test_file)
    if not (train and test and train.get('fingerprint') and test.get('fingerprint')):
        return
    if train['fingerprint'] != test['fingerprint']:
        raise UserError(f'{test_file}: made with other weights than {train_file} ('
                        f'{test.get("weights")} vs {train.get("weights")}, fingerprints '
                        f'{test["fingerprint"]} vs {train["fingerprint"]}); a blend fitted on '
                        f'one net\'s features cannot score another\'s: run transform.py --train '
                        f'--test again with one weights file')


@dataclass
class BlendPlan:
    """What the names files say, checked before any fitting."""
    names: list            # training images, in the first run's row order
    levels: np.ndarray     # their labels
    test_names: list = None  # the images the submission needs (with --predict)


def check_runs(runs, labels, labels_file, predict, test_dir, test_dir_required, echo):
    """Check every run's names files against each other, the labels and the test images,
    so that bad input stops the blend before the first fit."""
    plan, first, test_source = None, None, None
    for files in runs.values():
        names = run_names(files)
        if plan is None:
            first = files[0]
            plan = BlendPlan(names, labels_for(names, labels, labels_file, names_file_for(first)))
        elif set(names) != set(plan.names):
            raise UserError(f'{files[0]}: its images are not those of {first} ({len(names)} vs '
                            f'{len(plan.names)}); all runs need features of the same training '
                            f'images')
        if predict:
            test_files = [matching_test_file(f) for f in files]
            test_names = run_names(test_files)
            for train_file, test_file in zip(files, test_files):  # shapes only: no reading yet
                train_width = load_features(train_file, mmap=True)[0].shape[1]
                test_width = load_features(test_file, mmap=True)[0].shape[1]
                if train_width != test_width:
                    raise UserError(f'{test_file}: {test_width} features per image but '
                                    f'{train_file} has {train_width}; extract train and test '
                                    f'features with the same config (transform.py --train '
                                    f'--test)')
                check_same_weights(train_file, test_file)
            if plan.test_names is None:
                plan.test_names, test_source = submission_images(
                    test_dir, test_dir_required, test_files[0], test_names, echo)
            covered = set(test_names)
            missing = [name for name in plan.test_names if name not in covered]
            if missing:
                raise UserError(f'{test_files[0]}: no features for {len(missing)} of the '
                                f'{len(plan.test_names)} test images of {test_source} '
                                f'({first_few(missing)}); run transform.py --test on that folder '
                                f'(with --test_dir)')
    return plan


def folds_by_patient(names, rows, k=FOLDS, seed=0):
    """`rows` in k folds by patient (both eyes in one fold), a fixed shuffle of the patients."""
    patients = [paths.patient_and_eye(names[i])[0] for i in rows]
    unique = sorted(set(patients))
    np.random.default_rng(seed).shuffle(unique)
    fold_of = {p: i % k for i, p in enumerate(unique)}
    return [rows[[fold_of[p] == f for p in patients]] for f in range(min(k, len(unique)))]


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


def write_submission(path, names, levels, replace=True, scores=None):
    """Write image,level rows (csv quoting: a name may hold a comma); returns the path written.

    Without `replace`, a taken name is never overwritten: the next free `-N` name is used.
    With `scores`, a third column holds each image's continuous prediction.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    if scores is None:
        writer.writerow(['image', 'level'])
        writer.writerows([csv_safe(name), int(level)] for name, level in zip(names, levels))
    else:
        writer.writerow(['image', 'level', 'score'])
        writer.writerows([csv_safe(name), int(level), f'{score:.4f}']
                         for name, level, score in zip(names, levels, scores))
    if replace:
        atomic.write_text(path, buffer.getvalue())
        return Path(path)
    return atomic.write_new(path, buffer.getvalue())


FIT_ON = ('unseen', 'all')
FIT_ON_HELP = ('unseen: fit the blend on the images no net trained on, the validation '
               'patients of train_nn.py\'s split (scored out of fold, 5 folds by patient); '
               'all: on every training image, the nets\' own training images included (the '
               'original; make_kaggle_solution.sh uses it).  unseen needs at least '
               f'{MIN_UNSEEN_PATIENTS} validation patients and falls back to all, with a note, '
               'below that.  Patients of the nets\' test split (train_nn.py --hold_out) are '
               'never fitted on in either mode; their kappa is printed beside the validation.')


def _patients(names, rows):
    return {paths.patient_and_eye(names[i])[0] for i in rows}


def resolve_fit_on(fit_on, names, valid_rows, echo):
    """'unseen' unless the validation patients are too few to fit a net on (then 'all')."""
    if fit_on not in FIT_ON:
        raise UserError(f'fit_on {fit_on!r}: use one of {", ".join(FIT_ON)}')
    count = len(_patients(names, valid_rows))
    if fit_on == 'unseen' and count < MIN_UNSEEN_PATIENTS:
        echo(f'note: only {count} validation patients (fewer than {MIN_UNSEEN_PATIENTS}): the '
             f'blend is fitted on every training image instead (--fit_on all)')
        return 'all'
    return fit_on


def runs_hold_out(runs, echo):
    """The test split (train_nn.py --hold_out) of the nets behind the runs' features, as
    transform.py recorded it beside them (`source_of`); for features recorded before it did,
    the hold_out of the weights file they name (each file read once), or None.  Nets with
    different test splits cannot be blended honestly: the larger split is kept out."""
    from retina.model import checkpoint
    found, of_weights = [], {}
    for files in runs.values():
        for file in files:
            source = source_of(file) or {}
            weights = source.get('weights')
            if 'hold_out' in source:
                found.append(source['hold_out'])
            elif weights and released_or_file(weights):
                if weights not in of_weights:
                    state = checkpoint.load(weights)
                    of_weights[weights] = checkpoint.config_of(state).cnf.get('hold_out')
                found.append(of_weights[weights])
    fractions = {value or 0 for value in found}
    if len(fractions) > 1:
        echo(f'note: the nets were trained with different test splits (hold_out '
             f'{", ".join(str(f) for f in sorted(fractions))}); the largest is kept out')
    return max(fractions, default=0) or None


def released_or_file(weights):
    from retina.model import released
    try:
        return released.weights_path(weights).is_file()
    except UserError:
        return False


@dataclass
class TestReport:
    """Scores on the test split, which nothing was fitted on."""
    names: list
    images: int
    patients: int
    kappa: object          # metrics.Interval at the fixed cut-offs
    kappa_fitted: object   # at the validation-fitted cut-offs, or None
    predictions: np.ndarray


def test_report(names, levels, rows, predictions, thresholds):
    test_names, test_levels = [names[i] for i in rows], levels[rows]
    cuts = thresholds if thresholds is not None else metrics.FIXED_CUTS
    intervals = metrics.bootstrap(test_names, test_levels, predictions,
                                     lambda y, p: metrics.scores(y, p, cuts)[:2])
    return TestReport(test_names, len(rows), len(_patients(names, rows)), intervals[0],
                      intervals[1] if thresholds is not None else None, predictions)


def echo_test(title, report, echo):
    line = (f'{title}: held-out test kappa {report.kappa} (cut-offs '
            f'{format_cuts(FIXED_THRESHOLDS)}, 95% interval over patients)')
    if report.kappa_fitted is not None:
        line += f'; {report.kappa_fitted} (the validation-fitted cut-offs)'
    echo(line + f'; {report.images} images of {report.patients} patients')


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

    Returns {'validation': {run: ValidationReport}, 'blend': ValidationReport of the runs
    averaged (None with one run or without validation), 'kappas': {run: valid kappa},
    'thresholds': the cut-offs of the submission, 'submission': its path (None unless
    `predict`), 'test_predictions': {image: averaged continuous prediction},
    'fitted_blend': the saved blend's path (None unless `predict`), 'fit_on': the fitting
    mode used (`resolve_fit_on`), 'hold_out': the nets' test split (`runs_hold_out`),
    'held_out': {run or 'all_runs': TestReport on that split} (empty without one)}.

    `fit_on` (FIT_ON_HELP): which images the blend nets are fitted on.
    """
    if not runs:
        raise UserError('no runs to blend; name train feature files in blend.yml or with '
                        '--features_file')
    runs = {run: [Path(f) for f in files] for run, files in runs.items()}
    path = None
    if predict:  # fail now, not after the fits, if the submission cannot be written
        path = Path(output) if output is not None else paths.submission()
        atomic.check_writable(path)
    labels = load_labels(labels_file)
    plan = check_runs(runs, labels, labels_file, predict, test_dir, test_dir_required, echo)
    hold_out = runs_hold_out(runs, echo)
    split = split_rows(plan.names, plan.levels, hold_out)
    fit_on = resolve_fit_on(fit_on, plan.names, split[1], echo)
    validate = not predict or optimize_thresholds
    if validate and (len(split[0]) == 0 or len(split[1]) == 0):
        patients = len(_patients(plan.names, np.concatenate(split[:2])))
        raise UserError(f'{labels_file}: too few patients per level for a '
                        f'{VALIDATION_FRACTION:.0%} validation split ({patients} '
                        f'patients); use more images, or --predict alone')
    test_rows = split[2]
    if len(test_rows):
        echo(f'held-out test split: {len(test_rows)} of the {len(plan.names)} images (hold_out '
             f'{hold_out} of the nets\' training: {len(_patients(plan.names, test_rows))} '
             f'patients), never fitted on; scored beside the validation')
    result = dict(validation={}, blend=None, kappas={}, thresholds=None, submission=None,
                  test_predictions=None, fitted_blend=None, held_out={}, fit_on=fit_on,
                  hold_out=hold_out)
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
            report, test_predictions = validate_run(
                features, plan.names, plan.levels, split, fit_on, per_patient, n_iter, seed,
                run_index, optimize_thresholds, echo)
            result['validation'][run], result['kappas'][run] = report, report.kappa
            echo_report(f'run {run}', report, echo,
                        paths.confusion_picture(run) if pictures else None)
            if len(test_rows):
                test_of_runs.append(test_predictions)
                result['held_out'][run] = test_report(plan.names, plan.levels, test_rows,
                                                  test_predictions, report.thresholds)
                echo_test(f'run {run}', result['held_out'][run], echo)
        if predict:
            fit_rows = (split[1] if fit_on == 'unseen'
                        else np.sort(np.concatenate(split[:2])))
            run_sum, fitted_run = predict_run(features, plan, files, fit_rows, per_patient,
                                              n_iter, seed, run_index, echo, run)
            test_sum = test_sum + run_sum
            fitted.append(fitted_run)

    if validate and len(runs) > 1:
        reports = list(result['validation'].values())
        result['blend'] = validation_report(reports[0].names, reports[0].levels,
                                            np.mean([r.predictions for r in reports], axis=0),
                                            optimize_thresholds)
        echo_report(f'all {len(runs)} runs averaged', result['blend'], echo,
                    paths.confusion_picture('all_runs') if pictures else None)
        if len(test_rows):
            result['held_out']['all_runs'] = test_report(
                plan.names, plan.levels, test_rows, np.mean(test_of_runs, axis=0),
                result['blend'].thresholds)
            echo_test(f'all {len(runs)} runs averaged', result['held_out']['all_runs'], echo)

    if predict:
        chosen = result['blend'] or next(iter(result['validation'].values()), None)
        thresholds = chosen.thresholds if optimize_thresholds else FIXED_THRESHOLDS
        average = test_sum / (len(runs) * n_iter)
        path = write_submission(path, plan.test_names, metrics.to_levels(average, thresholds),
                                replace=output is not None, scores=average if scores else None)
        saved = fitted_blend.save(paths.fitted_blend(path), fitted, per_patient, thresholds)
        result.update(thresholds=tuple(thresholds), submission=path,
                      test_predictions=dict(zip(plan.test_names, average.tolist())),
                      fitted_blend=saved)
        echo(f'cut-offs {format_cuts(thresholds)}; {len(plan.test_names)} test images')
    return result
