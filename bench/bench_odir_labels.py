#!/usr/bin/env python
"""ODIR-5K's labels: how a grader scores the eyes that python -m retina.datasets odir calls
level 0 because they have other diseases and no sign of DR, beside normal fundi and each DR
stage (the measurement behind its default --other_diseases level0).

    python bench/bench_odir_labels.py SNAPSHOT [--weights_from eyepacs-256] [--per_group 120]

SNAPSHOT is the ODIR-5K clone or bare repository.  Eyes of the test split only
(retina.data.labels.held_out at 0.15, as train_nn.py --hold_out 0.15), --per_group of each group,
graded by predict.py.  Per group: the mean score [95% interval over patients], the share
graded level 1 or more and level 2 or more (referable), and the share called ungradable.
"""
import csv
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from retina.core import metrics  # noqa: E402
from retina.data.datasets import (HARMLESS, NORMAL, _odir_eyes, _Snapshot,  # noqa: E402
                                  odir_level)
from retina.data.labels import held_out  # noqa: E402


def group_of(words):
    words = set(words)
    level, why = odir_level(words)
    if why:
        return None
    if level:
        return f'DR level {level}'
    return 'normal fundus' if not (words - {NORMAL} - HARMLESS) else 'other diseases, no DR'


@click.command()
@click.argument('snapshot', type=click.Path(exists=True, file_okay=False))
@click.option('--weights_from', default='eyepacs-256', show_default=True)
@click.option('--per_group', default=120, show_default=True)
def main(snapshot, weights_from, per_group):
    source = _Snapshot(snapshot)
    eyes = _odir_eyes(source.labels_text(), snapshot)
    groups = {}
    for file_name, words in eyes.items():
        group = group_of(words)
        if group and held_out(f'odir{Path(file_name).stem}', 0.15):
            groups.setdefault(group, []).append(file_name)
    lines = ['| ODIR-5K test split | eyes | mean score [95% CI] | level ≥ 1 | level ≥ 2 | '
             'ungradable |', '| --- | ---: | ---: | ---: | ---: | ---: |']
    for group in sorted(groups):
        chosen = sorted(groups[group])[:per_group]
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in source.photographs(set(chosen)):
                (Path(tmp) / name).write_bytes(data)
            result = subprocess.run([sys.executable, str(REPO / 'predict.py'), tmp,
                                     '--weights_from', weights_from], capture_output=True,
                                    text=True, cwd=REPO)
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        graded = [r for r in rows if r['gradable'] == 'yes']
        scores = np.array([float(r['mean']) for r in graded])
        levels = np.array([int(r['level']) for r in graded])
        mean = metrics.bootstrap([r['image'] for r in graded], np.mean, scores)
        lines.append(f'| {group} | {len(rows)} | {mean.value:.2f} [{mean.low:.2f}, '
                     f'{mean.high:.2f}] | {np.mean(levels >= 1):.0%} | '
                     f'{np.mean(levels >= 2):.0%} | {1 - len(graded) / len(rows):.0%} |')
        print(lines[-1], flush=True)
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
