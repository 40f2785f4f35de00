"""What blend.py prints: validation kappas and confusion matrices per run (and for the runs
averaged, also drawn as a PNG), the held-out test split's kappas with patient-bootstrap
intervals, and the note on eyes blended alone.  The figures themselves come from
`retina.core.metrics`."""
from dataclasses import dataclass, field

import numpy as np

from retina.core import metrics
from retina.core.errors import first_few
from retina.data.labels import lone_eyes

FIXED_THRESHOLDS = metrics.FIXED_CUTS


def note_lone_eyes(names, what, echo):
    """One line naming the eyes a per-patient blend pairs with themselves (no partner)."""
    alone = lone_eyes(names)
    if alone:
        echo(f'note: {len(alone)} of the {len(names)} {what} have no other eye of their '
             f'patient and are blended alone: {first_few(alone)}')


# ---------------------------------------------------------------- validation

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


# ---------------------------------------------------------------- the test split

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
    """The kappas of `predictions` for the test `rows`, at the fixed cut-offs and at
    `thresholds` (if given), with their intervals over the test patients."""
    test_names, test_levels = [names[i] for i in rows], levels[rows]
    cuts = thresholds if thresholds is not None else FIXED_THRESHOLDS
    fixed, fitted = metrics.bootstrap(
        test_names, lambda y, p: (metrics.kappa(y, p), metrics.kappa(y, p, cuts)),
        test_levels, predictions)
    return TestReport(test_names, len(rows), len(set(metrics.patients(test_names))), fixed,
                      fitted if thresholds is not None else None, predictions)


def echo_test(title, report, echo):
    line = (f'{title}: held-out test kappa {report.kappa} (cut-offs '
            f'{format_cuts(FIXED_THRESHOLDS)}, 95% interval over patients)')
    if report.kappa_fitted is not None:
        line += f'; {report.kappa_fitted} (the validation-fitted cut-offs)'
    echo(line + f'; {report.images} images of {report.patients} patients')
