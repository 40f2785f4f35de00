"""convert.py, retina.data.crop and retina.data.conversion: the eye's box, the fast path against the
reference, the CLI; bad images, full disks, killed runs and dead workers.

The photographs are synthetic (a bright, textured disc on a dark, slightly
noisy surround), except in the last test, which uses the EyePACS sample
photographs when they are there.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import (REPO, SHARED_DATA, _limit_file_size, kill_when, one_line_error, run_script,
                      start)
from retina.core import atomic
from retina.data import conversion, crop

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
    # What a killed atomic write leaves behind (see retina.core.atomic), old and current naming.
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
    from retina.data.images import list_images, load_rgb
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
    per = conversion.IMAGES_PER_PROCESS
    assert conversion.worker_count(None, 10) == 1
    assert conversion.worker_count(None, 0) == 1
    assert conversion.worker_count(None, 100 * per) == (os.cpu_count() or 1)
    assert conversion.worker_count(None, per + 1) == min(2, os.cpu_count() or 1)
    assert conversion.worker_count(4, 10) == 4   # asked for: as asked, but never more than the images
    assert conversion.worker_count(4, 3) == 3


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


def test_convert_killed_never_leaves_a_half_image_under_its_final_name(synthetic_source,
                                                                          tmp_path):
    out = tmp_path / 'converted'
    command = ['convert.py', '--directory', synthetic_source / 'train', '--convert_directory', out,
               '--crop_size', 256, '--extension', 'png', '--n_proc', 1]
    sources = list((synthetic_source / 'train').glob('*.jpeg'))
    for _ in range(2):  # killed just after one more image is written, mid-run
        done = len(list(out.glob('*.png')))
        code = kill_when(start(command, tmp_path), lambda: len(list(out.glob('*.png'))) > done)
        assert code == -signal.SIGKILL, 'the run ended before the kill landed'
        assert len(list(out.glob('*.png'))) < len(sources)
        for path in out.glob('*.png'):
            with Image.open(path) as image:
                image.load()
    result = run_script(*command, cwd=tmp_path)
    outputs = sorted(out.glob('*.png'))
    assert len(outputs) == len(sources)
    for path in outputs:
        with Image.open(path) as image:
            image.load()
            assert image.size == (256, 256)
    assert 'Traceback' not in result.stderr


def _photo(width=300, height=200, level=128):
    array = np.zeros((height, width, 3), np.uint8)
    yy, xx = np.mgrid[:height, :width]
    disc = (xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (0.45 * height) ** 2
    array[disc] = (level + 60, level - 40, level - 90)
    return Image.fromarray(array)


def make_image_corpus(folder):
    """Bad and awkward images; returns (names that must fail, names that must convert)."""
    folder.mkdir(parents=True)
    photo = _photo()
    (folder / 'zero_left.jpeg').write_bytes(b'')
    photo.save(folder / 'full_left.jpeg', quality=90)
    data = (folder / 'full_left.jpeg').read_bytes()
    (folder / 'truncated_left.jpeg').write_bytes(data[:len(data) // 2])
    (folder / 'text_left.jpeg').write_text('this is not a picture\n')
    photo.convert('L').save(folder / 'gray_left.jpeg')
    photo.convert('CMYK').save(folder / 'cmyk_left.jpeg')
    photo.convert('P').save(folder / 'palette_left.png')
    Image.fromarray((np.asarray(photo.convert('L'), np.uint16) * 257)).save(folder / 'deep_left.png')
    photo.convert('RGBA').save(folder / 'alpha_left.png')
    photo.resize((10, 10)).save(folder / 'tiny_left.png')
    _photo(6000, 4000).save(folder / 'huge_left.jpeg', quality=80)
    Image.new('RGB', (300, 200)).save(folder / 'black_left.jpeg')
    bad = ['zero_left', 'truncated_left', 'text_left']
    good = ['full_left', 'gray_left', 'cmyk_left', 'palette_left', 'deep_left', 'alpha_left',
            'tiny_left', 'huge_left', 'black_left']
    return bad, good


def test_convert_names_every_bad_image_and_converts_the_rest(tmp_path):
    bad, good = make_image_corpus(tmp_path / 'photos')
    result = run_script('convert.py', '--directory', tmp_path / 'photos', '--convert_directory',
                        tmp_path / 'out', '--crop_size', 64, '--extension', 'png',
                        cwd=tmp_path, check=False)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    for name in bad:
        assert name in result.stderr
    assert '3 of 12' in result.stderr
    for name in good:
        with Image.open(tmp_path / 'out' / f'{name}.png') as image:
            assert image.mode == 'RGB' and image.size == (64, 64), name
    assert not any((tmp_path / 'out' / f'{name}.png').exists() for name in bad)
    warnings = [line for line in result.stderr.splitlines() if line.startswith('warning: ')
                and 'ungradable' not in line]  # the flat test discs may be out of focus too
    assert len(warnings) == 2, result.stderr
    assert 'tiny_left.png: the eye is 10 px across, blown up 6× to 64 px' in warnings[0] + warnings[1]
    assert 'black_left.jpeg: nearly black' in warnings[0] + warnings[1]


def test_full_disk_during_convert_is_one_line(synthetic_source, tmp_path):
    process = start(['convert.py', '--directory', synthetic_source / 'train',
                     '--convert_directory', tmp_path / 'out', '--crop_size', 512,
                     '--extension', 'tiff', '--n_proc', 1], tmp_path,
                    preexec_fn=_limit_file_size(100_000))
    stdout, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    one_line_error(result, 'file size limit')
    assert not list((tmp_path / 'out').glob('*.tiff'))


def test_output_folder_that_cannot_be_created(synthetic_source, tmp_path):
    (tmp_path / 'a_file').write_text('')
    result = run_script('convert.py', '--directory', synthetic_source / 'train',
                        '--convert_directory', tmp_path / 'a_file' / 'out', cwd=tmp_path,
                        check=False)
    one_line_error(result, 'a_file')


@pytest.mark.skipif(os.geteuid() == 0, reason='root can write into read-only folders')
def test_read_only_output_folder(synthetic_source, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    out.chmod(0o500)
    result = run_script('convert.py', '--directory', synthetic_source / 'train',
                        '--convert_directory', out, cwd=tmp_path, check=False)
    one_line_error(result, 'permission denied')


def _children(pid):
    out = subprocess.run(['ps', '-o', 'pid=', '--ppid', str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _convert_started(process, out, deadline=60):
    """Wait until `process` has written its first image; returns its worker processes' pids."""
    end = time.time() + deadline
    while not list(out.glob('*.tiff')) and time.time() < end and process.poll() is None:
        time.sleep(0.05)
    return [w for child in _children(process.pid) for w in _children(child)]


def test_convert_survives_a_dead_worker_and_stops_cleanly_on_ctrl_c(synthetic_source, tmp_path):
    out = tmp_path / 'out'
    command = ['convert.py', '--directory', synthetic_source / 'train', '--convert_directory', out,
               '--crop_size', 3072, '--n_proc', 2]  # slow enough to interrupt
    process = start(command, tmp_path)
    workers = _convert_started(process, out)
    assert workers, 'no worker processes found'
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert 'worker process died; trying the rest again' in stderr
    sources = sorted(p.stem for p in (synthetic_source / 'train').iterdir())
    assert sorted(p.stem for p in out.glob('*.tiff')) == sources

    shutil.rmtree(out)
    process = start(command, tmp_path)
    _convert_started(process, out)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and 'Run the same command again' in stderr, stderr
    assert 'Traceback' not in stderr
    assert not list(out.glob('.*.tmp')), 'a worker left its temporary file'
    for path in out.glob('*.tiff'):
        with Image.open(path) as image:
            image.load()


def _descendants(pid):
    out = subprocess.run(['ps', '-e', '-o', 'pid=,ppid='], capture_output=True, text=True)
    children = {}
    for line in out.stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_convert_workers_die_with_a_killed_parent(synthetic_source, tmp_path):
    out = tmp_path / 'out'
    process = subprocess.Popen(
        [sys.executable, str(REPO / 'convert.py'), '--directory', synthetic_source / 'train',
         '--convert_directory', out, '--crop_size', '1024', '--n_proc', '2'],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    end = time.time() + 60
    while not list(out.glob('*.tiff')) and time.time() < end and process.poll() is None:
        time.sleep(0.05)
    helpers = _descendants(process.pid)
    assert helpers, 'no worker processes found'
    process.kill()

    def living():
        return [pid for pid in helpers if atomic.pid_alive(pid) and
                'Z' not in subprocess.run(['ps', '-o', 'stat=', '-p', str(pid)],
                                          capture_output=True, text=True).stdout]
    try:  # EOF on its pipes only once every process holding them has ended
        process.communicate(timeout=20)
        deadline = time.monotonic() + 10  # then reaped: polled, not slept on
        while living() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not living(), 'workers outlived their killed parent'
    except subprocess.TimeoutExpired:
        pytest.fail('the workers outlived their killed parent, holding its output pipe')
    finally:
        for pid in helpers:
            with __import__('contextlib').suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not list(out.glob('.*.tmp')), 'a worker left its temporary file'


def test_a_truncated_earlier_output_is_converted_again(tmp_path):
    from PIL import Image
    from retina.data.conversion import convert_folder
    folder = tmp_path / 'photos'
    folder.mkdir()
    photo = np.zeros((60, 80, 3), np.uint8)
    photo[10:50, 20:60] = 150
    Image.fromarray(photo).save(folder / '1_left.jpeg')
    out = tmp_path / 'out'
    for extension in ('jpeg', 'png'):
        convert_folder(folder, out / extension, 32, extension, n_proc=1, progress=False)
        result = out / extension / f'1_left.{extension}'
        result.write_bytes(result.read_bytes()[:len(result.read_bytes()) // 2])
        summary = convert_folder(folder, out / extension, 32, extension, n_proc=1,
                                 progress=False)
        assert summary.converted == 1, extension
        with Image.open(result) as image:
            image.load()


def test_a_converted_image_as_stored_is_the_file_convert_py_writes(tmp_path, synthetic_source):
    """crop.as_stored repeats convert.py's storage: 'jpeg97' gives the pixels of the .jpeg file
    it writes, read back; 'none' (tiff, png) the image itself."""
    source = sorted((synthetic_source / 'train').glob('*.jpeg'))[0]
    written = tmp_path / 'converted.jpeg'
    crop.convert_one(source, written, 128, preprocessing='local_contrast')
    lossless = tmp_path / 'converted.png'
    crop.convert_one(source, lossless, 128, preprocessing='local_contrast')
    rgb = np.asarray(Image.open(lossless).convert('RGB'))
    stored = np.asarray(Image.open(written).convert('RGB'))
    assert np.array_equal(crop.as_stored(rgb, 'jpeg97'), stored)
    assert not np.array_equal(rgb, stored)  # the round trip changes pixels: it is not a no-op
    assert crop.as_stored(rgb, 'none') is rgb
    with pytest.raises(ValueError, match='jpeg50'):
        crop.as_stored(rgb, 'jpeg50')
    assert crop.encoding_of_files([written, tmp_path / 'b.JPG']) == 'jpeg97'
    assert crop.encoding_of_files([lossless, tmp_path / 'b.tiff', written]) == 'none'
    assert crop.encoding_of_files([]) == 'none'
    assert crop.encoding_warning([written], 'jpeg97', 'net.pt') is None
    assert crop.encoding_warning([lossless], 'none', 'net.pt') is None
    warning = crop.encoding_warning([lossless], 'jpeg97', 'net.pt')
    assert str(lossless.parent) in warning and 'net.pt' in warning
    assert warning.endswith('convert.py --extension jpeg') and '\n' not in warning
    assert crop.encoding_warning([written], 'none', 'net.pt').endswith('--extension tiff')
