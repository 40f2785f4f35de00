"""The blend's submission: `image,level` rows (with --scores a third column, the continuous
prediction) and, beside them, the fitted blend that predict.py --blend applies."""
import csv
import io
from dataclasses import dataclass
from pathlib import Path

from retina.blend import fitted as fitted_blend
from retina.core import atomic, metrics, paths
from retina.data.images import csv_safe


@dataclass
class Submission:
    """What blend.py --predict wrote."""
    path: Path            # the image,level CSV
    fitted_blend: Path    # the fitted blend beside it (`paths.fitted_blend`), for predict.py
    thresholds: tuple     # the cut-offs its levels were cut at
    predictions: dict     # {image: the runs' averaged continuous prediction}


def submission_path(output=None):
    """Where the submission goes (`output`, else `paths.submission()`), checked to be writable:
    called before the first fit, so that a bad path fails at once."""
    path = Path(output) if output is not None else paths.submission()
    atomic.check_writable(path)
    return path


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


def submit(path, names, predictions, thresholds, fitted_runs, per_patient, replace=True,
           scores=False):
    """Cut `predictions` (one per name) into levels at `thresholds`, write the submission to
    `path` (`write_submission`) and the fitted blend of `fitted_runs` beside it."""
    written = write_submission(path, names, metrics.to_levels(predictions, thresholds),
                               replace=replace, scores=predictions if scores else None)
    saved = fitted_blend.save(paths.fitted_blend(written), fitted_runs, per_patient, thresholds)
    return Submission(written, saved, tuple(thresholds), dict(zip(names, predictions.tolist())))
