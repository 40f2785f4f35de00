"""Gradability (retina/gradability.py): the image checks, the feature distance, and what
predict.py does with them."""
import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from conftest import SHARED_DATA, run_script
from retina import checkpoint, config as config_module, crop, gradability

RAM = 'c_128_5x5_32_ram'


def verdict(image):
    box = crop.find_eye_box_fast(image)
    converted = np.asarray(crop.crop_to_eye(image, 128, box))
    return gradability.reasons(gradability.measures(converted),
                               min(box[2] - box[0], box[3] - box[1]), 128)


def first_photo(synthetic_source):
    return Image.open(sorted((synthetic_source / 'train').glob('*.jpeg'))[0]).convert('RGB')


def test_synthetic_fundus_photographs_are_gradable(synthetic_source):
    photos = sorted((synthetic_source / 'train').glob('*.jpeg'))
    assert photos and all(verdict(crop.load_for_crop(p, 128)) == [] for p in photos)


def test_degraded_and_eyeless_images_are_called_ungradable_with_their_reason(synthetic_source):
    photo = first_photo(synthetic_source)
    assert 'too dark' in verdict(Image.eval(photo, lambda v: int(v * 0.2)))
    assert 'out of focus' in verdict(photo.filter(ImageFilter.GaussianBlur(0.02 * photo.width)))
    # (the synthetic photographs are dim in green: ×8 saturates it as ×2.5 does a real one)
    assert 'overexposed' in verdict(Image.eval(photo, lambda v: min(255, v * 8)))
    rng = np.random.default_rng(0)
    eyeless = {'black': Image.new('RGB', (300, 200)),
               'white': Image.new('RGB', (300, 200), 'white'),
               'noise': Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))}
    for name, image in eyeless.items():
        assert 'no eye found' in verdict(image), name
    assert 'too small' in verdict(photo.resize((20, 20)))


@pytest.mark.skipif(not (SHARED_DATA / 'eyepacs_raw').is_dir(), reason='no real photographs')
def test_real_photographs_are_gradable():
    photos = sorted((SHARED_DATA / 'eyepacs_raw' / 'train').glob('*.jpeg'))
    flagged = [p.name for p in photos if verdict(crop.load_for_crop(p, 128))]
    assert len(flagged) <= 0.03 * len(photos), flagged


def test_feature_stats_set_their_threshold_on_the_validation_photographs():
    rng = np.random.default_rng(0)
    train, valid = rng.normal(size=(500, 6)), rng.normal(size=(200, 6))
    bare = gradability.FeatureStats.fit(train, valid, margin=1.0)
    assert np.mean(bare.distances(valid) > bare.threshold) == pytest.approx(0.01, abs=0.006)
    stats = gradability.FeatureStats.fit(train, valid)
    assert stats.threshold == pytest.approx(gradability.FEATURE_MARGIN * bare.threshold)
    far = rng.normal(size=(50, 6)) + 8
    assert (stats.distances(far) > stats.threshold).all()
    again = gradability.FeatureStats.from_state(stats.to_state())
    np.testing.assert_allclose(again.distances(far), stats.distances(far), rtol=1e-4)


@pytest.fixture
def graded(tmp_path, synthetic_source):
    """A folder of two synthetic photographs and a black frame, and an untrained RAM net."""
    folder = tmp_path / 'photos'
    folder.mkdir()
    for path in sorted((synthetic_source / 'train').glob('*.jpeg'))[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    Image.new('RGB', (600, 400)).save(folder / 'black_left.jpeg')
    config = config_module.load(RAM)
    torch.manual_seed(0)
    weights = tmp_path / 'w.pt'
    checkpoint.save(weights, config.build_net(), config, epoch=0)
    return folder, weights


def rows_of(result):
    return {r['image']: r for r in csv.DictReader(io.StringIO(result.stdout))}


def test_predict_gives_no_level_to_an_ungradable_photograph_and_names_it(graded, tmp_path):
    folder, weights = graded
    result = run_script('predict.py', folder, '--cnf', RAM, '--weights_from', weights,
                        '--no_progress', cwd=tmp_path)
    rows = rows_of(result)
    black = rows.pop('black_left')
    assert black['gradable'] == 'no' and black['level'] == ''
    assert 'no eye found' in black['reasons'] and float(black['mean']) == float(black['mean'])
    assert all(r['gradable'] == 'yes' and r['level'] in '01234' and r['level'] for r in
               rows.values())
    notes = [line for line in result.stderr.splitlines() if 'ungradable' in line]
    assert len(notes) == 1 and 'black_left (no eye found' in notes[0], result.stderr
    anyway = rows_of(run_script('predict.py', folder, '--cnf', RAM, '--weights_from', weights,
                                '--grade_anyway', '--no_progress', cwd=tmp_path))
    assert anyway['black_left']['level'] in '01234' and anyway['black_left']['level']
    assert anyway['black_left']['gradable'] == 'no'


def test_photographs_unlike_the_training_photos_are_ungradable(graded, tmp_path):
    folder, weights = graded
    state = checkpoint.load(weights)
    config = checkpoint.config_of(state)
    width = config.build_net().output.weight.shape[1]
    tight = gradability.FeatureStats(mean=np.full(width, 1e3), precision=np.eye(width),
                                     threshold=1.0)
    state = dict(state, model={k: v.clone() for k, v in state['model'].items()},
                 feature_stats=tight.to_state())
    torch.save(state, weights)
    rows = rows_of(run_script('predict.py', folder, '--cnf', RAM, '--weights_from', weights,
                              '--no_progress', cwd=tmp_path))
    assert all('unlike the training photos' in r['reasons'] and r['level'] == ''
               for r in rows.values())


def test_training_stores_its_photographs_feature_statistics(workdir, monkeypatch):
    from retina import paths
    from retina.train import train
    monkeypatch.chdir(workdir)
    train(config_module.load(RAM), device='cpu', progress=False, max_epochs=1,
          echo=lambda *a, **k: None)
    state = checkpoint.load(workdir / paths.best_kappa_weights(RAM))
    stats = gradability.FeatureStats.from_state(state['feature_stats'])
    # one mean per level with at least MIN_LEVEL_PHOTOS training photographs
    assert stats.threshold > 0 and stats.mean.ndim == 2
    assert stats.mean.shape[1] == stats.precision.shape[0] and 1 <= len(stats.mean) <= 5


def test_feature_distance_is_to_the_nearest_level():
    """A severe eye is measured against the severe eyes the net trained on, not taken for a bad
    photograph because it is far from the mass of healthy ones."""
    rng = np.random.default_rng(0)
    shift = np.array([10, 0, 0, 0, 0, 0])  # severe eyes: 1% of the training photographs
    train = np.concatenate([rng.normal(0, 1, (990, 6)), rng.normal(0, 1, (10, 6)) + shift])
    levels = np.array([0] * 990 + [4] * 10)
    valid = rng.normal(0, 1, (210, 6))
    pooled = gradability.FeatureStats.fit(train, valid)
    by_level = gradability.FeatureStats.fit(train, valid, train_levels=levels)
    new_severe = rng.normal(0, 1, (200, 6)) + shift
    new_healthy = rng.normal(0, 1, (200, 6))
    rate = lambda stats, x: np.mean(stats.distances(x) > stats.threshold)
    assert rate(pooled, new_severe) > rate(pooled, new_healthy) + 0.1  # the old rule's fault
    assert rate(by_level, new_severe) <= rate(by_level, new_healthy) + 0.02
    assert rate(by_level, rng.normal(0, 1, (50, 6)) + 30).min() == 1.0  # still refuses the foreign
    restored = gradability.FeatureStats.from_state(by_level.to_state())
    assert np.allclose(restored.distances(new_severe), by_level.distances(new_severe), rtol=1e-4)
