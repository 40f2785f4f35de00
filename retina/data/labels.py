"""Labels, image lists, the patient-level split and class balancing (kappa: retina.core.metrics).

Names follow the competition: `{patient}_{left|right}`; levels are 0..4.
"""
import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from retina.core.errors import UserError, first_few
from retina.core.metrics import LEVELS
from retina.core.paths import patient_and_eye
from retina.data.images import image_name, list_images

MEAN = np.array([108.64628601, 75.86886597, 54.34005737], dtype=np.float32)
STD = np.array([70.53946096, 51.71475228, 43.03428563], dtype=np.float32)
BALANCE_WEIGHTS = np.array([1.3609453700116234, 14.378223495702006, 6.637566137566138,
                            40.235967926689575, 49.612994350282484])
FINAL_BALANCE_WEIGHTS = np.array([1.0, 2.0, 2.0, 2.0, 2.0])
BALANCE_RATIO = 0.975
VALIDATION_FRACTION = 0.1
SPLIT_SEED = 9


def load_labels(path):
    """Read `image,level` rows into {name: level}; every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: labels file not found; it needs the columns image,level '
                        f'(the Kaggle trainLabels.csv)')
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:  # Excel writes a BOM
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f'{path}: not a CSV file ({error})') from None
    if not rows:
        raise UserError(f'{path}: empty labels file; expected a header image,level')
    header = [h.strip().lower() for h in rows[0]]
    doubled = sorted({h for h in header if h and header.count(h) > 1})
    if doubled:  # which of the two would be the labels? refuse rather than guess
        raise UserError(f'{path}: column {", ".join(doubled)} appears more than once in the '
                        f'header; keep one image and one level column')
    missing = [c for c in ('image', 'level') if c not in header]
    if missing:
        raise UserError(f'{path}: missing column {", ".join(missing)}; the header must be '
                        f'image,level (found {",".join(rows[0])})')
    i_image, i_level = header.index('image'), header.index('level')
    labels = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        try:
            name, level = row[i_image].strip(), row[i_level].strip()
        except IndexError:
            raise UserError(f'{path}, line {line}: expected {len(header)} columns, '
                            f'found {len(row)}') from None
        try:
            value = float(level)
        except ValueError:
            raise UserError(f'{path}, line {line}: level {level!r} of {name} is not a number '
                            f'0..4') from None
        if value not in LEVELS:
            raise UserError(f'{path}, line {line}: level {level} of {name} is outside 0..4; '
                            f'fix the label')
        if name in labels:
            raise UserError(f'{path}, line {line}: {name} is listed twice; keep one row per image')
        labels[name] = int(value)
    if not labels:
        raise UserError(f'{path}: no labels in the file')
    return labels


def labelled_images(folder, labels_file, echo=None):
    """Image paths of `folder` and their levels; images without a label are an error.

    Labels of images that are not in the folder are ignored; `echo` hears how many.
    """
    paths = list_images(folder)
    labels = load_labels(labels_file)
    unlabelled = [image_name(p) for p in paths if image_name(p) not in labels]
    if unlabelled:
        raise UserError(f'{labels_file}: no label for {len(unlabelled)} image(s) of {folder}: '
                        f'{first_few(unlabelled, 5)}; add rows for them or remove the images')
    absent = len(labels) - len(paths)
    if absent > 0 and echo is not None:
        echo(f'note: {absent} image(s) named in {labels_file} are not in {folder}; '
             f'they are ignored')
    return paths, np.array([labels[image_name(p)] for p in paths], dtype=np.int64)


def lone_eyes(names):
    """The names among `names` whose patient has no other eye among them (a per-patient blend
    pairs each eye with its partner; these are blended with themselves)."""
    eyes = defaultdict(set)
    for name in names:
        patient, eye = patient_and_eye(name)
        eyes[patient].add(eye)
    return [n for n in names if len(eyes[patient_and_eye(n)[0]] - {''}) < 2]


HOLD_OUT_SALT = 'retina test split'


def held_out(name, fraction):
    """Whether image `name`'s patient belongs to the test split of `fraction` of the patients
    (train_nn.py --hold_out): the rule is the patient id alone, so both eyes fall together
    and a patient is on the same side in every folder (eyepacs256, raw photos), run and
    machine.  The first 8 bytes of sha256('retina test split:' + patient id), read as an
    unsigned big-endian integer and divided by 2**64, below `fraction`."""
    if not fraction:
        return False
    patient = patient_and_eye(name)[0]
    digest = hashlib.sha256(f'{HOLD_OUT_SALT}:{patient}'.encode()).digest()
    return int.from_bytes(digest[:8], 'big') / 2 ** 64 < fraction


def split_indices(names, levels, fraction=VALIDATION_FRACTION, seed=SPLIT_SEED):
    """Split by patient (both eyes on one side), stratified by the patient's worst level.

    Returns (train_indices, valid_indices).  Levels with a single patient are
    allowed: each level group contributes round(fraction × patients) to validation.  When
    that rounds to nobody at all (under ~15 patients), one patient of the largest level
    validates, so that small trial sets still get a validation score.
    """
    by_patient = defaultdict(list)
    for index, name in enumerate(names):
        by_patient[patient_and_eye(name)[0]].append(index)
    patients = sorted(by_patient)
    patient_level = {p: max(int(levels[i]) for i in by_patient[p]) for p in patients}
    rng = np.random.RandomState(seed)
    valid, groups = [], []
    for level in LEVELS:
        group = [p for p in patients if patient_level[p] == level]
        rng.shuffle(group)
        groups.append(group)
        valid.extend(group[:int(round(fraction * len(group)))])
    if not valid and fraction > 0 and len(patients) >= 2:
        # Small sets: every level rounds to zero; validate on one patient of the largest level.
        valid.append(max(groups, key=len)[0])
    valid = set(valid)
    valid_idx = sorted(i for p in valid for i in by_patient[p])
    train_idx = sorted(i for p in patients if p not in valid for i in by_patient[p])
    return np.array(train_idx, dtype=np.int64), np.array(valid_idx, dtype=np.int64)


def split_rows(names, levels, hold_out):
    """(training rows, validation rows, test rows) of the images `names` (with their
    `levels`), as train_nn.py --hold_out split them."""
    test = np.array([held_out(n, hold_out) for n in names])
    rest = np.flatnonzero(~test)
    train, valid = split_indices([names[i] for i in rest], levels[rest])
    return rest[train], rest[valid], np.flatnonzero(test)


def balance_weights_at(epoch, ratio=BALANCE_RATIO, weights=None):
    """Class weights at `epoch` (from 0): decays from the balance `weights` [default: the
    Kaggle BALANCE_WEIGHTS; a config's `balance_weights`] to the FINAL weights."""
    start = BALANCE_WEIGHTS if weights is None else np.asarray(weights, dtype=np.float64)
    decay = ratio ** epoch
    return start * decay + FINAL_BALANCE_WEIGHTS * (1 - decay)


def balanced_sample(levels, epoch, rng, n=None, ratio=BALANCE_RATIO, weights=None):
    """Draw `n` (default len(levels)) indices with replacement, ∝ the class weight at `epoch`
    (`balance_weights_at`, from the balance `weights`)."""
    levels = np.asarray(levels)
    weights = balance_weights_at(epoch, ratio, weights)[levels]
    return rng.choice(len(levels), size=len(levels) if n is None else n, replace=True,
                      p=weights / weights.sum())
