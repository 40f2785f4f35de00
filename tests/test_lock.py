"""retina.lock: a live lock refuses a second holder; a stale one is taken over."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from retina.core import lock


def test_a_live_lock_refuses_a_second_holder_and_a_stale_one_is_taken_over(tmp_path):
    path = tmp_path / 'run' / 'run.lock'
    notes = []
    with lock.hold(path, 'run', notes.append):
        owner = json.loads(path.read_text())
        assert owner['pid'] == os.getpid() and owner['host']
        # Another process (a child) finds it held: the message names the owner.
        code = ('import sys; from retina.core import lock\n'
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
    code = 'import sys; from retina.core import lock; lock._flock = lambda fd, p: None\n' \
           'try:\n    lock.hold(sys.argv[1], "run").__enter__()\n' \
           'except lock.Busy:\n    sys.exit(3)\n'
    result = subprocess.run([sys.executable, '-c', code, str(path)],
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 3  # its owner (this process) is alive
