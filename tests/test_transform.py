"""transform.py and retina.features.extract: killed runs, features of other weights or folders, missing
folders, two extractions at once."""
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import kill_when, one_line_error, run_script, start
from retina.core import lock, paths
from retina.model import checkpoint
from retina.model import config as config_module

CONFIG = 'c_128_5x5_32_ram'


def _features(folder):
    return sorted(p for p in (folder / 'data' / 'features').glob('*.npy'))


def test_transform_killed_leaves_no_partial_file_and_a_rerun_completes(workdir, tmp_path):
    """Killed as soon as its first save (iteration 5 of 12) is on disk: what it left loads,
    and a rerun continues to the features of an uninterrupted run."""
    run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '1', '--no_progress',
               cwd=workdir)
    command = ['transform.py', '--cnf', CONFIG, '--n_iter', '12', '--train', '--no_progress']
    reference = tmp_path / 'reference'
    shutil.copytree(workdir, reference, ignore=shutil.ignore_patterns('cache'))
    run_script(*command, cwd=reference)
    first_save = workdir / 'data' / 'features' / f'{CONFIG}_train_std_iter_5_skip_0.npy'
    code = kill_when(start(command, workdir), first_save.is_file)
    assert code == -signal.SIGKILL, 'transform.py ended before the kill'
    from retina.features.files import load_features
    for path in _features(workdir):
        load_features(path)
    assert not (workdir / 'data' / 'features' / f'{CONFIG}_train_mean_iter_12_skip_0.npy').exists()
    run_script(*command, cwd=workdir)
    for stat in ('mean', 'std'):
        name = f'{CONFIG}_train_{stat}_iter_12_skip_0.npy'
        ours = np.load(workdir / 'data' / 'features' / name)
        theirs = np.load(reference / 'data' / 'features' / name)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_transform_never_continues_from_features_of_other_weights(workdir):
    config = config_module.load(CONFIG)
    first = workdir / 'first.pt'
    for seed, path in ((0, first), (1, workdir / 'weights' / CONFIG / 'weights.pt')):
        torch.manual_seed(seed)  # two different (untrained) nets
        checkpoint.save(path, model=config.build_net(), config=config, epoch=0)
    command = ['transform.py', '--cnf', CONFIG, '--train', '--no_progress']
    run_script(*command, '--n_iter', '5', '--weights_from', first, cwd=workdir)
    mixed = run_script(*command, '--n_iter', '10', cwd=workdir)
    assert 'came from other weights' in mixed.stdout and 'continuing' not in mixed.stdout
    name = f'{CONFIG}_train_mean_iter_10_skip_0.npy'
    ours = np.load(workdir / 'data' / 'features' / name)
    run_script(*command, '--n_iter', '10', '--restart', cwd=workdir)
    np.testing.assert_allclose(ours, np.load(workdir / 'data' / 'features' / name), atol=1e-5)
    again = run_script(*command, '--n_iter', '15', cwd=workdir)
    assert 'continuing from iteration 10' in again.stdout
    final = workdir / 'data' / 'features' / f'{CONFIG}_train_mean_iter_15_skip_0.npy'
    before = final.stat().st_mtime_ns
    done = run_script(*command, '--n_iter', '15', cwd=workdir)
    assert 'already complete' in done.stdout and final.stat().st_mtime_ns == before


def test_features_of_another_tta_sequence_are_not_continued_and_the_sequence_is_recorded(
        workdir):
    import json
    config = config_module.load(CONFIG)
    checkpoint.save(workdir / 'weights' / CONFIG / 'weights.pt', model=config.build_net(),
                    config=config, epoch=0)
    command = ['transform.py', '--cnf', CONFIG, '--train', '--no_progress']
    run_script(*command, '--n_iter', '5', '--tta_sequence', 'halton', cwd=workdir)
    source = workdir / 'data' / 'features' / f'{CONFIG}_train_source_iter_5_skip_0.json'
    recorded = json.loads(source.read_text())
    assert recorded['sequence'] == 'halton' and recorded['hold_out'] is None
    default = run_script(*command, '--n_iter', '10', cwd=workdir)
    assert 'made with the halton TTA sequence, this run with scrambled' in default.stdout
    assert 'continuing' not in default.stdout
    again = run_script(*command, '--n_iter', '15', cwd=workdir)  # the same (default) sequence
    assert 'continuing from iteration 10' in again.stdout


def test_empty_or_missing_test_folder(workdir):
    config = config_module.load(CONFIG)  # untrained weights will do
    checkpoint.save(workdir / 'weights' / CONFIG / 'weights.pt', model=config.build_net(),
                    config=config, epoch=0)
    (workdir / 'empty').mkdir()
    result = run_script('transform.py', '--cnf', CONFIG, '--test', '--test_dir', 'empty',
                        cwd=workdir, check=False)
    one_line_error(result, 'empty', 'no images found')
    result = run_script('transform.py', '--cnf', CONFIG, '--test', '--test_dir', 'nowhere',
                        cwd=workdir, check=False)
    one_line_error(result, 'nowhere', 'no such folder')


def test_two_feature_extractions_of_one_config_and_split_exclude_each_other(tmp_path,
                                                                          monkeypatch):
    from retina.features.extract import extract_features
    monkeypatch.chdir(tmp_path)
    config = config_module.load(CONFIG)
    with lock.hold(paths.features_lock(CONFIG, 'test', 0), 'first'):
        with pytest.raises(lock.Busy, match=f'the test features of {CONFIG} .* in use by pid'):
            extract_features(config, None, tmp_path, 'test')
    assert not (tmp_path / 'data').exists()


def test_transform_never_reuses_features_of_another_folder_with_the_same_names(workdir):
    config = config_module.load(CONFIG)
    weights = workdir / 'weights' / CONFIG / 'weights.pt'
    checkpoint.save(weights, model=config.build_net(), config=config, epoch=0)
    copy = workdir / 'data' / 'copy'
    shutil.copytree(workdir / 'data' / 'train_tiny', copy)
    first = sorted(copy.glob('*.jpeg'))[0]
    pixels = np.asarray(Image.open(first)).copy()
    pixels[40:80, 40:80] = 255
    Image.fromarray(pixels).save(first, quality=97)
    command = ['transform.py', '--cnf', CONFIG, '--train', '--n_iter', '1', '--no_progress']
    run_script(*command, cwd=workdir)
    name = workdir / 'data' / 'features' / f'{CONFIG}_train_mean_iter_1_skip_0.npy'
    ours = np.load(name)
    other = run_script(*command, '--train_dir', copy, cwd=workdir)
    assert 'already complete' not in other.stdout and 'came from other images' in other.stdout
    assert not np.allclose(np.load(name), ours)


def test_transform_warns_when_the_folder_is_stored_otherwise_than_the_nets_training_images(
        workdir):
    """A net trained on lossless images ('none') given a folder of convert.py's JPEGs (and the
    other way round): transform.py names the folder and the fix (its features and a blend fitted
    on them would differ from those of its training images); a net trained on convert.py's
    JPEGs ('jpeg97'), or one whose checkpoint does not say, says nothing there."""
    config = config_module.load(CONFIG)
    weights = workdir / 'weights' / CONFIG / 'weights.pt'
    command = ['transform.py', '--cnf', CONFIG, '--train', '--no_progress', '--n_iter', '1']
    checkpoint.save(weights, model=config.build_net(), config=config, epoch=0, encoding='none')
    warned = run_script(*command, cwd=workdir)
    assert 'warning:' in warned.stdout and 'stored as JPEG (quality 97)' in warned.stdout
    assert 'convert.py --extension tiff' in warned.stdout
    assert str(config.cnf['train_dir']).rstrip('/') in warned.stdout
    checkpoint.save(weights, model=config.build_net(), config=config, epoch=0, encoding='jpeg97')
    assert 'warning:' not in run_script(*command, '--restart', cwd=workdir).stdout
    checkpoint.save(weights, model=config.build_net(), config=config, epoch=0)  # unrecorded
    assert 'warning:' not in run_script(*command, '--restart', cwd=workdir).stdout
