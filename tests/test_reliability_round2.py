"""Reliability, round two: concurrent runs, resource bombs, stale or poisoned inputs,
and user mistakes that must be one-line errors, not "unexpected ... (a bug)".

Mostly unit-level with tiny files; a few CLI runs check what a user sees.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from retina import atomic, checkpoint, config as config_module, lock, paths
from retina.errors import UserError

CONFIG = 'c_128_5x5_32_ram'


def one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    assert 'Traceback' not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith('error:')]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


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
