"""Tests for retina/core/metrics.py: kappa against a confusion matrix worked by hand, fitted
cut-offs, and the patient bootstrap (whole patients, honest intervals, reproducible)."""
from collections import Counter

import numpy as np
import pytest

from retina.core import metrics
from retina.core.metrics import kappa

LEVEL_PROBABILITIES = [0.4, 0.15, 0.25, 0.1, 0.1]


# ---------------------------------------------------------------- kappa, levels, confusion

def test_kappa_of_a_confusion_matrix_worked_by_hand():
    levels = [0, 0, 1, 1, 2, 2]
    predictions = [0.2, 0.9, 1.4, 0.6, 2.3, -0.4]  # cut at 0.5 .. 3.5: 0, 1, 1, 1, 2, 0
    np.testing.assert_array_equal(metrics.to_levels(predictions), [0, 1, 1, 1, 2, 0])
    confusion = metrics.confusion_matrix(levels, predictions)
    expected = np.zeros((5, 5), dtype=int)
    expected[0, 0] = expected[0, 1] = expected[2, 2] = expected[2, 0] = 1
    expected[1, 1] = 2
    np.testing.assert_array_equal(confusion, expected)
    # Weights (i - j)^2.  Observed: one 0 -> 1 (weight 1), one 2 -> 0 (weight 4): 5.
    # Expected by chance: rows 2, 2, 2 and columns 2, 3, 1 of 6 images:
    # sum_ij (i - j)^2 * row_i * col_j / 6 = (2 * 5 + 3 * 2 + 1 * 5) * 2 / 6 = 7.
    assert kappa(levels, predictions) == pytest.approx(1 - 5 / 7)
    assert metrics._kappa_of_confusion(confusion) == pytest.approx(1 - 5 / 7)


def test_kappa_at_given_cut_offs_and_in_corner_cases():
    levels = [0, 1, 2, 3, 4]
    predictions = [0.1, 0.3, 0.5, 0.7, 0.9]
    assert kappa(levels, predictions) < 0.5
    assert kappa(levels, predictions, (0.2, 0.4, 0.6, 0.8)) == pytest.approx(1.0)
    assert kappa([2, 2, 2], [2.1, 1.9, 2.2]) == 1.0  # one level everywhere: full agreement
    assert np.isnan(kappa([], []))


def test_fast_kappa_matches_sklearn():
    rng = np.random.default_rng(2)
    levels = rng.integers(0, 5, 300)
    predictions = levels + rng.normal(scale=1.0, size=300)
    confusion = metrics.confusion_matrix(levels, predictions)
    assert metrics._kappa_of_confusion(confusion) == pytest.approx(kappa(levels, predictions))


# ---------------------------------------------------------------- fitted cut-offs

def test_fitted_cut_offs_repair_a_squeezed_predictor():
    """Predictions at half the scale (level / 2 + 0.1) fall between the fixed cut-offs
    wrongly; fitted ones separate the levels again."""
    levels = np.repeat(np.arange(5), 20)
    predictions = levels / 2 + 0.1 + np.tile(np.linspace(-0.05, 0.05, 20), 5)
    cuts = metrics.fit_thresholds(levels, predictions)
    assert kappa(levels, predictions) < 0.95
    assert kappa(levels, predictions, cuts) == pytest.approx(1.0)
    np.testing.assert_array_equal(metrics.to_levels(predictions, cuts), levels)


@pytest.mark.parametrize('seed', range(5))
def test_fitted_thresholds_never_worse_and_sorted(seed):
    rng = np.random.default_rng(seed)
    levels = rng.choice(5, size=200, p=LEVEL_PROBABILITIES)
    predictions = levels * rng.uniform(0.5, 1.2) + rng.normal(scale=rng.uniform(0.3, 2), size=200)
    cuts = metrics.fit_thresholds(levels, predictions)
    assert list(cuts) == sorted(cuts) and len(cuts) == 4
    assert kappa(levels, predictions, cuts) >= kappa(levels, predictions)


def test_fitted_thresholds_correct_a_biased_predictor():
    rng = np.random.default_rng(7)
    levels = rng.choice(5, size=300, p=LEVEL_PROBABILITIES)
    predictions = 0.6 * levels + 0.8 + rng.normal(scale=0.1, size=300)
    cuts = metrics.fit_thresholds(levels, predictions)
    assert kappa(levels, predictions, cuts) > kappa(levels, predictions) + 0.1
    assert kappa(levels, predictions, cuts) > 0.95


# ---------------------------------------------------------------- the patient bootstrap

def eyes(patients, rng, one_eyed_every=5):
    """Shuffled eye names of `patients` (some with one eye, some in capitals), levels shared by
    a patient's eyes, and predictions of level + noise."""
    names, levels = [], []
    for patient in range(patients):
        level = int(rng.choice(5, p=LEVEL_PROBABILITIES))
        sides = ('left',) if patient % one_eyed_every == 0 else ('left', 'RIGHT')
        names += [f'{patient}_{side}' for side in sides]
        levels += [level] * len(sides)
    order = rng.permutation(len(names))
    levels = np.array(levels)[order]
    return [names[i] for i in order], levels, levels + rng.normal(scale=0.8, size=len(levels))


def test_resamples_never_split_a_patient():
    names, _, _ = eyes(60, np.random.default_rng(0))
    patient = metrics.patients(names)
    assert patient[names.index('1_RIGHT')] == patient[names.index('1_left')] == '1'
    eyes_of = Counter(patient)
    for rows in metrics.patient_resamples(names, n=200, seed=3):
        times, drawn = Counter(rows.tolist()), Counter(patient[i] for i in rows)
        # a patient drawn k times brings each of its eyes k times: never one eye alone
        for i, p in enumerate(patient):
            assert times[i] * eyes_of[p] == drawn[p], names[i]
        assert sum(drawn[p] // eyes_of[p] for p in drawn) == 60  # as many patients as there are


def test_bootstrap_passes_the_same_rows_of_every_column():
    names = ['1_left', '1_right', '2_left', '2_right', '3_left']
    seen = []

    def statistic(row, name_column):
        assert [names[i] for i in row] == list(name_column)
        patients = metrics.patients(name_column)
        assert all(Counter(patients)[p] % (2 if p != '3' else 1) == 0 for p in patients)
        seen.append(len(row))
        return float(len(row))

    metrics.bootstrap(names, statistic, np.arange(5), np.array(names), n=30)
    assert len(seen) == 31 and len(set(seen)) > 1
    with pytest.raises(ValueError, match='4 rows for 5 names'):
        metrics.bootstrap(names, np.mean, np.arange(4))


def test_interval_contains_the_estimate_and_narrows_with_more_patients():
    rng = np.random.default_rng(1)
    widths = []
    for patients in (40, 400):
        names, levels, predictions = eyes(patients, rng)
        fixed, fitted, auroc, rank = metrics.score_intervals(names, levels, predictions,
                                                             (0.6, 1.5, 2.5, 3.4), n=300)
        for interval in (fixed, fitted, auroc, rank):
            assert interval.low <= interval.value <= interval.high, interval
        assert fixed.value == pytest.approx(kappa(levels, predictions))
        widths.append(fixed.high - fixed.low)
        mean = metrics.bootstrap(names, np.mean, predictions, n=300)
        assert isinstance(mean, metrics.Interval)
        assert mean.low < predictions.mean() == mean.value < mean.high
    assert widths[1] < widths[0] / 2, widths


def test_bootstrap_is_deterministic_under_a_seed():
    names, levels, predictions = eyes(50, np.random.default_rng(4))
    cuts = (0.5, 1.4, 2.6, 3.5)
    first = metrics.score_intervals(names, levels, predictions, cuts, seed=7, n=200)
    assert metrics.score_intervals(names, levels, predictions, cuts, seed=7, n=200) == first
    other = metrics.score_intervals(names, levels, predictions, cuts, seed=8, n=200)
    assert (other[0].low, other[0].high) != (first[0].low, first[0].high)
    assert other[0].value == first[0].value
    assert [r.tolist() for r in metrics.patient_resamples(names, n=5, seed=1)] == \
        [r.tolist() for r in metrics.patient_resamples(names, n=5, seed=1)]
