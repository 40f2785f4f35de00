"""Shared fixtures: a small synthetic data set converted to 128 px, a script runner, and the
helpers of the fault-injection tests (start a script, kill it when a condition holds, check
that what it left on disk loads)."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / 'shared' / 'data'  # real photographs, where present


def pytest_collection_modifyitems(config, items):
    """The tests marked slow run first (the rest keep their order): with several workers (make
    test) a minutes-long test starts while the short ones fill the other workers, instead of
    one worker running it alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker('slow') is None)


def run_script(script, *args, cwd, check=True, timeout=600, env=None):
    """Run one of the repository's scripts in `cwd`; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    result = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f'{script} {" ".join(map(str, args))} failed '
                             f'({result.returncode}):\n{result.stdout[-3000:]}\n'
                             f'{result.stderr[-3000:]}')
    return result


def noise_images(folder, count, side=128):
    """`count` random side × side PNGs named 0_left.png, 1_left.png, ... in a new `folder`
    (a converted folder's shape, for feature extraction); their (count, side, side, 3) pixels."""
    import numpy as np
    from PIL import Image
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (count, side, side, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f'{i}_left.png')
    return pixels


def one_line_error(result, *fragments):
    """The run failed with exactly one line on stderr, containing every fragment."""
    assert result.returncode != 0, result.stdout
    assert 'Traceback' not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith('error:')]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope='session')
def synthetic_source(tmp_path_factory):
    """Raw synthetic photos: train/, test/, trainLabels.csv, testLabels.csv, masks/."""
    from retina.data.synthetic import generate
    out = tmp_path_factory.mktemp('synthetic')
    generate(out, n_patients=40, seed=3, width=300, height=200, progress=False)
    return out


@pytest.fixture(scope='session')
def converted_workdir(tmp_path_factory, synthetic_source):
    """A working directory laid out like the project: data/train_tiny, data/test_tiny, labels."""
    from retina.data.conversion import convert_folder
    work = tmp_path_factory.mktemp('work')
    data = work / 'data'
    data.mkdir()
    for split in ('train', 'test'):
        convert_folder(synthetic_source / split, data / f'{split}_tiny', 128, 'jpeg', n_proc=1,
                       progress=False)
    shutil.copy(synthetic_source / 'trainLabels.csv', data / 'trainLabels.csv')
    return work


@pytest.fixture
def workdir(converted_workdir, tmp_path):
    """A fresh copy of the converted working directory for tests that write into it."""
    target = tmp_path / 'work'
    shutil.copytree(converted_workdir, target, ignore=shutil.ignore_patterns('weights', 'cache'))
    return target


def as_loaded(config, net, weights='unsaved.pt', preprocessing='none'):
    """`net` (built here, never saved) as the `checkpoint.LoadedNet` the later stages take."""
    from pathlib import Path

    from retina.model.checkpoint import InputSpec, LoadedNet
    return LoadedNet(config=config, net=net, weights=Path(weights),
                     spec=InputSpec.of_config(config, preprocessing), state={})


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


def kill_when(process, condition, timeout=120):
    """SIGKILL `process` as soon as `condition()` holds (polled, not slept on); its return code:
    -SIGKILL when the kill landed while it was still running, its own when it ended first.
    When `condition()` has not held after `timeout` seconds of the process running, the process
    is killed and the test fails, with its last output: a kill then would test nothing."""
    deadline = time.monotonic() + timeout
    timed_out = False
    while process.poll() is None and not condition():
        if time.monotonic() >= deadline:
            timed_out = True
            break
        time.sleep(0.005)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    if timed_out:
        pytest.fail(f'the condition of the kill never held in {timeout} s of '
                    f'{" ".join(map(str, process.args[1:]))}; its stderr:\n{stderr[-3000:]}')
    return process.returncode


def weight_files(folder):
    return sorted(p for p in folder.rglob('*.pt') if not p.name.startswith('.'))


def assert_loadable(folder, allow_empty=False):
    """Every weights file under `folder` loads, with finite weights; a folder without one fails
    unless `allow_empty` (a run killed before its first checkpoint)."""
    from retina.model import checkpoint
    files = weight_files(folder)
    assert files or allow_empty, f'no weights file under {folder}'
    for path in files:
        state = checkpoint.load(path)
        assert all(torch.isfinite(v).all() for v in state['model'].values()), path


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply
