"""convert.py and retina.crop: the eye's box, the fast path against the reference, the CLI.

The photographs are synthetic (a bright, textured disc on a dark, slightly
noisy surround), except in the last test, which uses the EyePACS sample
photographs when they are there.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SHARED_DATA
from retina import crop

SAMPLE = SHARED_DATA / 'eyepacs_sample'


def fundus(width=900, height=600, centre=(420, 300), radius=270, seed=0):
    """A synthetic fundus photograph; the disc's exact box is (cx - r, cy - r, cx + r + 1, cy + r + 1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    inside = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius ** 2
    pixels = rng.integers(0, 6, (height, width, 3))
    retina = np.array([170, 90, 50]) + rng.integers(-20, 21, (height, width, 3))
    # A darker rim, as real photographs have (vignetting).
    rim = np.sqrt((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / max(radius, 1)
    retina = retina * (1 - 0.5 * np.clip(rim, 0, 1) ** 4)[..., None]
    pixels[inside] = retina[inside]
    return Image.fromarray(pixels.astype(np.uint8))


def disc_box(centre=(420, 300), radius=270):
    return centre[0] - radius, centre[1] - radius, centre[0] + radius + 1, centre[1] + radius + 1


def assert_close(box, expected, tolerance):
    assert max(abs(a - b) for a, b in zip(box, expected)) <= tolerance, (box, expected)


# --- the box ----------------------------------------------------------------

def test_box_is_found_around_an_off_centre_disc():
    assert_close(crop.find_eye_box(fundus()), disc_box(), 3)
    assert_close(crop.find_eye_box_fast(fundus()), disc_box(), 3)


def test_fast_box_matches_reference_on_a_large_photo():
    centre, radius = (1150, 700), 660
    image = fundus(2400, 1400, centre, radius)  # reduced 3x for the search
    reference = crop.find_eye_box(image)
    assert_close(reference, disc_box(centre, radius), 3)
    assert_close(crop.find_eye_box_fast(image), reference, 8)


def test_fast_box_of_a_draft_decoded_jpeg_matches_reference(tmp_path):
    centre, radius = (1300, 800), 760
    path = tmp_path / 'big.jpeg'
    fundus(2700, 1600, centre, radius).save(path, quality=95)
    full = Image.open(path).convert('RGB')
    decoded = crop.load_for_crop(path, 128)
    assert decoded.size == (2700 // 8 + 1, 1600 // 8)  # straight from the 1/8 DCT scale
    fast = crop.scale_box(crop.find_eye_box_fast(decoded), decoded.size, full.size)
    assert_close(fast, crop.find_eye_box(full), 0.01 * full.height)


def test_draft_never_leaves_the_crop_smaller_than_crop_size(tmp_path):
    path = tmp_path / 'eye.jpeg'
    fundus(2700, 1600, (1300, 800), 760).save(path)
    for crop_size in (128, 256, 512):
        decoded = crop.load_for_crop(path, crop_size)
        left, top, right, bottom = crop.find_eye_box_fast(decoded)
        assert min(right - left, bottom - top) >= crop_size


@pytest.mark.parametrize('crop_size', [32, 128, 300])
def test_output_is_square_and_crop_size(crop_size):
    out = crop.crop_to_eye(fundus(), crop_size)
    assert out.size == (crop_size, crop_size) and out.mode == 'RGB'
    assert crop.crop_to_eye_reference(fundus(), crop_size).size == (crop_size, crop_size)


def test_crop_fills_the_frame_with_the_eye():
    out = np.asarray(crop.crop_to_eye(fundus(), 100)).astype(int)
    # The disc touches all four sides in the middle; the corners are surround.
    assert out[50, 1].sum() > 100 and out[50, 98].sum() > 100
    assert out[1, 50].sum() > 100 and out[98, 50].sum() > 100
    assert out[2, 2].sum() < 30 and out[97, 97].sum() < 30


@pytest.mark.parametrize('image', [Image.new('RGB', (900, 600)),
                                   Image.new('RGB', (900, 600), (60, 60, 60))], ids=['black', 'grey'])
def test_featureless_photo_falls_back_to_centred_square(image):
    assert crop.find_eye_box(image) == (150, 0, 750, 600)
    assert crop.find_eye_box_fast(image) == (150, 0, 750, 600)


def test_too_small_a_box_falls_back_to_centred_square():
    small_spot = fundus(900, 600, (450, 300), 150)   # 301 px < 0.8 x 600
    assert crop.find_eye_box(small_spot) == (150, 0, 750, 600)
    assert crop.find_eye_box_fast(small_spot) == (150, 0, 750, 600)


def test_centred_square_keeps_the_odd_pixel_like_the_original():
    assert crop.centred_square(901, 600) == (150, 0, 751, 600)
    assert crop.centred_square(600, 600) == (0, 0, 600, 600)


@pytest.mark.parametrize('size, expected', [((600, 600), (0, 0, 600, 600)),
                                            ((700, 600), (50, 0, 650, 600)),   # not wide: no search
                                            ((400, 600), (0, 100, 400, 500))])  # tall
def test_square_and_tall_photos_get_the_centred_square(size, expected):
    image = fundus(size[0], size[1], (size[0] // 2 + 20, size[1] // 2), min(size) // 2 - 30)
    assert crop.find_eye_box(image) == expected
    assert crop.find_eye_box_fast(image) == expected
    assert crop.crop_to_eye(image, 64).size == (64, 64)


def test_tiny_image_does_not_crash():
    assert crop.crop_to_eye(Image.new('RGB', (20, 10), (200, 0, 0)), 16).size == (16, 16)


def test_convert_one_writes_rgb_of_crop_size_atomically(tmp_path):
    src = tmp_path / 'eye.jpeg'
    fundus().save(src)
    for extension in crop.OUTPUT_EXTENSIONS:
        dst = tmp_path / 'out' / f'eye.{extension}'
        crop.convert_one(src, dst, 64)
        with Image.open(dst) as out:
            assert out.size == (64, 64) and out.mode == 'RGB'
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['eye.jpeg', 'eye.png', 'eye.tiff']


# --- the command line -------------------------------------------------------

def run_convert(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ('DISPLAY', 'WAYLAND_DISPLAY')}
    env['MPLBACKEND'] = 'Agg'
    return subprocess.run([sys.executable, str(REPO / 'convert.py'), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


GOOD = ['cmyk', 'good1', 'good2', 'gray', 'palette', 'rgba', 'sixteen_bit']
BAD = ['empty.jpeg', 'notes.jpeg', 'truncated.jpeg']


@pytest.fixture
def photo_folder(tmp_path):
    """Good photographs in every mode, plus an empty file, a text file and a truncated JPEG."""
    folder = tmp_path / 'train'
    folder.mkdir()
    eye = fundus()
    eye.save(folder / 'good1.jpeg')
    fundus(seed=1, centre=(470, 290)).save(folder / 'good2.jpg')
    eye.convert('L').save(folder / 'gray.png')
    eye.convert('CMYK').save(folder / 'cmyk.tif')
    eye.convert('P', palette=Image.Palette.ADAPTIVE).save(folder / 'palette.png')
    eye.convert('RGBA').save(folder / 'rgba.png')
    sixteen = (np.asarray(eye.convert('L')).astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(folder / 'sixteen_bit.png')
    assert Image.open(folder / 'sixteen_bit.png').mode.startswith('I')
    (folder / 'empty.jpeg').write_bytes(b'')
    (folder / 'notes.jpeg').write_text('these are my notes, not a photograph\n')
    whole = (folder / 'good1.jpeg').read_bytes()
    (folder / 'truncated.jpeg').write_bytes(whole[:len(whole) // 2])
    return folder


def test_cli_converts_the_good_names_the_bad_and_fails(photo_folder, tmp_path):
    out = tmp_path / 'medium'
    result = run_convert('--directory', photo_folder, '--convert_directory', out, '--crop_size', 64,
                         '--extension', 'png', '--n_proc', 2, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert 'Traceback' not in result.stderr
    for name in BAD:
        assert name in result.stderr
    assert f'error: {len(BAD)} of {len(GOOD) + len(BAD)} images could not be converted' in result.stderr
    assert sorted(p.name for p in out.glob('*.png')) == [f'{name}.png' for name in GOOD]
    for name in GOOD:
        with Image.open(out / f'{name}.png') as image:
            assert image.mode == 'RGB' and image.size == (64, 64)

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_convert('--directory', photo_folder, '--convert_directory', out, '--crop_size', 64,
                        '--extension', 'png', cwd=tmp_path)
    assert again.returncode == 1 and 'Traceback' not in again.stderr
    assert f'{len(GOOD)} already in' in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    other = run_convert('--directory', photo_folder, '--convert_directory', out, '--crop_size', 128,
                        '--extension', 'png', cwd=tmp_path)
    assert other.returncode == 2 and 'Traceback' not in other.stderr
    assert 'is 64×64, not 128×128' in other.stderr and 'another --crop_size' in other.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_cli_all_good_exits_zero_with_default_tiff(tmp_path):
    folder = tmp_path / 'train'
    folder.mkdir()
    for i in range(3):
        fundus(seed=i).save(folder / f'{i}_left.jpeg')
    result = run_convert('--directory', folder, '--convert_directory', tmp_path / 'out', '--crop_size', 48,
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == (
        [f'{i}_left.tiff' for i in range(3)] + ['conversion.json'])


def test_leftover_temp_file_is_not_an_existing_output(tmp_path):
    folder = tmp_path / 'train'
    folder.mkdir()
    fundus().save(folder / '10_left.jpeg')
    out = tmp_path / 'out'
    out.mkdir()
    # What a killed atomic write leaves behind (see retina.atomic), old and current naming.
    for leftover in ('.10_left.tiff.k2j4h1.tmp', '.10_left.tiff.k2j4h1.tmp.tiff'):
        (out / leftover).write_bytes(b'half a tiff')
    result = run_convert('--directory', folder, '--convert_directory', out, '--crop_size', 32, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(out / '10_left.tiff') as image:
        assert image.size == (32, 32)


@pytest.mark.parametrize('make', ['empty', 'missing'])
def test_empty_or_missing_folder_is_one_line_error(tmp_path, make):
    folder = tmp_path / 'train'
    if make == 'empty':
        folder.mkdir()
    result = run_convert('--directory', folder, '--convert_directory', tmp_path / 'out', cwd=tmp_path)
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and str(folder) in lines[0], result.stderr


def test_output_folder_equal_to_input_is_refused(tmp_path):
    folder = tmp_path / 'train'
    folder.mkdir()
    fundus().save(folder / 'a.jpeg')
    result = run_convert('--directory', folder, '--convert_directory', folder, '--extension', 'jpeg',
                         cwd=tmp_path)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert '--convert_directory' in result.stderr


def test_test_mode_without_display_writes_previews_of_level_1(tmp_path):
    folder = tmp_path / 'train'
    folder.mkdir()
    for name in ('1_left', '1_right', '2_left'):
        fundus().save(folder / f'{name}.jpeg')
    labels = tmp_path / 'trainLabels.csv'
    labels.write_text('image,level\n1_left,0\n1_right,1\n2_left,3\n')
    previews = tmp_path / 'preview'
    result = run_convert('--directory', folder, '--test', '--labels', labels, '--preview_dir', previews,
                         '--crop_size', 64, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in previews.iterdir()] == ['1_right_preview.png']
    assert str(previews) in result.stdout
    with Image.open(previews / '1_right_preview.png') as image:
        assert image.height == 64 and image.width == 64 + 96

    result = run_convert('--directory', folder, '--test', '--labels', tmp_path / 'missing.csv',
                         '--preview_dir', previews, '--crop_size', 64, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'missing.csv not found' in result.stderr
    assert len(list(previews.iterdir())) == 3

    (folder / '1_right.jpeg').write_bytes(b'not a photograph')
    result = run_convert('--directory', folder, '--test', '--labels', labels, '--preview_dir', previews,
                         '--crop_size', 64, cwd=tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert '1_right.jpeg' in result.stderr and 'could not be read' in result.stderr


def test_help_explains_every_option(tmp_path):
    result = run_convert('--help', cwd=tmp_path)
    assert result.returncode == 0
    for option in ('--directory', '--convert_directory', '--test', '--crop_size', '--extension',
                   '--n_proc', '--labels', '--preview_dir', '--debug'):
        assert option in result.stdout
    assert 'tiff' in result.stdout and 'data/train_medium' in result.stdout


# --- real photographs -------------------------------------------------------

@pytest.mark.skipif(not (SAMPLE / 'train').is_dir(), reason=f'no sample photographs in {SAMPLE}')
def test_real_photographs_fill_the_frame(tmp_path):
    from retina.images import list_images, load_rgb
    for src in list_images(SAMPLE / 'train')[:2]:
        dst = tmp_path / f'{src.stem}.tiff'
        crop.convert_one(src, dst, 128)
        out = np.asarray(Image.open(dst)).astype(float)
        assert out.shape == (128, 128, 3)
        assert out[54:74, 54:74].mean() > 40            # the middle is retina, not surround
        # The disc touches both sides (the surround is below 15; the reference crop's edge
        # columns reach 41 on 10_right, the bilinear resize's 39).
        assert out[:, :3].max() > 30 and out[:, -3:].max() > 30

        full = load_rgb(src)
        reference_box = crop.find_eye_box(full)
        reference = np.asarray(crop.crop_to_eye_reference(full, 128)).astype(float)
        assert abs(out.mean() - reference.mean()) < 2
        decoded = crop.load_for_crop(src, 128)
        fast_box = crop.scale_box(crop.find_eye_box_fast(decoded), decoded.size, full.size)
        assert_close(fast_box, reference_box, 0.01 * max(full.size))


def test_worker_count_keeps_few_images_in_one_process():
    per = crop.IMAGES_PER_PROCESS
    assert crop.worker_count(None, 10) == 1
    assert crop.worker_count(None, 0) == 1
    assert crop.worker_count(None, 100 * per) == (os.cpu_count() or 1)
    assert crop.worker_count(None, per + 1) == min(2, os.cpu_count() or 1)
    assert crop.worker_count(4, 10) == 4   # asked for: as asked, but never more than the images
    assert crop.worker_count(4, 3) == 3


def test_convert_warns_of_photographs_predict_would_call_ungradable(synthetic_source, tmp_path):
    from PIL import ImageFilter
    folder = tmp_path / 'train'
    folder.mkdir()
    source = sorted((synthetic_source / 'train').glob('*.jpeg'))[0]
    photo = Image.open(source).convert('RGB')
    photo.save(folder / 'sharp_left.png')
    photo.filter(ImageFilter.GaussianBlur(0.04 * photo.width)).save(folder / 'blurred_left.png')
    result = run_convert('--directory', folder, '--convert_directory', tmp_path / 'out',
                         '--crop_size', 128, '--no_progress', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith('warning: ')]
    assert len(warnings) == 1 and 'blurred_left.png: ungradable (out of focus)' in warnings[0]
    assert (tmp_path / 'out' / 'blurred_left.tiff').is_file()  # converted all the same
