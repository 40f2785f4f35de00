"""Tests for the synthetic fundus generator: layout, labels, determinism, masks, looks and CLI."""
import csv
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retina.core.errors import UserError
from retina.data.synthetic import LEVEL_FRACTIONS, MARKER_FILE, generate, image_rng, make_fundus
from retina.data.synthetic import plan_images

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(width=192, height=128)
NAME_PATTERN = re.compile(r'^(\d+)_(left|right)$')


def read_labels(path):
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['image', 'level']
    return {name: int(level) for name, level in rows[1:]}, [name for name, _ in rows[1:]]


def lesion_area(mask):
    return int((np.asarray(mask) > 0).sum())


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('synthetic')
    summary = generate(out_dir, n_patients=20, seed=1, progress=False, **SMALL)
    return out_dir, summary


def test_layout_and_label_files(dataset):
    out_dir, summary = dataset
    for split in ('train', 'test'):
        labels, order = read_labels(out_dir / f'{split}Labels.csv')
        photos = {p.stem for p in (out_dir / split).iterdir()}
        assert photos == set(labels), f'{split}/ and {split}Labels.csv disagree'
        assert all((out_dir / split / f'{name}.jpeg').is_file() for name in labels)
        assert all((out_dir / 'masks' / f'{name}.png').is_file() for name in labels)
        assert set(labels.values()) <= {0, 1, 2, 3, 4}
        keys = [(int(NAME_PATTERN.match(name)[1]), name) for name in order]
        assert keys == sorted(keys), 'labels are not sorted by patient and eye'
        assert sum(summary['splits'][split].values()) == len(labels)
    assert len(list((out_dir / 'masks').iterdir())) == summary['images']
    assert (out_dir / MARKER_FILE).is_file()
    with Image.open(next((out_dir / 'train').iterdir())) as photo:
        assert photo.format == 'JPEG'


def test_patients_eyes_and_splits(dataset):
    out_dir, summary = dataset
    eyes_by_patient = defaultdict(set)
    split_by_patient = defaultdict(set)
    for split in ('train', 'test'):
        labels, _ = read_labels(out_dir / f'{split}Labels.csv')
        for name in labels:
            match = NAME_PATTERN.match(name)
            assert match, f'{name} is not {{patient}}_{{left|right}}'
            eyes_by_patient[int(match[1])].add(match[2])
            split_by_patient[int(match[1])].add(split)
    assert set(eyes_by_patient) == set(range(1, 21))
    assert sum(len(eyes) == 1 for eyes in eyes_by_patient.values()) == 3  # 15% of 20
    assert all(len(splits) == 1 for splits in split_by_patient.values()), 'a patient is in both splits'
    assert sum(split_by_patient[p] == {'test'} for p in split_by_patient) == 5  # 25% of 20
    assert summary['images'] == 37


def test_levels_follow_the_fractions_and_eyes_agree():
    specs = plan_images(400, seed=3, one_eye_fraction=0.0, test_fraction=0.25)
    levels = defaultdict(dict)
    for spec in specs:
        levels[spec.patient][spec.eye] = spec.level
    differ = [abs(eyes['left'] - eyes['right']) for eyes in levels.values()]
    assert max(differ) <= 1
    assert 0.1 < np.mean(differ) < 0.3
    shares = np.bincount([spec.level for spec in specs], minlength=5) / len(specs)
    assert np.allclose(shares, LEVEL_FRACTIONS, atol=0.05), shares
    test_levels = [s.level for s in specs if s.split == 'test']
    assert set(test_levels) == {0, 1, 2, 3, 4}


def test_same_arguments_give_identical_files(tmp_path):
    first, second, other_seed = tmp_path / 'a', tmp_path / 'b', tmp_path / 'c'
    for folder, seed in ((first, 5), (second, 5), (other_seed, 6)):
        generate(folder, n_patients=4, seed=seed, progress=False, **SMALL)
    files = sorted(p.relative_to(first) for p in first.rglob('*') if p.is_file() and p.name != MARKER_FILE)
    assert len(files) > 8
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
    photo = next(p for p in files if p.suffix == '.jpeg')
    assert (first / photo).read_bytes() != (other_seed / photo).read_bytes()


def test_a_photo_depends_only_on_seed_patient_and_eye(dataset):
    out_dir, _ = dataset
    labels, _ = read_labels(out_dir / 'trainLabels.csv')
    name, level = next(iter(labels.items()))
    patient, eye = NAME_PATTERN.match(name).groups()
    _, mask = make_fundus(level, image_rng(1, int(patient), eye), eye=eye, **SMALL)
    with Image.open(out_dir / 'masks' / f'{name}.png') as written:
        assert np.array_equal(np.asarray(written), np.asarray(mask))


def test_written_masks_match_levels(dataset):
    out_dir, _ = dataset
    for split in ('train', 'test'):
        labels, _ = read_labels(out_dir / f'{split}Labels.csv')
        for name, level in labels.items():
            with Image.open(out_dir / 'masks' / f'{name}.png') as mask:
                assert mask.mode == 'L' and mask.size == (192, 128)
                area = lesion_area(mask)
            assert (area == 0) == (level == 0), f'{name} (level {level}) has lesion area {area}'


def test_masks_are_binary_inside_the_eye_and_grow_with_level():
    mean_area = []
    for level in range(5):
        areas = []
        for seed in range(6):
            photo, mask = make_fundus(level, np.random.default_rng(seed), **SMALL)
            values = np.asarray(mask)
            assert set(np.unique(values)) <= {0, 255}
            assert mask.size == photo.size
            ys, xs = np.nonzero(values)
            assert np.all(np.hypot(xs - 96, ys - 64) < 64), 'a lesion lies outside the eye'
            areas.append(lesion_area(mask))
        if level == 0:
            assert max(areas) == 0
        else:
            assert min(areas) > 0
        mean_area.append(np.mean(areas))
    assert all(a < b for a, b in zip(mean_area, mean_area[1:])), mean_area


@pytest.mark.parametrize('level', [0, 4])
def test_photo_has_black_surround_and_bright_orange_eye(level):
    photo, _ = make_fundus(level, np.random.default_rng(11), width=576, height=384)
    assert photo.mode == 'RGB' and photo.size == (576, 384)
    pixels = np.asarray(photo).astype(float)
    corners = np.concatenate([pixels[:20, :20], pixels[:20, -20:], pixels[-20:, :20], pixels[-20:, -20:]])
    assert corners.max() < 10
    red, green, blue = pixels[152:232, 248:328].reshape(-1, 3).mean(axis=0)
    assert red > 100 and red > green > blue
    assert 120 < red < 230 and 40 < green < 120 and blue < 70


def test_optic_disc_is_on_the_nasal_side():
    for eye, on_right in (('left', False), ('right', True)):
        photo, _ = make_fundus(0, np.random.default_rng(2), width=576, height=384, eye=eye)
        brightness = np.asarray(photo.convert('L')).astype(float)
        brightest_x = np.argmax(brightness.mean(axis=0))
        assert (brightest_x > 288) == on_right, f'{eye} eye: optic disc at x={brightest_x}'


def test_default_aspect_ratio_is_about_one_and_a_half(dataset):
    out_dir, _ = dataset
    with Image.open(next((out_dir / 'train').iterdir())) as photo:
        assert photo.size == (192, 128)
    photo, _ = make_fundus(2, np.random.default_rng(0))
    assert photo.size[0] / photo.size[1] == pytest.approx(1.5)


def test_rerun_with_fewer_patients_leaves_no_unlabelled_images(tmp_path):
    generate(tmp_path, n_patients=6, seed=0, progress=False, **SMALL)
    generate(tmp_path, n_patients=2, seed=0, progress=False, **SMALL)
    train, _ = read_labels(tmp_path / 'trainLabels.csv')
    test, _ = read_labels(tmp_path / 'testLabels.csv')
    assert {p.stem for p in (tmp_path / 'train').iterdir()} == set(train)
    assert {p.stem for p in (tmp_path / 'test').iterdir()} == set(test)
    assert {p.stem for p in (tmp_path / 'masks').iterdir()} == set(train) | set(test)


@pytest.mark.parametrize('bad', [dict(n_patients=0), dict(width=32), dict(test_fraction=1.0),
                                 dict(one_eye_fraction=-0.1), dict(seed=-1)])
def test_generate_rejects_bad_arguments(tmp_path, bad):
    with pytest.raises(UserError):
        generate(tmp_path, progress=False, **{**dict(n_patients=2, **SMALL), **bad})


def test_generate_refuses_to_overwrite_real_photos(tmp_path):
    (tmp_path / 'train').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'train' / '10_left.jpeg')
    with pytest.raises(UserError, match='did not make'):
        generate(tmp_path, n_patients=2, progress=False, **SMALL)


def run_cli(*args):
    return subprocess.run([sys.executable, '-m', 'retina.synthetic', *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_cli_writes_a_data_set_and_a_summary(tmp_path):
    result = run_cli('--out', tmp_path / 'data', '--n_patients', 3, '--width', 96, '--height', 64, '--seed', 2)
    assert result.returncode == 0, result.stderr
    assert 'level 0' in result.stdout and str(tmp_path / 'data' / 'train') in result.stdout
    train, _ = read_labels(tmp_path / 'data' / 'trainLabels.csv')
    assert train and all((tmp_path / 'data' / 'train' / f'{name}.jpeg').is_file() for name in train)


def test_cli_help():
    result = run_cli('--help')
    assert result.returncode == 0
    assert '--one_eye_fraction' in result.stdout and '--debug' in result.stdout


@pytest.mark.parametrize('bad', [['--n_patients', '0'], ['--test_fraction', '1'], ['--width', '10'],
                                 ['--seed', 'abc'], []])
def test_cli_rejects_bad_arguments_without_traceback(tmp_path, bad):
    out = [] if not bad else ['--out', tmp_path / 'data']
    result = run_cli(*out, *bad)
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'data' / 'trainLabels.csv').exists()


def test_cli_reports_foreign_photos_in_one_line(tmp_path):
    (tmp_path / 'test').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'test' / '1_left.jpeg')
    result = run_cli('--out', tmp_path, '--n_patients', 2, '--width', 96, '--height', 64)
    assert result.returncode == 2
    assert result.stderr.startswith('error:') and 'Traceback' not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_masks_by_kind_split_the_mask_and_leave_the_photo_alone():
    kinds_seen = set()
    for level, seed in [(2, 0), (3, 1), (4, 2), (4, 3)]:
        photo, mask = make_fundus(level, np.random.default_rng(seed), **SMALL)
        same_photo, same_mask, kinds = make_fundus(level, np.random.default_rng(seed), by_kind=True, **SMALL)
        assert np.array_equal(np.asarray(photo), np.asarray(same_photo))
        assert np.array_equal(np.asarray(mask), np.asarray(same_mask))
        assert set(kinds) == {'red', 'exudate', 'other_bright'}
        stack = np.stack([np.asarray(m) > 0 for m in kinds.values()])
        assert (stack.sum(0) <= 1).all(), 'a pixel belongs to two kinds'
        assert np.array_equal(stack.any(0), np.asarray(mask) > 0), 'the kinds are not the mask'
        kinds_seen |= {kind for kind, m in kinds.items() if np.asarray(m).any()}
        # Red lesions are dark, exudates bright: each kind's pixels look like their kind.
        green = np.asarray(photo)[..., 1].astype(float)
        red_pixels, exudate_pixels = (green[np.asarray(kinds[k]) > 0] for k in ('red', 'exudate'))
        if red_pixels.size and exudate_pixels.size:
            assert np.median(red_pixels) < np.median(exudate_pixels) - 50
    assert kinds_seen == {'red', 'exudate', 'other_bright'}


def test_masks_by_kind_on_disk_and_removed_by_a_run_without(tmp_path):
    result = run_cli('--out', tmp_path, '--n_patients', 4, '--width', 96, '--height', 64, '--seed', 3,
                     '--masks_by_kind')
    assert result.returncode == 0, result.stderr
    names = {p.stem for p in (tmp_path / 'masks').iterdir()}
    for kind in ('red', 'exudate', 'other_bright'):
        assert {p.stem for p in (tmp_path / 'masks_by_kind' / kind).iterdir()} == names
    assert '--masks_by_kind' in (tmp_path / MARKER_FILE).read_text()
    generate(tmp_path, n_patients=4, seed=4, progress=False, width=96, height=64)
    assert not any((tmp_path / 'masks_by_kind').rglob('*.png')), 'stale masks of other photographs'
