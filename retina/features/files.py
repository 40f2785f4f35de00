"""Feature files: the arrays transform.py writes, their names files and source records.

Per config, split, number of TTA iterations and Halton skip, transform.py
writes a mean and a std array (float32 .npy, one row per image), a names file
listing the image of each row, and a source record (the weights' fingerprint
and the images' identity).  Reading them needs numpy only, so blend.py starts
quickly; the extraction that writes them is in `retina.features.extract`.
"""
import json
from pathlib import Path

import numpy as np

from retina.core import atomic, paths
from retina.core.errors import UserError


def mean_and_std(total, total_sq, count):
    """The TTA mean and standard deviation of features from their sums over `count`
    iterations (transform.py saves them; predict.py computes them for a blend)."""
    mean = total / count
    return mean, np.sqrt(np.maximum(total_sq / count - mean ** 2, 0))

def _parts(feature_path):
    parts = paths.parse_features(feature_path)
    if parts is None:
        raise UserError(f'{feature_path}: not a feature file name (expected '
                        f'CNF_SPLIT_mean_iter_N_skip_K.npy as written by transform.py)')
    return parts


def names_file_for(feature_path):
    """X_train_mean_iter_5_skip_0.npy -> X_train_names_iter_5_skip_0.txt, in the same folder."""
    p = _parts(feature_path)
    return Path(feature_path).with_name(paths.feature_names(p.cnf, p.split, p.n_iter,
                                                            p.skip).name)


def source_of(feature_path):
    """What transform.py recorded about the weights (and images) a feature file came from:
    the dict of X_SPLIT_source_iter_N_skip_K.json beside it, or None if there is none."""
    p = _parts(feature_path)
    source = Path(feature_path).with_name(paths.feature_source(p.cnf, p.split, p.n_iter,
                                                               p.skip).name)
    try:
        recorded = json.loads(source.read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def read_names(feature_path):
    """The image names of a feature file's rows, from its names file (the array is not read)."""
    feature_path = Path(feature_path)
    if not feature_path.is_file():
        raise UserError(f'{feature_path}: feature file not found; run transform.py for that '
                        f'config (e.g. python transform.py --cnf CNF --n_iter N --train --test)')
    names_path = names_file_for(feature_path)
    if not names_path.is_file():
        raise UserError(f'{names_path}: missing (it lists the image of each row of '
                        f'{feature_path.name}); run transform.py again')
    # One name per line, read back exactly: a name may hold spaces or commas.
    names = names_path.read_text(encoding='utf-8').split('\n')
    if names and names[-1] == '':
        names.pop()
    duplicates = len(names) - len(set(names))
    if duplicates:
        raise UserError(f'{names_path}: {duplicates} image name(s) listed more than once; run '
                        f'transform.py again')
    return names


def load_features(path, mmap=False):
    """(array of shape (rows, features), list of image names), checked against each other.

    `mmap` maps the file instead of reading it: for checking shapes before any work.
    """
    path = Path(path)
    names = read_names(path)
    try:
        array = np.load(path, allow_pickle=False, mmap_mode='r' if mmap else None)
    except (ValueError, OSError, EOFError) as error:
        raise UserError(f'{path}: not a readable feature file ({error}); run transform.py '
                        f'again') from None
    if not isinstance(array, np.ndarray):  # np.load opens a .npz archive as a mapping
        if hasattr(array, 'close'):
            array.close()
        raise UserError(f'{path}: a .npz archive, not the .npy array transform.py writes; '
                        f'use transform.py\'s feature files (or save the array with np.save)')
    if array.dtype.names is not None or array.dtype.kind not in 'fiu':
        what = ('a structured array' if array.dtype.names is not None else
                'complex numbers' if array.dtype.kind == 'c' else f'{array.dtype} values')
        raise UserError(f'{path}: holds {what}, not real-valued features; use the files '
                        f'transform.py writes (float32)')
    if array.ndim != 2:
        raise UserError(f'{path}: expected a 2-d array (images × features), found shape '
                        f'{array.shape}; run transform.py again')
    if 0 in array.shape:
        raise UserError(f'{path}: empty ({array.shape[0]} images × {array.shape[1]} features); '
                        f'run transform.py again')
    if len(names) != array.shape[0]:
        raise UserError(f'{path}: {array.shape[0]} rows but {names_file_for(path).name} lists '
                        f'{len(names)} images; the files are from different runs: run '
                        f'transform.py again')
    return (array if mmap else array.astype(np.float32, copy=False)), names


def save(config_name, split, done, skip, names, mean, std, source):
    """Write one save point of an extraction: names, mean and std, then the source record.

    The source goes last: a run killed before it leaves files a rerun will not trust.
    """
    atomic.write_text(paths.feature_names(config_name, split, done, skip),
                      '\n'.join(names) + '\n')
    for stat, value in (('mean', mean), ('std', std)):
        atomic.save_npy(paths.features(config_name, split, stat, done, skip),
                        value.astype(np.float32))
    atomic.write_text(paths.feature_source(config_name, split, done, skip), json.dumps(source))
