"""Test-time-augmented feature extraction (transform.py) and reading feature files back.

For each of n_iter Halton augmentations the net's feature layer (RMS pool
for baseline nets, global average pool for RAM nets) is computed for every
image; the running mean and standard deviation over the iterations are
saved every 5 iterations.  Rows follow the sorted image list of the folder;
a names file beside each feature file records which image each row is.
"""
import re
from pathlib import Path

import numpy as np

from retina.errors import UserError

_STAT = re.compile(r'_(mean|std)_iter_')


def names_file_for(feature_path):
    """data/features/X_train_mean_iter_5_skip_0.npy -> data/features/X_train_names_iter_5_skip_0.txt"""
    feature_path = Path(feature_path)
    if not _STAT.search(feature_path.name):
        raise UserError(f'{feature_path}: not a feature file name (expected '
                        f'CNF_SPLIT_mean_iter_N_skip_K.npy as written by transform.py)')
    return feature_path.with_name(_STAT.sub('_names_iter_', feature_path.stem, count=1) + '.txt')


def load_features(path):
    """(array of shape (rows, features), list of image names), checked against each other."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: feature file not found; run transform.py for that config '
                        f'(e.g. python transform.py --cnf CNF --n_iter N --train --test)')
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise UserError(f'{path}: not a readable feature file ({error}); run transform.py '
                        f'again') from None
    if array.ndim != 2:
        raise UserError(f'{path}: expected a 2-d array (images × features), found shape '
                        f'{array.shape}; run transform.py again')
    names_path = names_file_for(path)
    if not names_path.is_file():
        raise UserError(f'{names_path}: missing (it lists the image of each row of {path.name}); '
                        f'run transform.py again')
    names = names_path.read_text().split()
    if len(names) != array.shape[0]:
        raise UserError(f'{path}: {array.shape[0]} rows but {names_path.name} lists {len(names)} '
                        f'images; the files are from different runs: run transform.py again')
    return array.astype(np.float32, copy=False), names
