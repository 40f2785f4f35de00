"""Write files so that an interrupted run never leaves a half-written one.

Everything is written to a hidden temporary file (`.NAME.HOST.PID.XXXX.tmp`)
in the destination folder and renamed into place; on any error the temporary
file is removed.  The name carries its writer, so that the next write of the
same file removes only the leftovers of writers that are dead (or, from
another host, untouched for a day), never the file another live process is
still writing.  Writers pass the format explicitly: the temporary name has no
meaningful extension.

`write_new` and `new_folder` never replace anything: they take the first free
name of `path`, `path-1`, ... (two submissions written in the same second).
"""
import contextlib
import errno
import glob
import os
import socket
import tempfile
import time
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)
_HOST = socket.gethostname().replace('.', '_').replace('/', '_') or 'host'
_FOREIGN_STALE_SECONDS = 24 * 3600


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_dead_writers(path)
    tmp = _temporary_beside(path)
    # mkstemp makes the file private (0600); give it the mode a plain open() would.
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(error, OSError) and error.filename in (None, tmp, Path(tmp)):
            raise _naming(error, path) from None
        raise


def _naming(error, path):
    """The same OSError about `path` itself, not its hidden temporary file."""
    return OSError(error.errno, error.strerror or str(error), str(path))


def pid_alive(pid):
    """Whether process `pid` exists on this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, TypeError, OverflowError):  # EPERM: alive, another user's
        return True
    return True


def _drop_dead_writers(path):
    """Remove temporary files of `path` whose writer is gone (killed): never read, safe to drop."""
    prefix = f'.{path.name}.'
    for stale in path.parent.glob(f'{glob.escape(prefix)}*.tmp'):
        host, _, rest = stale.name[len(prefix):].partition('.')
        pid, dead = rest.partition('.')[0], False
        if host == _HOST and pid.isdigit():
            dead = not pid_alive(pid)
        else:  # another host's writer (or an old-style name): only when long untouched
            with contextlib.suppress(OSError):
                dead = time.time() - stale.stat().st_mtime > _FOREIGN_STALE_SECONDS
        if dead:
            with contextlib.suppress(OSError):
                stale.unlink()


def _temporary_beside(path):
    """Create an empty hidden `.NAME.HOST.PID.XXXX.tmp` beside `path`; an OSError names `path`."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.{_HOST}.{os.getpid()}.', suffix='.tmp',
                                   dir=path.parent)
    except OSError as error:
        raise _naming(error, path) from None
    os.close(fd)
    return tmp


def check_writable(path):
    """Fail now, not after hours of work, if `path` cannot be written (OSError naming it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.remove(_temporary_beside(path))


def write_new(path, text):
    """Write `text` under the first free name of `path`, `path-1`, ...; returns the name used.

    The file appears whole (a hard link to the finished temporary file) and
    never replaces a file, whoever wrote it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_dead_writers(path)
    tmp = Path(_temporary_beside(path))
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        tmp.write_text(text, encoding='utf-8')
        for number in range(1000):
            candidate = _numbered(path, number)
            try:
                os.link(tmp, candidate)
                return candidate
            except FileExistsError:
                continue
            except OSError as error:
                if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise _naming(error, candidate) from None
            if _reserve(candidate):  # no hard links on this file system: claim, then fill
                os.replace(tmp, candidate)
                return candidate
        raise FileExistsError(errno.EEXIST, 'a thousand files of this name exist', str(path))
    except OSError as error:
        if error.filename in (None, str(tmp), tmp):
            raise _naming(error, path) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _numbered(path, number):
    return path if number == 0 else path.with_name(f'{path.stem}-{number}{path.suffix}')


def _reserve(path):
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        return False
    return True


def new_folder(path):
    """Create the first free folder of `path`, `path-1`, ...; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for number in range(1000):
        candidate = path if number == 0 else path.with_name(f'{path.name}-{number}')
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, 'a thousand folders of this name exist', str(path))


def write_bytes(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding='utf-8')


def save_npy(path, array):
    import numpy as np
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            np.save(f, array)


def save_image(path, image, **save_kwargs):
    """Save a PIL image atomically; the format comes from `path`'s extension."""
    from PIL import Image
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **save_kwargs)


def torch_save(path, obj):
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
