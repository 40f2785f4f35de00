"""Reliability, round two: concurrent runs, resource bombs, stale or poisoned inputs,
and user mistakes that must be one-line errors, not "unexpected ... (a bug)".

Mostly unit-level with tiny files; a few CLI runs check what a user sees.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, one_line_error, run_script
from retina import atomic, checkpoint, config as config_module, lock, paths
from retina.errors import UserError

CONFIG = 'c_128_5x5_32_ram'


def _earlier_run(workdir):
    """A finished-looking earlier run of CONFIG: its files must survive any failing new run."""
    run = workdir / 'weights' / CONFIG
    run.mkdir(parents=True)
    (run / 'log.csv').write_text('epoch\n1\n')
    (run / 'last.pt').write_bytes(b'earlier weights')
    return run


# ---------------------------------------------------------------- concurrent runs, lost work

def test_a_live_lock_refuses_a_second_holder_and_a_stale_one_is_taken_over(tmp_path):
    path = tmp_path / 'run' / 'run.lock'
    notes = []
    with lock.hold(path, 'run', notes.append):
        owner = json.loads(path.read_text())
        assert owner['pid'] == os.getpid() and owner['host']
        # Another process (a child) finds it held: the message names the owner.
        code = ('import sys; from retina import lock\n'
                'try:\n    lock.hold(sys.argv[1], "run").__enter__()\n'
                'except lock.Busy as e:\n    print(e); sys.exit(3)\n')
        result = subprocess.run([sys.executable, '-c', code, str(path)], capture_output=True,
                                text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert result.returncode == 3, result.stderr
        assert f'pid {os.getpid()}' in result.stdout and str(path) in result.stdout
    assert not path.exists() and not path.parent.exists()  # nothing left behind
    # A lock file left by a killed run (its pid is gone, no flock held) is stale.
    path.parent.mkdir()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    path.write_text(json.dumps(dict(pid=dead.pid, host='h', started='then')))
    with lock.hold(path, 'run', notes.append):
        assert json.loads(path.read_text())['pid'] == os.getpid()
    assert any(f'pid {dead.pid}' in note and 'taking it over' in note for note in notes)


def test_without_flock_the_owner_record_decides(tmp_path, monkeypatch):
    import socket
    monkeypatch.setattr(lock, '_flock', lambda fd, path: None)  # e.g. an NFS mount without it
    path = tmp_path / 'run.lock'
    path.write_text(json.dumps(dict(pid=1, host='elsewhere', started='then')))
    with pytest.raises(lock.Busy, match='locked by pid 1 on elsewhere .* delete'):
        lock.hold(path, 'run').__enter__()
    path.write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname())))
    code = 'import sys; from retina import lock; lock._flock = lambda fd, p: None\n' \
           'try:\n    lock.hold(sys.argv[1], "run").__enter__()\n' \
           'except lock.Busy:\n    sys.exit(3)\n'
    result = subprocess.run([sys.executable, '-c', code, str(path)],
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 3  # its owner (this process) is alive


def test_a_second_run_of_a_config_is_refused_while_the_first_runs(workdir):
    run = _earlier_run(workdir)
    with lock.hold(workdir / paths.run_lock(CONFIG), 'first run'):
        result = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '1',
                            '--no_progress', cwd=workdir, check=False)
    one_line_error(result, 'in use by', f'pid {os.getpid()}', 'run.lock')
    assert result.returncode == 2
    assert (run / 'last.pt').read_bytes() == b'earlier weights'
    assert not list((workdir / 'weights').glob('*.earlier-*'))


def test_a_run_failing_in_setup_or_epoch_1_leaves_the_earlier_run_in_place(workdir, monkeypatch):
    from retina.train import train
    run = _earlier_run(workdir)
    result = run_script('train_nn.py', '--cnf', CONFIG, '--labels', 'data/nothing.csv',
                        '--max_epochs', '1', '--no_progress', cwd=workdir, check=False)
    one_line_error(result, 'data/nothing.csv')
    monkeypatch.chdir(workdir)
    config = config_module.load(CONFIG)
    config.cnf['schedule'] = {0: 1e12, 5: 'stop'}  # NaN in the first epoch
    with pytest.raises(UserError, match='earlier run .* is left as it was'):
        train(config, device='cpu', progress=False, echo=lambda *a, **k: None, max_epochs=1)
    assert sorted(p.name for p in run.iterdir()) == ['last.pt', 'log.csv']
    assert (run / 'last.pt').read_bytes() == b'earlier weights'
    assert not list((workdir / 'weights').glob('*.earlier-*'))


def test_two_feature_extractions_of_one_config_and_split_exclude_each_other(tmp_path,
                                                                          monkeypatch):
    from retina.features import extract_features
    monkeypatch.chdir(tmp_path)
    config = config_module.load(CONFIG)
    with lock.hold(paths.features_lock(CONFIG, 'test', 0), 'first'):
        with pytest.raises(lock.Busy, match=f'the test features of {CONFIG} .* in use by pid'):
            extract_features(config, None, tmp_path, 'test')
    assert not (tmp_path / 'data').exists()


def test_submissions_and_earlier_runs_never_take_a_taken_name(tmp_path):
    path = tmp_path / 'sub_x_20260101-000000.csv'
    written = [atomic.write_new(path, f'image,level\na,{i}\n') for i in range(3)]
    assert [p.name for p in written] == [path.name, 'sub_x_20260101-000000-1.csv',
                                         'sub_x_20260101-000000-2.csv']
    assert [p.read_text().split(',')[-1] for p in written] == ['0\n', '1\n', '2\n']
    assert not list(tmp_path.glob('.*.tmp'))
    folders = [atomic.new_folder(tmp_path / 'c.earlier-1') for _ in range(2)]
    assert [f.name for f in folders] == ['c.earlier-1', 'c.earlier-1-1']


def test_a_writer_never_removes_the_temporary_file_of_another_live_writer(tmp_path):
    target = tmp_path / 'cache.npy'
    with atomic.atomic_path(target) as mine:
        mine.write_bytes(b'half written')
        atomic.write_bytes(target, b'another writer')  # e.g. a second transform.py
        assert mine.read_bytes() == b'half written'
    assert target.read_bytes() == b'half written'
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    left = tmp_path / f'.cache.npy.{atomic._HOST}.{dead.pid}.abc123.tmp'
    left.write_bytes(b'killed writer')
    atomic.write_bytes(target, b'again')
    assert not left.exists()


# ---------------------------------------------------------------- weights files

@pytest.fixture(scope='module')
def untrained(tmp_path_factory):
    """An untrained checkpoint of CONFIG, built once."""
    config = config_module.load(CONFIG)
    path = tmp_path_factory.mktemp('weights') / 'untrained.pt'
    checkpoint.save(path, model=config.build_net(), config=config, epoch=0)
    return path


def _saved(tmp_path, untrained, change):
    """A copy of the untrained checkpoint after `change(state)` edits its dict."""
    state = torch.load(untrained, weights_only=True)
    change(state)
    path = tmp_path / 'w.pt'
    torch.save(state, path)
    return path


def test_a_compressed_weights_file_is_refused_before_it_inflates(tmp_path, untrained):
    import zipfile
    plain = _saved(tmp_path, untrained, lambda s: s.update(zeros=torch.zeros(4_000_000)))
    bomb = tmp_path / 'bomb.pt'
    with zipfile.ZipFile(plain) as source, \
            zipfile.ZipFile(bomb, 'w', zipfile.ZIP_DEFLATED) as packed:
        for info in source.infolist():
            packed.writestr(info.filename, source.read(info.filename))
    assert bomb.stat().st_size < plain.stat().st_size - 15_000_000
    with pytest.raises(UserError, match='bomb.pt: refused to load: .* is compressed'):
        checkpoint.load(bomb)


@pytest.mark.parametrize('change, words', [
    (lambda s: s['model'].update(extra=torch.zeros(1000, 1000)), 'do not match the network'),
    (lambda s: s['config']['layers'][1][1].update(filters=10 ** 6),
     'do not match the network'),
    (lambda s: s['model'][next(iter(s['model']))].view(-1).__setitem__(0, float('nan')),
     'the weights are broken'),
    (lambda s: s.pop('config'), 'has no usable config'),
    (lambda s: s['config'].update(cnf=[1, 2]), 'has no usable config'),
])
def test_weights_that_do_not_match_their_config_or_are_not_finite(tmp_path, untrained, change,
                                                                   words):
    checkpoint.load(untrained)
    path = _saved(tmp_path, untrained, change)
    with pytest.raises(UserError, match=words) as caught:
        checkpoint.load(path)
    assert str(path) in str(caught.value) and '\n' not in str(caught.value)


# ---------------------------------------------------------------- images

def _png_claiming(path, width, height):
    """A tiny PNG whose header claims width × height (what a decompression bomb looks like)."""
    import io
    import struct
    import zlib
    from PIL import Image
    buffer = io.BytesIO()
    Image.new('L', (1, 1)).save(buffer, 'PNG')
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b'IHDR')
    data[ihdr + 4:ihdr + 12] = struct.pack('>II', width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack('>I', zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize('width, height', [(20000, 20000), (12000, 10000)])
def test_an_image_over_100_megapixels_is_refused_by_name(tmp_path, width, height):
    from retina import cache
    from retina.images import BadImage, load_rgb
    path = _png_claiming(tmp_path / 'bomb_left.png', width, height)
    for read in (load_rgb, lambda p: cache.image_size_of([p])):
        with pytest.raises(UserError, match='bomb_left.png: too many pixels .* limit is 100 MP'):
            read(path)
    with pytest.raises(BadImage):
        load_rgb(path)


def test_exif_orientation_turns_the_photo_upright(tmp_path):
    from PIL import Image
    from retina.crop import load_for_crop
    from retina.images import load_rgb
    array = np.zeros((32, 64, 3), np.uint8)
    array[:, :32] = 255  # left half white: upright (orientation 6 turns it clockwise) on top
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / 'side.jpeg', exif=exif.tobytes(), quality=95)
    for upright in (load_rgb(tmp_path / 'side.jpeg'), load_for_crop(tmp_path / 'side.jpeg', 8)):
        pixels = np.asarray(upright).mean(axis=(1, 2))
        assert upright.size[0] < upright.size[1]
        assert pixels[:len(pixels) // 2].mean() > 200 and pixels[len(pixels) // 2:].mean() < 50


def test_a_truncated_image_cache_is_built_again(tmp_path, capsys):
    from PIL import Image
    from retina import cache
    folder = tmp_path / 'train'
    folder.mkdir()
    for i in range(3):
        Image.new('RGB', (16, 16), (i * 50, 0, 0)).save(folder / f'{i}_left.png')
    images = sorted(folder.iterdir())
    first = np.array(cache.load_images(images, cache_dir=tmp_path / 'cache', progress=False))
    (cached,) = (tmp_path / 'cache').iterdir()
    cached.write_bytes(cached.read_bytes()[:-100])
    again = cache.load_images(images, cache_dir=tmp_path / 'cache', progress=False)
    assert np.array_equal(first, again)
    assert 'is damaged' in capsys.readouterr().err


# ---------------------------------------------------------------- processes

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
    import signal
    import time
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
    try:  # EOF on its pipes only once every process holding them has ended
        process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail('the workers outlived their killed parent, holding its output pipe')
    finally:
        for pid in helpers:
            with __import__('contextlib').suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    assert not [pid for pid in helpers if atomic.pid_alive(pid) and
                'Z' not in subprocess.run(['ps', '-o', 'stat=', '-p', str(pid)],
                                          capture_output=True, text=True).stdout]
    assert not list(out.glob('.*.tmp')), 'a worker left its temporary file'


# ---------------------------------------------------------------- features and blending

def _features(root, cnf, split, names, array, fingerprint='f1', stat='mean'):
    """A feature file, its names file and its source record, as transform.py writes them."""
    folder = root / 'data' / 'features'
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f'{cnf}_{split}_{stat}_iter_1_skip_0.npy'
    np.save(path, array)
    (folder / f'{cnf}_{split}_names_iter_1_skip_0.txt').write_text('\n'.join(names) + '\n')
    (folder / f'{cnf}_{split}_source_iter_1_skip_0.json').write_text(
        json.dumps(dict(fingerprint=fingerprint, weights=f'weights/{fingerprint}.pt')))
    return path


def _blend_project(root, train_fingerprint='f1', test_fingerprint='f1'):
    """Train/test features whose image names hold commas and spaces; returns the train file."""
    rng = np.random.default_rng(0)
    names = sorted(f'{p} x,{p % 3}_{eye}' for p in range(30) for eye in ('left', 'right'))
    levels = rng.integers(0, 5, len(names))
    with open(root / 'labels.csv', 'w', newline='') as f:
        import csv
        csv.writer(f).writerows([('image', 'level'), *zip(names, levels)])
    features = levels[:, None] + rng.normal(scale=0.3, size=(len(names), 4))
    train = _features(root, 'c_x', 'train', names, features.astype(np.float32),
                      train_fingerprint)
    _features(root, 'c_x', 'test', names[:10], features[:10].astype(np.float32),
              test_fingerprint)
    return train, names


def test_names_with_commas_and_spaces_survive_to_the_submission(tmp_path, monkeypatch):
    import csv
    from retina import blend, blend_net
    monkeypatch.chdir(tmp_path)
    # The fits do not matter here, only the names: two epochs will do.
    fit = blend_net.fit_net
    monkeypatch.setattr(blend_net, 'fit_net', lambda inputs, levels, seed, **kwargs: fit(
        inputs, levels, seed, schedule={0: 5e-4, 2: 'stop'}))
    train, names = _blend_project(tmp_path)
    common = dict(labels_file=tmp_path / 'labels.csv', predict=True, echo=lambda *a: None)
    first = blend.run_blend({'run': [train]}, **common)['submission']
    second = blend.run_blend({'run': [train]}, **common)['submission']
    assert first != second and first.is_file() and second.is_file()
    rows = list(csv.reader(open(first, newline='')))
    assert rows[0] == ['image', 'level'] and [r[0] for r in rows[1:]] == names[:10]


def test_train_and_test_features_of_other_weights_are_not_blended(tmp_path, monkeypatch):
    from retina import blend
    monkeypatch.chdir(tmp_path)
    train, _ = _blend_project(tmp_path, 'f1', 'f2')
    with pytest.raises(UserError, match=r'c_x_test_mean_iter_1_skip_0.npy: made with other '
                                        r'weights .*weights/f2.pt vs weights/f1.pt'):
        blend.run_blend({'run': [train]}, labels_file=tmp_path / 'labels.csv', predict=True,
                        echo=lambda *a: None)


@pytest.mark.parametrize('content, words', [
    ('npz', 'a .npz archive'),
    ('structured', 'a structured array'),
    ('complex', 'complex numbers'),
    ('empty', 'empty (0 images'),
    ('no columns', 'empty (3 images × 0 features)'),
])
def test_feature_files_that_are_not_plain_real_arrays(tmp_path, content, words):
    from retina.feature_files import load_features
    names = ['a', 'b', 'c']
    arrays = {'structured': np.zeros(3, dtype=[('x', 'f4'), ('y', 'f4')]),
              'complex': np.ones((3, 2), np.complex64), 'empty': np.zeros((0, 4), np.float32),
              'no columns': np.zeros((3, 0), np.float32)}
    path = _features(tmp_path, 'c_x', 'train', [] if content == 'empty' else names,
                     arrays.get(content, np.zeros((3, 2), np.float32)))
    if content == 'npz':
        with open(path, 'wb') as f:
            np.savez(f, features=np.zeros((3, 2)))
    for mmap in (False, True):
        with pytest.raises(UserError, match=re.escape(words)):
            load_features(path, mmap=mmap)


def test_a_run_named_twice_in_the_blend_config(tmp_path):
    from retina.blend import load_blend_config
    train = _features(tmp_path, 'c_x', 'train', ['a'], np.zeros((1, 2), np.float32))
    config = tmp_path / 'blend.yml'
    config.write_text(f'one: [{train}]\ntwo: [{train}]\none: [{train}]\n')
    with pytest.raises(UserError, match="blend.yml, line 3: .*'one' is given twice"):
        load_blend_config(config)
    config.write_text(f'1: [{train}]\n"1": [{train}]\n')
    with pytest.raises(UserError, match="run name '1' is given twice"):
        load_blend_config(config)


def test_a_labels_file_with_a_column_twice(tmp_path):
    from retina.data import load_labels
    labels = tmp_path / 'labels.csv'
    labels.write_text('image,level,level\n1_left,0,4\n')
    with pytest.raises(UserError, match='labels.csv: column level appears more than once'):
        load_labels(labels)


# ---------------------------------------------------------------- user mistakes, one line each

def test_a_truncated_earlier_output_is_converted_again(tmp_path):
    from PIL import Image
    from retina.crop import convert_folder
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


def test_a_log_with_a_byte_order_mark_reads_and_a_foreign_one_is_named(tmp_path):
    from retina.train import read_log
    log = tmp_path / 'log.csv'
    log.write_text('\ufeffepoch,train_loss\n1,0.5\n2,0.4\n', encoding='utf-8')
    assert [row['epoch'] for row in read_log(log)] == ['1', '2']
    log.write_text('when,loss\nmonday,0.5\n')
    with pytest.raises(UserError, match='log.csv: not a training log'):
        read_log(log)


def test_a_huge_skip_draws_its_augmentations_at_once():
    from scipy.stats import qmc
    from retina.augment import halton, tta_params
    assert np.array_equal(halton(range(41, 46)),
                          qmc.Halton(d=10, scramble=False).random(46)[41:])
    aug = config_module.load(CONFIG).cnf['aug_params']
    params = tta_params(3, 10 ** 15, aug, 0.25)
    assert len(params) == 3 and all(np.isfinite(p['rotation']) for p in params)


@pytest.mark.parametrize('body, words', [
    ("cnf = [('w', 112)]\nlayers = base_layers\n", 'cnf must be a dict'),
    ("cnf = base\nlayers = 'conv'\n", 'layers must be a non-empty list of (kind, options'),
    ("cnf = base\nlayers = [('conv', 32)]\n", 'layers must be a non-empty list'),
    ("cnf = dict(base, aug_params=[1, 2])\nlayers = base_layers\n", 'aug_params must be a dict'),
    ("cnf = dict(base, schedule={0: 0.003, 50: 0.0003})\nlayers = base_layers\n",
     "no 'stop' entry, so training would never end; add one, e.g. 51: 'stop'"),
])
def test_configs_of_the_wrong_shape(tmp_path, body, words):
    (tmp_path / 'configs').mkdir()
    path = tmp_path / 'configs' / 'c_odd.py'
    path.write_text(f'from configs.{CONFIG} import cnf as base, layers as base_layers\n' + body)
    with pytest.raises(UserError, match=re.escape(words)):
        config_module.load(path)


def test_a_negative_seed_is_refused_by_the_option(tmp_path):
    result = run_script('train_nn.py', '--cnf', CONFIG, '--seed', '-1', cwd=tmp_path,
                        check=False)
    assert result.returncode == 2 and "'--seed': -1 is not in the range" in result.stderr
    assert 'Traceback' not in result.stderr
