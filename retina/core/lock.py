"""One writer at a time: a lock file that names its owner and dies with it.

Two trainings of one config write the same weights/NAME/ folder; without a
lock the second would move the first's folder aside while the first goes on
writing into it, and one run's weights would be lost (two transform.py runs of
one config and split would likewise mix their feature files).  The lock is a
file beside what it protects, holding the owner's pid, host and start time,
locked with `flock`: the kernel releases that when the owner dies, however it
dies, so a lock file left by a killed run is recognised as stale and taken
over.  Where
the file system has no `flock` (some network mounts), a lock is stale when
its pid is no longer alive on this host; one of another host is reported
with its owner and left for the user to remove.
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from retina.core import atomic
from retina.core.errors import UserError


class Busy(UserError):
    """Another live process holds the lock."""


def _owner_of(path):
    """The owner record in a lock file ({} if empty or not one)."""
    try:
        owner = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner):
    if not owner:
        return 'another process'
    return (f'pid {owner.get("pid")} on {owner.get("host")} (started '
            f'{owner.get("started", "?")})')


def _created_folders(folder):
    """Create `folder` and its missing parents; returns those that were created, deepest first."""
    missing = []
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            break
        missing.append(candidate)
    folder.mkdir(parents=True, exist_ok=True)
    return missing


@contextlib.contextmanager
def hold(path, what, echo=print):
    """Hold the lock file `path` for the block; `what` says what it protects (for messages).

    A live owner is a `Busy` error naming it; a stale lock is taken over with a
    note.  On exit the lock file is removed, and so are the folders that were
    created for it if they are still empty (a run that failed in its setup
    leaves nothing behind).
    """
    path = Path(path)
    created = _created_folders(path.parent)
    fd = _acquire(path, what, echo)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # unlinked before release: a waiter re-checks the inode
        os.close(fd)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # fails, as it should, if anything was written there


def _acquire(path, what, echo):
    for _ in range(50):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed by an owner that just ended
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            locked = _flock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        if locked is False:
            owner = _owner_of(path)
            os.close(fd)
            raise Busy(f'{what} is in use by {_describe(owner)}, whose lock is {path}; wait for '
                       f'that run to end, or stop it')
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous owner removed the file between our open and lock: retry
            os.close(fd)
            continue
        if locked is None and not _take_without_flock(path, what):
            os.close(fd)
            continue
        previous = _owner_of(path)
        if previous and previous.get('pid') != os.getpid():
            echo(f'note: {path} was left by {_describe(previous)}, which has ended; taking it '
                 f'over')
        _write_owner(fd)
        return fd
    raise UserError(f'{path}: could not take the lock (it keeps changing); try again')


def _flock(fd, path):
    """True if locked, False if another process holds it, None if flock is unsupported here."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _take_without_flock(path, what):
    """No flock: the lock is free if empty, ours, or left by a dead pid on this host."""
    owner = _owner_of(path)
    if not owner or owner.get('pid') == os.getpid():
        return True
    if owner.get('host') != socket.gethostname():
        raise Busy(f'{what} is locked by {_describe(owner)}; if no run is alive there, delete '
                   f'{path} and start again')
    if atomic.pid_alive(owner.get('pid')):
        raise Busy(f'{what} is in use by {_describe(owner)}, whose lock is {path}; wait for '
                   f'that run to end, or stop it')
    return True


def _write_owner(fd):
    record = dict(pid=os.getpid(), host=socket.gethostname(),
                  started=time.strftime('%Y-%m-%d %H:%M:%S'))
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + '\n').encode(), 0)
