"""convert.py --enhance and retina.data.preprocess: one preprocessing per folder, across cameras;
later stages refuse images of another preprocessing."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA, run_script
from retina.core.errors import UserError
from retina.data import preprocess
from retina.data.conversion import convert_folder
from retina.model import checkpoint
from retina.model import config as config_module

CONFIG = 'c_128_5x5_32_ram'


def converted(photo):
    """A synthetic photograph (the generator's raw camera look), cropped like convert.py."""
    from retina.data.crop import crop_to_eye
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
    assert json.loads((out / 'conversion.json').read_text()) == dict(
        crop_size=128, preprocessing='local_contrast')
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
                           progress=False, preprocessing=look)
            stack = np.stack([np.asarray(Image.open(p)) for p in sorted((folder / look).glob('*.png'))])
            eye = stack.max(axis=3) > 0
            means[name, look] = np.array([stack[..., c][eye].mean() for c in range(3)])
    plain_gap = np.abs(means['eyepacs_raw', 'none'] - means['eyepacs256', 'none']).max()
    enhanced_gap = np.abs(means['eyepacs_raw', 'local_contrast']
                          - means['eyepacs256', 'local_contrast']).max()
    assert enhanced_gap < 3 and enhanced_gap < plain_gap / 4


def test_a_conversion_record_of_the_earlier_name_still_reads(tmp_path):
    """Folders converted before the record said `preprocessing` said `enhance`."""
    (tmp_path / 'conversion.json').write_text('{"crop_size": 128, "enhance": "local_contrast"}')
    assert preprocess.folder_preprocessing(tmp_path) == 'local_contrast'
    (tmp_path / 'conversion.json').write_text('{"crop_size": 128, "enhance": "sharpen"}')
    with pytest.raises(UserError, match='not a conversion record'):
        preprocess.folder_preprocessing(tmp_path)
