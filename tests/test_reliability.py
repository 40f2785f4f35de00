"""Fault injection: killed runs, Ctrl-C, a bad-input corpus, unsafe weights, full disks.

Every case checks what a user sees (exit status, one line naming the file,
no traceback) and that nothing on disk is left corrupt.
"""
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, one_line_error, run_script
from retina import checkpoint, config as config_module
from retina.errors import UserError

CONFIG = 'c_128_5x5_32_ram'
TRAIN = ['train_nn.py', '--cnf', CONFIG, '--max_epochs', '4', '--seed', '1', '--deterministic',
         '--no_progress']


def _as_from_a_terminal():
    """In the child, before exec: Ctrl-C as a shell leaves it (default action, not blocked).
    Children inherit an ignored or blocked SIGINT from this process, and in the full suite
    something in the pytest process leaves it so; a script started that way never sees it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start(args, cwd, preexec_fn=None, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1')

    def prepare():
        _as_from_a_terminal()
        if preexec_fn is not None:
            preexec_fn()

    return subprocess.Popen([sys.executable, str(REPO / args[0]), *map(str, args[1:])], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=prepare, **kwargs)


def kill_after(process, seconds):
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
    return process.returncode


def kill_when(process, condition, timeout=120):
    """SIGKILL `process` as soon as `condition()` holds (polled, not slept on); its return code,
    -SIGKILL when the kill landed while it was still running."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    return process.returncode


def kill_during_next_epoch(process, rng, epoch_seconds):
    """After the run reports an epoch, SIGKILL it at a random moment of the next one."""
    for line in process.stdout:
        if line.startswith('epoch'):
            time.sleep(rng.uniform(0.0, 1.2 * epoch_seconds))
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    return process.returncode


def weight_files(folder):
    return sorted(p for p in folder.rglob('*.pt') if not p.name.startswith('.'))


def assert_loadable(folder):
    for path in weight_files(folder):
        state = checkpoint.load(path)
        assert all(torch.isfinite(v).all() for v in state['model'].values()), path


# ---------------------------------------------------------------- interruption

def test_training_killed_at_random_moments_resumes_to_the_uninterrupted_result(workdir, tmp_path):
    reference = tmp_path / 'reference'
    shutil.copytree(workdir, reference)
    run_script(*TRAIN, cwd=reference)
    log = (reference / 'weights' / CONFIG / 'log.csv').read_text().splitlines()
    epoch_seconds = float(log[-1].split(',')[5])
    rng = random.Random(7)
    kills = 0
    for attempt in range(8):
        resume = (workdir / 'weights' / CONFIG / 'last.pt').is_file()
        process = start(TRAIN + (['--resume'] if resume else []), workdir)
        code = kill_during_next_epoch(process, rng, epoch_seconds)
        assert_loadable(workdir / 'weights')
        if code == 0:
            break
        assert code == -signal.SIGKILL
        kills += 1
    else:
        resume = (workdir / 'weights' / CONFIG / 'last.pt').is_file()
        run_script(*TRAIN, *(['--resume'] if resume else []), cwd=workdir)
    assert kills >= 1, 'the run finished before any kill: lengthen it'
    ours = checkpoint.load(workdir / 'weights' / CONFIG / 'last.pt')['model']
    theirs = checkpoint.load(reference / 'weights' / CONFIG / 'last.pt')['model']
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    epochs = [line.split(',')[0] for line in
              (workdir / 'weights' / CONFIG / 'log.csv').read_text().splitlines()[1:]]
    assert epochs == ['1', '2', '3', '4']


def test_ctrl_c_ends_cleanly_and_says_how_to_resume(workdir):
    # Long enough that the interrupt always lands mid-run, however fast the machine.
    process = start(['train_nn.py', '--cnf', CONFIG, '--max_epochs', '1000', '--no_progress'],
                    workdir)
    deadline = time.time() + 120
    while not (workdir / 'weights' / CONFIG / 'last.pt').is_file() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert '--resume' in stderr and 'Traceback' not in stderr
    assert_loadable(workdir / 'weights')


def _features(folder):
    return sorted(p for p in (folder / 'data' / 'features').glob('*.npy'))


def test_transform_killed_leaves_no_partial_file_and_a_rerun_completes(workdir, tmp_path):
    run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '1', '--no_progress',
               cwd=workdir)
    command = ['transform.py', '--cnf', CONFIG, '--n_iter', '12', '--train', '--no_progress']
    reference = tmp_path / 'reference'
    shutil.copytree(workdir, reference, ignore=shutil.ignore_patterns('cache'))
    began = time.perf_counter()  # both runs build their image cache first: same timing
    run_script(*command, cwd=reference)
    duration = time.perf_counter() - began
    shutil.rmtree(workdir / 'data' / 'cache', ignore_errors=True)
    process = start(command, workdir)
    assert kill_after(process, 0.7 * duration) == -signal.SIGKILL, 'finished before the kill'
    from retina.feature_files import load_features
    for path in _features(workdir):
        load_features(path)
    run_script(*command, cwd=workdir)
    for stat in ('mean', 'std'):
        name = f'{CONFIG}_train_{stat}_iter_12_skip_0.npy'
        ours = np.load(workdir / 'data' / 'features' / name)
        theirs = np.load(reference / 'data' / 'features' / name)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


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


# ---------------------------------------------------------------- bad input corpus

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


BAD_LABELS = {  # file content (None: no file) -> what the one-line error must say
    'image\n1_left\n': ['missing column level'],
    'image,level\n1_left,7\n': ['level 7', 'outside 0..4', 'line 2'],
    'image,level\n1_left,1\n1_left,2\n': ['1_left is listed twice', 'line 3'],
    'picture,grade\n1_left,1\n': ['missing column image, level'],
    None: ['not found'],
}


def test_bad_labels_files_are_one_line(workdir):
    """Each case through train_nn.py --labels, side by side (interpreter start-up dominates).

    Each in a folder of its own that shares the images: in one folder, two runs of the
    config would meet at its run lock and one would be refused as busy instead.
    """
    def run_case(case):
        index, content = case
        labels = workdir / f'labels_{index}.csv'
        if content is not None:
            labels.write_text(content)
        folder = workdir / f'case_{index}'
        folder.mkdir()
        (folder / 'data').symlink_to(workdir / 'data')
        return content, run_script('train_nn.py', '--cnf', CONFIG, '--labels', labels,
                                   '--max_epochs', '1', cwd=folder, check=False), labels.name

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run_case, enumerate(BAD_LABELS)))
    for content, result, name in results:
        one_line_error(result, name, *BAD_LABELS[content])
    assert not any(workdir.glob('**/weights'))


def test_weights_of_another_architecture_for_transform_and_ram(workdir):
    other = config_module.load('c_128_4x4_32_ram')
    checkpoint.save(workdir / 'other.pt', model=other.build_net(), config=other, epoch=1)
    for script in ('transform.py', 'ram.py'):
        result = run_script(script, '--cnf', CONFIG, '--weights_from', 'other.pt', cwd=workdir,
                            check=False)
        one_line_error(result, 'other.pt', 'c_128_4x4_32_ram', CONFIG)


def test_pickled_payload_in_a_weights_file_is_refused(workdir, tmp_path):
    marker = tmp_path / 'pwned'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    torch.save({'format': checkpoint.FORMAT, 'model': {}, 'payload': Payload()},
               workdir / 'evil.pt')
    with pytest.raises(UserError, match='refused to load'):
        checkpoint.load(workdir / 'evil.pt')
    result = run_script('train_nn.py', '--cnf', CONFIG, '--weights_from', 'evil.pt',
                        '--max_epochs', '1', cwd=workdir, check=False)
    one_line_error(result, 'evil.pt', 'refused to load')
    assert not marker.exists()


def test_feature_file_of_the_wrong_shape(workdir):
    features = workdir / 'data' / 'features'
    features.mkdir(parents=True)
    names = [p.stem for p in sorted((workdir / 'data' / 'train_tiny').glob('*.jpeg'))]
    np.save(features / f'{CONFIG}_train_mean_iter_1_skip_0.npy', np.zeros((len(names) - 3, 8)))
    (features / f'{CONFIG}_train_names_iter_1_skip_0.txt').write_text('\n'.join(names) + '\n')
    result = run_script('blend.py', '--features_file', f'{CONFIG}_train_mean_iter_1_skip_0.npy',
                        cwd=workdir, check=False)
    one_line_error(result, f'{CONFIG}_train_mean_iter_1_skip_0.npy', 'rows')


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


# ---------------------------------------------------------------- disks

def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_during_training_leaves_no_corrupt_weights(workdir):
    # Files over 200 kB cannot be written: the weights (~1 MB) hit the limit mid-write.
    process = start(['train_nn.py', '--cnf', CONFIG, '--max_epochs', '1', '--no_progress'],
                    workdir, preexec_fn=_limit_file_size(200_000))
    stdout, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    one_line_error(result, 'file size limit')
    run = workdir / 'weights' / CONFIG
    assert not weight_files(run), 'a partial weights file was left under its final name'
    assert not list(run.glob('.*.tmp'))


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


def test_unconverted_or_mixed_size_images_are_refused_not_squashed(workdir, synthetic_source):
    # train_nn.py and transform.py share the image cache that refuses them
    mixed = workdir / 'data' / 'mixed'
    shutil.copytree(workdir / 'data' / 'train_tiny', mixed)
    odd = sorted(mixed.iterdir())[5]
    with Image.open(odd) as image:
        image.resize((64, 64)).save(odd)
    for folder, words in ((synthetic_source / 'train', 'is not square'),
                          (mixed, f'{odd.name}: 64×64, but the other images are 128×128')):
        result = run_script('train_nn.py', '--cnf', CONFIG, '--train_dir', folder,
                            '--max_epochs', '1', '--no_progress', cwd=workdir, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert words in result.stderr and 'Traceback' not in result.stderr
    assert not (workdir / 'weights').exists()


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


@pytest.mark.parametrize('raised, code, words', [
    (ValueError('odd\nsecond line'), 1, 'error: unexpected ValueError: odd (a bug: rerun with '
                                        '--debug'),
    (RuntimeError('CUDA out of memory. Tried to allocate 2 GiB'), 1, 'error: out of memory'),
    (UserError('data/x.csv: fix it'), 2, 'error: data/x.csv: fix it'),
    (KeyboardInterrupt(), 130, 'interrupted. Continue with: --cnf c_9'),
])
def test_every_exception_ends_in_one_line_without_a_traceback(raised, code, words):
    import click
    from click.testing import CliRunner

    from retina.errors import handle_errors

    @click.command()
    @click.option('--cnf')
    @handle_errors(resume_hint='Continue with: --cnf {cnf}')
    def command(cnf):
        raise raised

    result = CliRunner().invoke(command, ['--cnf', 'c_9'])
    assert result.exit_code == code
    assert words in result.output and 'Traceback' not in result.output
    assert len(result.output.strip().splitlines()) == 1
    debug = CliRunner().invoke(command, ['--cnf', 'c_9', '--debug'])
    assert isinstance(debug.exception, type(raised)) or code == 130
