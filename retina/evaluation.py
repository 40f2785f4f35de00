"""Figures of a grader on labelled photographs, with patient-bootstrap intervals.

Shared by the model cards (`retina.release`) and the real-photo benchmark
(bench/bench_chain.py): quadratic kappa at the fixed cut-offs 0.5..3.5 (or given
ones), the AUROC of referable DR (level >= 2) and the Spearman correlation of the
score with the level (neither depends on cut-offs), sensitivity and specificity for
referable DR at the level cut.  Intervals resample the
patients (both eyes of a drawn patient together), as a test set of eyes is not a
sample of independent eyes.
"""
import warnings
from dataclasses import dataclass

import numpy as np

from retina import data

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
    return (data.kappa(levels, predictions),
            data.kappa(levels, predictions, cuts) if cuts is not None else float('nan'),
            float(auroc), float(rank))


def referable_rates(levels, predictions, cuts=data.FIXED_CUTS):
    """(sensitivity, specificity) of 'graded level >= 2' for 'true level >= 2'."""
    truth = np.asarray(levels) >= REFERABLE
    called = data.to_levels(predictions, cuts) >= REFERABLE
    sensitivity = called[truth].mean() if truth.any() else float('nan')
    specificity = (~called[~truth]).mean() if (~truth).any() else float('nan')
    return float(sensitivity), float(specificity)


@dataclass
class Interval:
    value: float
    low: float
    high: float

    def __str__(self):
        return f'{self.value:.3f} [{self.low:.2f}, {self.high:.2f}]'


def bootstrap(names, levels, predictions, statistic=scores, rounds=BOOTSTRAP_ROUNDS, seed=0):
    """`statistic(levels, predictions)` (a tuple of numbers) and, for each number, its 95%
    interval over `rounds` resamples of the patients: a tuple of `Interval`s."""
    levels, predictions = np.asarray(levels), np.asarray(predictions, dtype=np.float64)
    patients = np.array([data.patient_and_eye(n)[0] for n in names])
    unique, inverse = np.unique(patients, return_inverse=True)
    order = np.argsort(inverse, kind='stable')
    starts = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
    rows_of = [order[starts[k]:starts[k + 1]] for k in range(len(unique))]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(rounds):
        rows = np.concatenate([rows_of[k] for k in rng.integers(0, len(unique), len(unique))])
        draws.append(statistic(levels[rows], predictions[rows]))
    with warnings.catch_warnings():  # a score that is NaN in every draw (no cut-offs given)
        warnings.simplefilter('ignore', RuntimeWarning)
        low, high = np.nanpercentile(np.array(draws, dtype=np.float64), [2.5, 97.5], axis=0)
    point = statistic(levels, predictions)
    return tuple(Interval(float(v), float(lo), float(hi)) for v, lo, hi in zip(point, low, high))
