"""retina.atomic: taken names are never overwritten; a writer never removes another live writer's
temporary file."""
import subprocess
import sys

from retina.core import atomic


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
