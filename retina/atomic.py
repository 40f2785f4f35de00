"""Write files so that an interrupted run never leaves a half-written one.

Everything is written to a hidden temporary file (`.NAME.XXXX.tmp`) in the
destination folder and renamed into place; on any error the temporary file
is removed, and the leftovers of a killed writer are removed by the next
write of the same file.  Writers pass the format explicitly: the temporary
name has no meaningful extension.
"""
import contextlib
import glob
import os
import tempfile
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a killed writer of the same file: never read, safe to drop.
    for stale in path.parent.glob(f'.{glob.escape(path.name)}.*.tmp'):
        with contextlib.suppress(OSError):
            stale.unlink()
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


def _temporary_beside(path):
    """Create an empty hidden `.NAME.XXXX.tmp` beside `path`; an OSError names `path`."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    except OSError as error:
        raise _naming(error, path) from None
    os.close(fd)
    return tmp


def check_writable(path):
    """Fail now, not after hours of work, if `path` cannot be written (OSError naming it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.remove(_temporary_beside(path))


def write_bytes(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


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
