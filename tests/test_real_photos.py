"""Issue 10: cross-camera preprocessing, folder identity (resume, features, image size),
and the real-photograph set where ../shared is present."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA, run_script
from retina import checkpoint, config as config_module, preprocess
from retina.crop import convert_folder

CONFIG = 'c_128_5x5_32_ram'


def converted(photo):
    """A synthetic photograph (the generator's raw camera look), cropped like convert.py."""
    from retina.crop import crop_to_eye
    with Image.open(photo) as image:
        return np.asarray(crop_to_eye(image.convert('RGB'), 128))


def test_local_contrast_gives_one_look_and_barely_changes_its_own_output(synthetic_source):
    photos = sorted((synthetic_source / 'train').iterdir())[:4]
    for photo in photos:
        rgb = converted(photo)
        once = preprocess.apply(rgb, 'local_contrast')
        twice = preprocess.apply(once, 'local_contrast')
        eye = preprocess.fundus_mask(rgb)
        # the surround stays black, the eye keeps its outline
        assert (once[~eye] == 0).all() and (once[eye] >= 1).all()
        assert (preprocess.fundus_mask(once) == eye).mean() > 0.99
        # each channel is centred on grey with the chosen spread: the camera's colours are gone
        for c in range(3):
            values = once[..., c][eye].astype(float)
            assert abs(values.mean() - 128) < 6
            assert abs(values.std() - preprocess.SPREAD) < 0.25 * preprocess.SPREAD  # dark clipped
        first_change = np.abs(once.astype(int) - rgb).mean()
        second_change = np.abs(twice.astype(int) - once).mean()
        assert second_change < 0.2 * first_change and second_change < 6


def test_a_folder_never_mixes_looks_and_later_stages_refuse_the_other_look(synthetic_source,
                                                                            tmp_path):
    out = tmp_path / 'data' / 'train_tiny'
    run_script('convert.py', '--directory', synthetic_source / 'train', '--convert_directory',
               out, '--crop_size', 128, '--extension', 'png', '--enhance', 'local_contrast',
               '--no_progress', cwd=tmp_path)
    assert json.loads((out / 'conversion.json').read_text()) == dict(crop_size=128,
                                                                      enhance='local_contrast')
    plain = run_script('convert.py', '--directory', synthetic_source / 'train',
                       '--convert_directory', out, '--crop_size', 128, '--extension', 'png',
                       '--no_progress', cwd=tmp_path, check=False)
    assert plain.returncode == 2 and 'Traceback' not in plain.stderr
    assert 'converted with --enhance local_contrast, not none' in plain.stderr
    # weights trained on plain images refuse the enhanced folder (transform.py, one line)
    config = config_module.load(CONFIG)
    weights = tmp_path / 'plain.pt'
    checkpoint.save(weights, model=config.build_net(), config=config, epoch=0,
                    preprocessing='none')
    refused = run_script('transform.py', '--cnf', CONFIG, '--train', '--train_dir', out,
                         '--weights_from', weights, '--no_progress', cwd=tmp_path, check=False)
    assert refused.returncode == 2 and 'Traceback' not in refused.stderr
    assert 'trained on --enhance none images' in refused.stderr
    assert 'convert.py without --enhance' in refused.stderr
    # weights trained on enhanced images accept it, in ram.py as in transform.py
    enhanced = tmp_path / 'enhanced.pt'
    checkpoint.save(enhanced, model=config.build_net(), config=config, epoch=0,
                    preprocessing='local_contrast')
    for script in ('transform.py', 'ram.py'):
        run_script(script, '--cnf', CONFIG, *(('--train', '--train_dir', out) if script ==
                                              'transform.py' else ('--images', out)),
                   '--weights_from', enhanced, '--no_progress', cwd=tmp_path)
    refused = run_script('ram.py', '--cnf', CONFIG, '--images', out, '--weights_from', weights,
                         '--no_progress', cwd=tmp_path, check=False)
    assert refused.returncode == 2 and 'trained on --enhance none images' in refused.stderr


def test_resume_keeps_the_runs_folders_and_refuses_a_changed_config(workdir):
    """Also: checkpoints record the look of the folder they were trained on."""
    labels = workdir / 'data' / 'trainLabels.csv'
    other = workdir / 'other'
    convert_folder(workdir / 'data' / 'train_tiny', other / 'images', 128, 'png', n_proc=1,
                   progress=False, enhance='local_contrast')
    shutil.copy(labels, other / 'labels.csv')
    labels.write_text('image,level\n')  # the config's own labels: useless, must not be read
    run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '1', '--no_progress',
               '--train_dir', other / 'images', '--labels', other / 'labels.csv', cwd=workdir)
    resumed = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '2', '--no_progress',
                         '--resume', cwd=workdir)
    assert 'epoch    2' in resumed.stdout and str(other / 'images') in resumed.stdout
    saved = json.loads((workdir / 'weights' / CONFIG / 'config.json').read_text())
    assert saved['cnf']['train_dir'] == str(other / 'images')
    # the checkpoints record the training folder's look, for transform/ram/predict to check
    assert checkpoint.load(workdir / 'weights' / CONFIG / 'last.pt')['preprocessing'] == \
        'local_contrast'

    elsewhere = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '3', '--no_progress',
                           '--resume', '--train_dir', workdir / 'data' / 'train_tiny',
                           cwd=workdir, check=False)
    assert elsewhere.returncode == 2 and 'Traceback' not in elsewhere.stderr
    assert 'train_dir' in elsewhere.stderr and 'started with other settings' in elsewhere.stderr

    (workdir / 'configs').mkdir()
    (workdir / 'configs' / f'{CONFIG}.py').write_text(
        f'from configs.{CONFIG} import cnf as base, layers\n'
        f'cnf = dict(base, sigma=0.1, batch_size_train=64)\n')
    edited = run_script('train_nn.py', '--cnf', f'configs/{CONFIG}.py', '--max_epochs', '3',
                        '--no_progress', '--resume', cwd=workdir, check=False)
    assert edited.returncode == 2 and 'Traceback' not in edited.stderr
    assert 'batch_size_train 128 -> 64' in edited.stderr and 'sigma 0.5 -> 0.1' in edited.stderr


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


def test_images_larger_than_the_config_expects_are_refused(workdir):
    big = workdir / 'data' / 'big'
    big.mkdir()
    for photo in sorted((workdir / 'data' / 'train_tiny').glob('*.jpeg')):
        Image.open(photo).resize((256, 256)).save(big / photo.name)
    result = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '1', '--no_progress',
                        '--train_dir', big, cwd=workdir, check=False)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'images are 256 px but c_128_5x5_32_ram expects 128 px' in result.stderr
    assert 'convert.py --crop_size 128' in result.stderr


@pytest.mark.skipif(not (SHARED_DATA / 'eyepacs_raw' / 'train').is_dir(),
                    reason='real photographs (../shared/data) not present')
def test_raw_and_enhanced_real_photographs_meet_in_one_look(tmp_path):
    """Raw camera photos and the publisher-enhanced eyepacs256 differ in colour by tens of
    grey levels; after local_contrast their channel statistics agree."""
    means = {}
    for name in ('eyepacs_raw', 'eyepacs256'):
        folder = tmp_path / name
        photos = sorted((SHARED_DATA / name / 'train').glob('*.jpeg'))[:6]
        (tmp_path / f'{name}_in').mkdir()
        for photo in photos:
            shutil.copy(photo, tmp_path / f'{name}_in' / photo.name)
        for look in ('none', 'local_contrast'):
            convert_folder(tmp_path / f'{name}_in', folder / look, 128, 'png', n_proc=1,
                           progress=False, enhance=look)
            stack = np.stack([np.asarray(Image.open(p)) for p in sorted((folder / look).glob('*.png'))])
            eye = stack.max(axis=3) > 0
            means[name, look] = np.array([stack[..., c][eye].mean() for c in range(3)])
    plain_gap = np.abs(means['eyepacs_raw', 'none'] - means['eyepacs256', 'none']).max()
    enhanced_gap = np.abs(means['eyepacs_raw', 'local_contrast']
                          - means['eyepacs256', 'local_contrast']).max()
    assert enhanced_gap < 3 and enhanced_gap < plain_gap / 4


def test_ram_output_dir_inside_an_image_folder_is_refused(workdir):
    config = config_module.load(CONFIG)
    checkpoint.save(workdir / 'weights' / CONFIG / 'weights.pt', model=config.build_net(),
                    config=config, epoch=0)
    images = workdir / 'data' / 'test_tiny'
    before = sorted(p.name for p in images.iterdir())
    result = run_script('ram.py', '--cnf', CONFIG, '--images', images, '--output_dir',
                        images / 'maps', '--no_progress', cwd=workdir, check=False)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'is inside the input folder' in result.stderr
    assert sorted(p.name for p in images.iterdir()) == before
