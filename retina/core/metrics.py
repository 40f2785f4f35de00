"""The one home of the figures: quadratic kappa, levels from scores, cut-off fitting, confusion
matrices, a grader's figures on labelled photographs, and the patient bootstrap.

Shared by training (validation kappa), the blend, the model cards (`retina.publish.release`),
the heat-map scores and the benchmarks: quadratic kappa at the fixed cut-offs 0.5..3.5 (or
given ones), the AUROC of referable DR (level >= 2) and the Spearman correlation of the
score with the level (neither depends on cut-offs), sensitivity and specificity for
referable DR at the level cut.  Intervals (`bootstrap`) resample the patients, both eyes of a
drawn patient together (`patient_resamples`), as a test set of eyes is not a sample of
independent eyes.
"""
import warnings
from dataclasses import dataclass

import numpy as np

from retina.core.paths import patient_and_eye

LEVELS = (0, 1, 2, 3, 4)
FIXED_CUTS = (0.5, 1.5, 2.5, 3.5)


def to_levels(predictions, thresholds=FIXED_CUTS):
    """Continuous predictions -> integer levels 0..4 (clip and cut at the thresholds)."""
    predictions = np.clip(np.asarray(predictions, dtype=np.float64).ravel(), 0, 4)
    return np.digitize(predictions, np.asarray(thresholds)).astype(np.int64)


FEW_VALIDATION_IMAGES = 20  # a kappa on fewer images is mostly noise: say so beside it


def few_images_warning(count):
    """A note to print beside a kappa of `count` images, or '' when there are enough."""
    if count >= FEW_VALIDATION_IMAGES:
        return ''
    return (f'  [warning: only {count} validation images; a kappa on fewer than '
            f'{FEW_VALIDATION_IMAGES} is mostly noise]')


def kappa(labels, predictions, thresholds=FIXED_CUTS):
    """Quadratic weighted kappa of continuous predictions against levels 0..4."""
    from sklearn.metrics import cohen_kappa_score  # here: 1.7 s of import grading never needs
    labels = np.asarray(labels).ravel().astype(np.int64)
    predicted = to_levels(predictions, thresholds)
    if len(labels) == 0:
        return float('nan')
    if len(set(labels.tolist()) | set(predicted.tolist())) == 1:
        return 1.0
    return float(cohen_kappa_score(labels, predicted, weights='quadratic', labels=list(LEVELS)))


def confusion_matrix(levels, predictions, thresholds=FIXED_CUTS):
    """5×5 counts, rows the true level, columns the predicted one."""
    predicted = to_levels(predictions, thresholds)
    n = len(LEVELS)
    return np.bincount(np.asarray(levels) * n + predicted, minlength=n * n).reshape(n, n)


def _kappa_of_confusion(confusion):
    """Quadratic weighted kappa from a confusion matrix: the threshold search scores
    thousands of candidate cut-offs, too many for sklearn's per-call overhead."""
    n = confusion.shape[0]
    weights = (np.arange(n)[:, None] - np.arange(n)[None, :]) ** 2
    expected = np.outer(confusion.sum(1), confusion.sum(0)) / max(confusion.sum(), 1)
    disagreement = (weights * expected).sum()
    return 1.0 if disagreement == 0 else 1.0 - (weights * confusion).sum() / disagreement


def fit_thresholds(levels, predictions, start=FIXED_CUTS, max_sweeps=20, candidates=256):
    """Four sorted cut-offs that maximise validation kappa (coordinate search from `start`).

    Each sweep moves one cut-off at a time to the best point between its
    neighbours (midpoints between distinct predictions); only improvements
    are kept, so the result is never worse than `start` on these predictions.
    """
    levels = np.asarray(levels)
    values = np.clip(np.asarray(predictions, dtype=np.float64), 0, 4)
    cuts = list(start)

    def score(trial):
        return _kappa_of_confusion(confusion_matrix(levels, values, trial))

    best = score(cuts)
    for _ in range(max_sweeps):
        improved = False
        for i in range(len(cuts)):
            low = cuts[i - 1] if i > 0 else 0.0
            high = cuts[i + 1] if i + 1 < len(cuts) else 4.0
            inside = np.unique(values[(values > low) & (values < high)])
            if inside.size == 0:
                continue
            points = np.concatenate([[(low + inside[0]) / 2], (inside[:-1] + inside[1:]) / 2,
                                     [(inside[-1] + high) / 2]])
            if points.size > candidates:
                points = points[np.linspace(0, points.size - 1, candidates).round().astype(int)]
            for point in points:
                trial = cuts[:i] + [float(point)] + cuts[i + 1:]
                value = score(trial)
                if value > best + 1e-12:
                    best, cuts, improved = value, trial, True
        if not improved:
            break
    if kappa(levels, values, cuts) < kappa(levels, values, start):
        return tuple(start)
    return tuple(cuts)


REFERABLE = 2  # referable DR: moderate or worse (levels 2, 3, 4)
BOOTSTRAP_ROUNDS = 1000


def scores(levels, predictions, cuts=None):
    """(kappa at 0.5..3.5, kappa at `cuts` or NaN, referable-DR AUROC, Spearman)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score
    levels, predictions = np.asarray(levels), np.asarray(predictions, dtype=np.float64)
    referable = levels >= REFERABLE
    auroc = (roc_auc_score(referable, predictions) if 0 < referable.sum() < len(levels)
             else float('nan'))
    rank = spearmanr(levels, predictions)[0] if len(set(levels.tolist())) > 1 else float('nan')
    return (kappa(levels, predictions),
            kappa(levels, predictions, cuts) if cuts is not None else float('nan'),
            float(auroc), float(rank))


def referable_rates(levels, predictions, cuts=FIXED_CUTS):
    """(sensitivity, specificity) of 'graded level >= 2' for 'true level >= 2'."""
    truth = np.asarray(levels) >= REFERABLE
    called = to_levels(predictions, cuts) >= REFERABLE
    sensitivity = called[truth].mean() if truth.any() else float('nan')
    specificity = (~called[~truth]).mean() if (~truth).any() else float('nan')
    return float(sensitivity), float(specificity)


@dataclass
class Interval:
    """A figure and its bootstrap interval."""
    value: float
    low: float
    high: float

    def __str__(self):
        return f'{self.value:.3f} [{self.low:.2f}, {self.high:.2f}]'


def patients(names):
    """The patient of each image name (`paths.patient_and_eye`: both eyes of `10_left` and
    `10_right` are patient `10`; a name without an eye is its own patient)."""
    return [patient_and_eye(str(name))[0] for name in names]


def patient_rows(names):
    """The rows of `names` of each patient, patients in sorted order: a list of index arrays."""
    unique, inverse = np.unique(np.array(patients(names), dtype=str), return_inverse=True)
    order = np.argsort(inverse, kind='stable')
    starts = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
    return [order[starts[k]:starts[k + 1]] for k in range(len(unique))]


def patient_resamples(names, n=BOOTSTRAP_ROUNDS, seed=0):
    """`n` bootstrap resamples of the rows of `names` (a generator of index arrays): each draws
    as many patients as there are, with replacement, and takes every row of each patient drawn,
    so both eyes of a patient are always in or out together."""
    groups = patient_rows(names)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        drawn = rng.integers(0, len(groups), len(groups))
        yield (np.concatenate([groups[k] for k in drawn]) if len(groups)
               else np.zeros(0, dtype=np.int64))


def bootstrap(names, statistic, *columns, n=BOOTSTRAP_ROUNDS, seed=0, level=0.95):
    """`statistic(*columns)` and its `level` percentile interval over `n` resamples of the
    patients of `names` (`patient_resamples`; each column has a row per name, and a resample
    passes `statistic` the same rows of every column).

    Returns an `Interval` when `statistic` returns a number, a tuple of `Interval`s (one per
    number) when it returns a tuple.  A number that is NaN in some resamples (a level missing
    from a draw) gets its interval from the others."""
    columns = [np.asarray(column) for column in columns]
    for column in columns:
        if len(column) != len(names):
            raise ValueError(f'bootstrap: a column of {len(column)} rows for {len(names)} names')
    point = statistic(*columns)
    single = np.ndim(point) == 0
    draws = np.array([statistic(*(column[rows] for column in columns))
                      for rows in patient_resamples(names, n, seed)], dtype=np.float64)
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():  # a figure that is NaN in every draw (no cut-offs given)
        warnings.simplefilter('ignore', RuntimeWarning)
        low, high = np.nanpercentile(draws.reshape(n, -1), [tail, 100 - tail], axis=0)
    intervals = tuple(Interval(float(v), float(lo), float(hi))
                      for v, lo, hi in zip(np.atleast_1d(point), low, high))
    return intervals[0] if single else intervals


def score_intervals(names, levels, predictions, cuts=None, n=BOOTSTRAP_ROUNDS, seed=0):
    """Every figure of `scores` (kappa at 0.5..3.5 and at `cuts`, referable AUROC, Spearman),
    each an `Interval` over patient resamples."""
    return bootstrap(names, lambda lv, pr: scores(lv, pr, cuts), levels,
                     np.asarray(predictions, dtype=np.float64), n=n, seed=seed)
