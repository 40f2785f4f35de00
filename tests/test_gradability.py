"""Gradability (retina/data/gradability.py): the image checks, the feature distance, and what
predict.py does with them."""
import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from conftest import SHARED_DATA, run_script
from retina.data import crop, gradability
from retina.model import checkpoint, feature_stats
from retina.model import config as config_module

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


def test_a_cut_through_the_fundus_is_part_of_the_eye_even_when_its_mask_is_nearly_symmetric(
        synthetic_source):
    """edge_asymmetry: how much more of one side of the square than of the opposite side is
    eye.  A left or top half and quarters of the photograph are 'part of the eye'; so are
    measures whose mirror symmetry passes but whose cut edge does not; the whole eye, turned
    or flipped, is not."""
    photo = first_photo(synthetic_source)
    width, height = photo.size

    def measured(image):
        box = crop.find_eye_box_fast(image)
        return gradability.measures(np.asarray(crop.crop_to_eye(image, 128, box)))

    whole = measured(photo)
    assert whole['edge_asymmetry'] < 0.2
    for turned in (photo.rotate(90, expand=True), photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM)):
        assert measured(turned)['edge_asymmetry'] < 0.2
    for box in ((0, 0, width // 2, height), (0, 0, width, height // 2),
                (0, 0, width // 2, height // 2), (width // 2, height // 2, width, height)):
        part = photo.crop(box)
        assert measured(part)['edge_asymmetry'] > gradability.MAX_EDGE_ASYMMETRY, box
        assert measured(part)['widest_inside'] < gradability.MIN_WIDEST_INSIDE, box
        assert 'part of the eye' in verdict(part), box
    symmetric_but_cut = dict(whole, symmetry=0.9, edge_asymmetry=0.8, widest_inside=0.0)
    assert 'part of the eye' in gradability.reasons(symmetric_but_cut, 1000, 128)
    # the same cut with the eye widest well inside the square is the camera frame's: graded
    frame_cut = dict(symmetric_but_cut, widest_inside=0.3)
    assert 'part of the eye' not in gradability.reasons(frame_cut, 1000, 128)
    assert 'part of the eye' not in gradability.reasons(dict(whole, symmetry=0.9), 1000, 128)


def test_a_field_cut_by_the_frame_with_a_dim_last_row_is_not_part_of_the_eye(synthetic_source):
    """A whole field cut by the frame at the top and the bottom (as many a camera's is) whose
    last rows fade to black: the box's last row is the dim fringe, no eye, while the first is
    the cut, 60% eye.  One row per side read that as a cut through the fundus (0.61, over the
    0.6 the check had); the outer EDGE_BAND rows read both sides alike."""
    photo = first_photo(synthetic_source)
    box = crop.find_eye_box_fast(photo)
    cut = (box[3] - box[1]) // 10
    field = photo.crop((0, box[1] + cut, photo.size[0], box[3] - cut))
    converted = np.asarray(crop.crop_to_eye(field, 128, crop.find_eye_box_fast(field))).copy()
    converted[-1] //= 12  # the box's last row: the fringe, dimmer than the surround threshold
    eye = converted.max(axis=2) > gradability.SURROUND
    assert eye[0].mean() > 0.55 and eye[1].mean() > 0.55 and eye[-2].mean() > 0.55
    assert eye[-1].mean() == 0  # the case: both sides cut, the last row dim
    found = gradability.measures(converted)
    assert found['edge_asymmetry'] < 0.2
    assert 'part of the eye' not in gradability.reasons(found, 1000, 128)


def test_a_whole_field_whose_top_the_frame_cut_off_is_graded_but_its_top_half_is_not(
        synthetic_source):
    """The camera's frame cuts a cap off the top of the field (as in many an eyepacs256
    photograph): the square has a straight cut at the top and none at the bottom, as a half
    has, but the eye is widest well inside the square, not at the cut.  Graded; the top half
    of the same photograph, widest at its cut, is part of the eye."""
    photo = first_photo(synthetic_source)
    box = crop.find_eye_box_fast(photo)
    for cap in (0.15, 0.2):
        field = photo.crop((0, box[1] + int(cap * (box[3] - box[1])), *photo.size))
        rgb = np.asarray(crop.crop_to_eye(field, 128, crop.find_eye_box_fast(field)))
        found = gradability.measures(rgb)
        assert found['edge_asymmetry'] > gradability.MAX_EDGE_ASYMMETRY, cap  # a cut edge
        assert found['widest_inside'] >= gradability.MIN_WIDEST_INSIDE, cap
        assert 'part of the eye' not in verdict(field), cap
    half = photo.crop((0, 0, photo.size[0], photo.size[1] // 2))
    assert gradability.measures(np.asarray(crop.crop_to_eye(
        half, 128, crop.find_eye_box_fast(half))))['widest_inside'] == 0.0
    assert 'part of the eye' in verdict(half)


def test_a_strong_blur_of_a_large_photograph_is_out_of_focus_as_predict_py_checks_it(
        synthetic_source, tmp_path):
    """predict.py judges the focus on the eye decoded at 512 px and at 128 px: a strong blur
    leaves the 512-px detail band to the 8-bit steps, which can pass it, but not the 128-px
    measure.  The photograph itself passes both."""
    photo = first_photo(synthetic_source)
    large = photo.resize((2 * photo.width, 2 * photo.height), Image.Resampling.LANCZOS)
    for name, image in (('sharp', large),
                        ('blurred', large.filter(ImageFilter.GaussianBlur(0.04 * large.width)))):
        path = tmp_path / f'{name}.png'
        image.save(path)
        decoded = crop.load_for_crop(path, 128)
        box = crop.find_eye_box_fast(decoded)
        rgb = np.asarray(crop.crop_to_eye(decoded, 128, box))
        found = crop.gradability_reasons(path, decoded, box, 128, rgb)
        assert ('out of focus' in found) == (name == 'blurred'), (name, found)
    fooled = dict(gradability.measures(np.asarray(crop.crop_to_eye(photo, 128))),
                  detail_focus=1.5, focus=0.3)  # the detail band all quantisation steps
    assert 'out of focus' in gradability.reasons(fooled, 1000, 128)
    assert 'out of focus' not in gradability.reasons(dict(fooled, focus=0.6), 1000, 128)


@pytest.mark.skipif(not (SHARED_DATA / 'eyepacs_raw').is_dir(), reason='no real photographs')
def test_real_photographs_are_gradable():
    photos = sorted((SHARED_DATA / 'eyepacs_raw' / 'train').glob('*.jpeg'))
    flagged = [p.name for p in photos if verdict(crop.load_for_crop(p, 128))]
    assert len(flagged) <= 0.03 * len(photos), flagged


def test_feature_stats_set_their_threshold_on_the_validation_photographs():
    rng = np.random.default_rng(0)
    train, valid = rng.normal(size=(500, 6)), rng.normal(size=(200, 6))
    bare = feature_stats.FeatureStats.fit(train, valid, margin=1.0)
    assert np.mean(bare.distances(valid) > bare.threshold) == pytest.approx(0.01, abs=0.006)
    stats = feature_stats.FeatureStats.fit(train, valid)
    assert stats.threshold == pytest.approx(feature_stats.FEATURE_MARGIN * bare.threshold)
    far = rng.normal(size=(50, 6)) + 8
    assert (stats.distances(far) > stats.threshold).all()
    again = feature_stats.FeatureStats.from_state(stats.to_state())
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
    tight = feature_stats.FeatureStats(mean=np.full(width, 1e3), precision=np.eye(width),
                                     threshold=1.0)
    state = dict(state, model={k: v.clone() for k, v in state['model'].items()},
                 feature_stats=tight.to_state())
    torch.save(state, weights)
    rows = rows_of(run_script('predict.py', folder, '--cnf', RAM, '--weights_from', weights,
                              '--no_progress', cwd=tmp_path))
    assert all('unlike the training photos' in r['reasons'] and r['level'] == ''
               for r in rows.values())


def test_training_stores_its_photographs_feature_statistics(workdir, monkeypatch):
    from retina.core import paths
    from retina.train.loop import train
    monkeypatch.chdir(workdir)
    train(config_module.load(RAM), device='cpu', progress=False, max_epochs=1,
          echo=lambda *a, **k: None)
    state = checkpoint.load(workdir / paths.best_kappa_weights(RAM))
    stats = feature_stats.FeatureStats.from_state(state['feature_stats'])
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
    pooled = feature_stats.FeatureStats.fit(train, valid)
    by_level = feature_stats.FeatureStats.fit(train, valid, train_levels=levels)
    new_severe = rng.normal(0, 1, (200, 6)) + shift
    new_healthy = rng.normal(0, 1, (200, 6))
    rate = lambda stats, x: np.mean(stats.distances(x) > stats.threshold)
    assert rate(pooled, new_severe) > rate(pooled, new_healthy) + 0.1  # the old rule's fault
    assert rate(by_level, new_severe) <= rate(by_level, new_healthy) + 0.02
    assert rate(by_level, rng.normal(0, 1, (50, 6)) + 30).min() == 1.0  # still refuses the foreign
    restored = feature_stats.FeatureStats.from_state(by_level.to_state())
    assert np.allclose(restored.distances(new_severe), by_level.distances(new_severe), rtol=1e-4)


def test_compressed_grey_foreign_and_partial_photographs_are_ungradable(graded, tmp_path):
    """Issue 29, rows 1, 2 and 6 through predict.py: a photograph re-saved at JPEG quality 5 or
    10 (as a JPEG, and as a PNG that keeps the blocks), grayscale (8- and 16-bit), an icon-like
    drawing alone and on a black frame, and a quarter of the eye are ungradable, each with its
    reason; the photograph itself and a rotated copy (the nets train on rotations of 0-360°)
    are graded."""
    folder, weights = graded
    photo = Image.open(sorted(folder.glob('*.jpeg'))[0]).convert('RGB')
    cases = tmp_path / 'cases'
    cases.mkdir()
    photo.save(cases / 'as_is.png')
    photo.rotate(90, expand=True).save(cases / 'rotated.png')
    photo.save(cases / 'q5.jpeg', quality=5)
    photo.save(cases / 'q10.jpeg', quality=10)
    buffer = io.BytesIO()
    photo.save(buffer, 'JPEG', quality=5)
    Image.open(buffer).convert('RGB').save(cases / 'q5_as_png.png')
    photo.convert('L').save(cases / 'grey8.png')
    Image.fromarray(np.asarray(photo.convert('L'), dtype=np.uint16) * 257).save(cases / 'grey16.png')
    width, height = photo.size
    photo.crop((0, 0, width // 2, height // 2)).resize((width, height)).save(cases / 'quarter.png')
    icon = Image.new('RGB', (600, 400))
    draw = ImageDraw.Draw(icon)
    draw.rounded_rectangle((150, 60, 450, 340), 30, fill=(150, 150, 160))
    draw.rectangle((180, 260, 420, 300), fill=(60, 60, 70))
    draw.ellipse((380, 270, 395, 285), fill=(40, 200, 40))
    icon.save(cases / 'icon.png')
    frame = Image.new('RGB', (1536, 1024))
    frame.paste(icon.resize((900, 600)), (318, 212))
    frame.save(cases / 'icon_on_black.png')
    rows = rows_of(run_script('predict.py', cases, '--cnf', RAM, '--weights_from', weights,
                              '--no_progress', cwd=tmp_path))
    expected = {'q5': 'heavily compressed', 'q10': 'heavily compressed',
                'q5_as_png': 'heavily compressed', 'grey8': 'grayscale', 'grey16': 'grayscale',
                'quarter': 'part of the eye', 'icon': 'not a photograph',
                'icon_on_black': 'not a photograph'}
    for name, reason in expected.items():
        assert rows[name]['gradable'] == 'no' and rows[name]['level'] == '', name
        assert reason in rows[name]['reasons'], (name, rows[name]['reasons'])
    for name in ('as_is', 'rotated'):
        assert rows[name]['gradable'] == 'yes' and rows[name]['reasons'] == '', rows[name]


def test_a_grade_that_moves_under_mild_re_encoding_is_not_given(graded, tmp_path, monkeypatch):
    """The stability check: each photograph is re-saved at JPEG quality 75 and scored
    again; a level that moves by more than one is not given ('unstable under re-encoding')."""
    from retina.grade import grader as grader_module, photos as photos_module, predict
    assert photos_module.unstable(0.2, 2.6, (0.5, 1.5, 2.5, 3.5))
    assert not photos_module.unstable(0.2, 1.4, (0.5, 1.5, 2.5, 3.5))
    folder, weights = graded
    grader = grader_module.load_grader(RAM, weights)
    photos = [photos_module.prepare_photo(p, {(grader.crop_size, grader.preprocessing)},
                                          stability=True)
              for p in sorted(folder.glob('*_*.jpeg'))[:2]]
    key = (grader.crop_size, grader.preprocessing)
    assert not np.array_equal(photos[0].resaved[key], photos[0].converted[key])
    out = grader_module.score_batch(grader, photos, 1)
    again = grader_module.score_batch(grader, [photos_module.Photo(
        path=p.path, name=p.name, converted={key: p.resaved[key]}, boxes=p.boxes, images={})
        for p in photos], 1)
    assert np.allclose(out.resaved, again.scores, atol=1e-5)  # the re-saved copy's own score
    monkeypatch.setattr(predict, 'unstable', lambda *args: True)
    result = predict.grade([grader], [folder], progress=False, check_stability=True)
    assert all(predict.UNSTABLE in row['reasons'] and row['level'] is None for row in result.rows)
    result = predict.grade([grader], [folder], progress=False)  # off by default
    assert not any(predict.UNSTABLE in row['reasons'] for row in result.rows)


def dim_margin(rgb, level=(36, 3, 30), seed=0):
    """`rgb` (a converted photograph) with its black surround replaced by a dim, even, noisy
    margin, as eyepacs256's photographs arrived (30-40 of 255 in the brightest channel)."""
    noise = np.random.default_rng(seed).normal(0, 5, rgb.shape)
    surround = rgb.max(axis=2) <= gradability.SURROUND
    out = rgb.astype(np.float64)
    out[surround] = (np.array(level) + noise)[surround]
    return np.clip(out, 0, 255).round().astype(np.uint8)


def test_a_photograph_with_a_dim_even_margin_is_measured_against_its_own_surround(
        synthetic_source, graded, tmp_path):
    """A square photograph whose surround is a dim margin, not black: the fixed threshold
    took the margin for eye (the whole square: 'no eye found'); measured against the corners'
    own level, the eye is the disc it is, and predict.py grades it.  A dim square with no eye
    in it is still no eye."""
    photo = first_photo(synthetic_source)
    converted = np.asarray(crop.crop_to_eye(photo, 256, crop.find_eye_box_fast(photo)))
    margin = dim_margin(converted)
    assert (margin.max(axis=2) > gradability.SURROUND).mean() > 0.985  # the case
    plain, found = gradability.measures(converted), gradability.measures(margin)
    assert abs(found['fill'] - plain['fill']) < 0.04  # the eye's dim rim is under the margin's level
    assert gradability.reasons(found, 1000, 256) == [], (found, plain)
    grey = np.full((256, 256, 3), 40, np.uint8)
    assert 'no eye found' in gradability.reasons(gradability.measures(grey), 1000, 256)

    folder, weights = graded
    Image.fromarray(margin).save(folder / 'margin_left.jpeg', quality=95)
    rows = rows_of(run_script('predict.py', folder, '--cnf', RAM, '--weights_from', weights,
                              '--no_progress', cwd=tmp_path))
    assert rows['margin_left']['gradable'] == 'yes' and rows['margin_left']['level'], rows
