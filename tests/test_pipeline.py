"""The whole pipeline through its scripts: the demo on a small setting, and transform.py."""
import csv
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_script
from retina.features.files import load_features

CONFIG = 'c_128_5x5_32_ram'


@pytest.mark.slow
def test_demo_pipeline_runs_end_to_end_on_a_small_setting(tmp_path):
    out = tmp_path / 'demo'
    result = subprocess.run([sys.executable, '-m', 'retina.demo', '--out', str(out),
                             '--n_patients', '24', '--epochs', '2', '--tta', '2'],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stdout = result.stdout
    for step in ('convert.py', 'train_nn.py', 'transform.py', 'blend.py', 'ram.py'):
        assert f'$ python {step}' in stdout
    assert re.search(r'validation kappa \(best epoch of c_128_5x5_32_ram\): -?\d\.\d{4}', stdout)
    assert re.search(r'^pointing_game: ', stdout, re.M)
    submission = re.search(r'^submission: (.+)$', stdout, re.M).group(1)
    with open(submission, newline='') as f:
        rows = list(csv.DictReader(f))
    test_images = sorted(p.stem for p in (out / 'data' / 'test_tiny').glob('*.jpeg'))
    assert sorted(row['image'] for row in rows) == test_images
    assert all(row['level'] in '01234' for row in rows)
    heat_maps = re.search(r'^heat maps: (.+)$', stdout, re.M).group(1)
    assert len(list((tmp_path / heat_maps).glob(f'*_{CONFIG}.png'))) == len(test_images)
    # Run again (as after an interruption): training and features are not redone.
    again = subprocess.run([sys.executable, '-m', 'retina.demo', '--out', str(out),
                            '--n_patients', '24', '--epochs', '2', '--tta', '2'],
                           cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f'resuming {CONFIG} at epoch 3' in again.stdout
    assert 'train: already complete' in again.stdout
    assert not list((out / 'weights').glob('*.earlier-*'))


def test_transform_writes_one_row_per_image_every_5_iterations(workdir):
    run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '1', '--no_progress', cwd=workdir)
    result = run_script('transform.py', '--cnf', CONFIG, '--n_iter', '6', '--no_progress',
                        cwd=workdir)
    assert 'train:' in result.stdout and 'test:' in result.stdout
    features = workdir / 'data' / 'features'
    for split in ('train', 'test'):
        images = sorted(p.stem for p in (workdir / 'data' / f'{split}_tiny').glob('*.jpeg'))
        for n_iter in (5, 6):
            mean, names = load_features(features / f'{CONFIG}_{split}_mean_iter_{n_iter}_skip_0.npy')
            std, _ = load_features(features / f'{CONFIG}_{split}_std_iter_{n_iter}_skip_0.npy')
            assert names == images and mean.shape == (len(images), 128)
            assert (std > 0).any() and (std >= 0).all()
    plain = run_script('transform.py', '--cnf', CONFIG, '--n_iter', '1', '--test',
                       '--no_progress', cwd=workdir)
    assert 'train:' not in plain.stdout
    one, _ = load_features(features / f'{CONFIG}_test_std_iter_1_skip_0.npy')
    assert np.all(one == 0)
