"""Which feature files the blend reads, and checking them before any fit (blend.py).

A *run* is a list of train feature files (e.g. the mean and std features of two configs),
concatenated side by side; blend.yml names the runs (`load_blend_config`), or blend.py's
--features_file, --blend_cnf and --cnf do (`runs_from_options`).  A train file's test
partner has _test_ for _train_ in its name (`matching_test_file`).  `check_runs` reads every
names file (against each other, the labels and the test folder) before the first fit, so that
bad input stops blend.py at once; `runs_hold_out` finds the test split of the nets behind the
features.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from retina.core import paths
from retina.core.errors import UserError, first_few
from retina.data.images import image_name, list_images
from retina.features.files import load_features, names_file_for, read_names, source_of

DEFAULT_BLEND_CONFIG = Path('blend.yml')
DEFAULT_TEST_DIR = paths.DATA_DIR / 'test_medium'


# ---------------------------------------------------------------- which files

def resolve_feature_path(entry):
    """A bare file name is looked up in data/features/ (then the working directory);
    anything with a folder part is used as given."""
    path = Path(entry).expanduser()
    if path.is_absolute() or path.parent != Path('.'):
        return path
    in_features = paths.FEATURES_DIR / path
    return path if path.is_file() and not in_features.is_file() else in_features


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice (plain YAML keeps the last: a run would vanish)."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f'{key!r} is given twice (each run needs its own name)',
                key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _mapping_without_duplicates)


def load_blend_config(path):
    """{run name: [train feature paths]} from a YAML mapping; every file must exist."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: blend config not found; create it (a YAML mapping of run name '
                        f'to a list of train feature files, like blend.yml in the repository) '
                        f'or pass --features_file or --cnf')
    try:
        content = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, 'problem_mark', None)
        where = f', line {mark.line + 1}' if mark is not None else ''
        problem = getattr(error, 'problem', None) or str(error).splitlines()[0]
        raise UserError(f'{path}{where}: not valid YAML ({problem}); fix the file') from None
    except UnicodeDecodeError:
        raise UserError(f'{path}: not a text file; expected a YAML mapping of run name to '
                        f'train feature files') from None
    if not isinstance(content, dict) or not content:
        raise UserError(f'{path}: expected a mapping of run name to a list of train feature '
                        f'files (e.g. "my_run: [c_512_5x5_32_train_mean_iter_50_skip_0.npy]"), '
                        f'found {type(content).__name__ if content is not None else "nothing"}')
    runs = {}
    for name, files in content.items():
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise UserError(f'{path}: run {name!r} must be a list of train feature file names '
                            f'(e.g. - c_512_5x5_32_train_mean_iter_50_skip_0.npy)')
        resolved = [resolve_feature_path(f) for f in files]
        for entry, file in zip(files, resolved):
            if not file.is_file():
                raise UserError(f'{path}: run {name!r} names {entry}, but {file} does not exist; '
                                f'run transform.py for that config (python transform.py --cnf CNF '
                                f'--n_iter N --train --test) or fix the entry')
        if str(name) in runs:  # e.g. 1 and '1'
            raise UserError(f'{path}: run name {str(name)!r} is given twice; give each run its '
                            f'own name')
        runs[str(name)] = resolved
    return runs


def latest_features(cnf_name):
    """The most recently written train mean+std feature pair of a config."""
    candidates = []
    for mean in paths.FEATURES_DIR.glob(f'{cnf_name}_train_mean_iter_*_skip_*.npy'):
        parts = paths.parse_features(mean)
        if parts is None or parts.cnf != cnf_name:
            continue
        std = paths.features(cnf_name, 'train', 'std', parts.n_iter, parts.skip)
        if std.is_file():
            candidates.append((mean.stat().st_mtime, parts.n_iter, mean, std))
    if not candidates:
        raise UserError(f'{paths.FEATURES_DIR}: no train mean+std features of {cnf_name} '
                        f'(looked for {cnf_name}_train_mean_iter_N_skip_K.npy and its _std_ '
                        f'partner); run python transform.py --cnf {cnf_name} --train --test '
                        f'first, or name the files with --features_file')
    _, _, mean, std = max(candidates, key=lambda c: (c[0], c[1]))
    return [mean, std]


def runs_from_options(features_files=(), blend_config=None, cnf_name=None):
    """The runs blend.py fits: --features_file, else --blend_cnf, else the config's latest
    features (--cnf), else blend.yml in the working directory."""
    if features_files and blend_config:
        raise UserError(f'{blend_config}: --blend_cnf and --features_file both given; use one '
                        f'(--features_file replaces the blend config)')
    if features_files:
        return {cnf_name or 'features': [resolve_feature_path(f) for f in features_files]}
    if blend_config:
        return load_blend_config(blend_config)
    if cnf_name:
        return {cnf_name: latest_features(cnf_name)}
    return load_blend_config(DEFAULT_BLEND_CONFIG)


def matching_test_file(train_path):
    """X_train_mean_iter_5_skip_0.npy -> X_test_mean_iter_5_skip_0.npy, in the same folder."""
    train_path = Path(train_path)
    parts = paths.parse_features(train_path)
    if parts is None or parts.split != 'train':
        raise UserError(f'{train_path}: cannot tell its test features: the name has no _train_ '
                        f'before mean/std (expected CNF_train_mean_iter_N_skip_K.npy)')
    return train_path.with_name(paths.features(parts.cnf, 'test', parts.stat, parts.n_iter,
                                               parts.skip).name)


# ---------------------------------------------------------------- reading a run


def run_names(files):
    """The image names of a run's files, which must list the same images in the same order."""
    names = read_names(files[0])
    for file in files[1:]:
        other = read_names(file)
        if other != names:
            row = next((i for i, pair in enumerate(zip(other, names)) if pair[0] != pair[1]),
                       min(len(other), len(names)))
            found = other[row] if row < len(other) else 'nothing'
            expected = names[row] if row < len(names) else 'nothing'
            raise UserError(f'{file}: its rows are not the images of {files[0]} in the same order '
                            f'(row {row + 1} is {found}, not {expected}); extract the features of '
                            f'a run from the same image folder (run transform.py again)')
    return names


def load_run(files):
    """Concatenate a run's feature files side by side: (array, names); rows must be finite."""
    names = run_names(files)
    blocks = []
    for file in files:
        array, file_names = load_features(file)
        if file_names != names:
            raise UserError(f'{file}: its names file changed while blend.py was reading it; run '
                            f'blend.py again once transform.py has finished')
        if not np.isfinite(array).all():
            raise UserError(f'{file}: contains NaN or infinite values; run transform.py again')
        blocks.append(array)
    return (blocks[0] if len(blocks) == 1 else np.hstack(blocks)), names


def reorder_rows(array, names, order, file, reference):
    """`array`'s rows put in the order of the image names `order` (same set required)."""
    if names == order:
        return array
    row_of = {name: i for i, name in enumerate(names)}
    if set(row_of) != set(order):
        raise UserError(f'{file}: its images are not those of {reference} ({len(names)} vs '
                        f'{len(order)}); all runs need features of the same training images')
    return array[[row_of[name] for name in order]]


def labels_for(names, labels, labels_file, names_source):
    missing = [name for name in names if name not in labels]
    if missing:
        raise UserError(f'{labels_file}: no label for {len(missing)} of the {len(names)} images '
                        f'of {names_source} ({first_few(missing)}); use the labels of the images '
                        f'transform.py read (--labels) or extract features of labelled images')
    return np.array([labels[name] for name in names], dtype=np.int64)


# ---------------------------------------------------------------- checks before the first fit

def submission_images(test_dir, test_dir_required, first_test_file, first_test_names, echo):
    """Names the submission needs: the images of `test_dir`, or the first run's test names.

    Returns (names, where they come from)."""
    test_dir = Path(test_dir) if test_dir is not None else DEFAULT_TEST_DIR
    if test_dir.is_dir():
        return [image_name(p) for p in list_images(test_dir)], str(test_dir)
    if test_dir_required:
        raise UserError(f'{test_dir}: no such folder; pass the folder of converted test images '
                        f'(--test_dir) that transform.py --test read')
    names_path = names_file_for(first_test_file)
    echo(f'note: {test_dir} not found; writing one row per image named in {names_path} '
         f'({len(first_test_names)} images)')
    return list(first_test_names), str(names_path)


def check_same_weights(train_file, test_file):
    """Train and test features of a run must come from the same weights (the fingerprints
    transform.py records beside them); features from before those records are not checked."""
    train, test = source_of(train_file), source_of(test_file)
    if not (train and test and train.get('fingerprint') and test.get('fingerprint')):
        return
    if train['fingerprint'] != test['fingerprint']:
        raise UserError(f'{test_file}: made with other weights than {train_file} ('
                        f'{test.get("weights")} vs {train.get("weights")}, fingerprints '
                        f'{test["fingerprint"]} vs {train["fingerprint"]}); a blend fitted on '
                        f'one net\'s features cannot score another\'s: run transform.py --train '
                        f'--test again with one weights file')


@dataclass
class BlendPlan:
    """What the names files say, checked before any fitting."""
    names: list            # training images, in the first run's row order
    levels: np.ndarray     # their labels
    test_names: list = None  # the images the submission needs (with --predict)


def check_runs(runs, labels, labels_file, predict, test_dir, test_dir_required, echo):
    """Check every run's names files against each other, the labels and the test images,
    so that bad input stops the blend before the first fit."""
    plan, first, test_source = None, None, None
    for files in runs.values():
        names = run_names(files)
        if plan is None:
            first = files[0]
            plan = BlendPlan(names, labels_for(names, labels, labels_file, names_file_for(first)))
        elif set(names) != set(plan.names):
            raise UserError(f'{files[0]}: its images are not those of {first} ({len(names)} vs '
                            f'{len(plan.names)}); all runs need features of the same training '
                            f'images')
        if predict:
            test_files = [matching_test_file(f) for f in files]
            test_names = run_names(test_files)
            for train_file, test_file in zip(files, test_files):  # shapes only: no reading yet
                train_width = load_features(train_file, mmap=True)[0].shape[1]
                test_width = load_features(test_file, mmap=True)[0].shape[1]
                if train_width != test_width:
                    raise UserError(f'{test_file}: {test_width} features per image but '
                                    f'{train_file} has {train_width}; extract train and test '
                                    f'features with the same config (transform.py --train '
                                    f'--test)')
                check_same_weights(train_file, test_file)
            if plan.test_names is None:
                plan.test_names, test_source = submission_images(
                    test_dir, test_dir_required, test_files[0], test_names, echo)
            covered = set(test_names)
            missing = [name for name in plan.test_names if name not in covered]
            if missing:
                raise UserError(f'{test_files[0]}: no features for {len(missing)} of the '
                                f'{len(plan.test_names)} test images of {test_source} '
                                f'({first_few(missing)}); run transform.py --test on that folder '
                                f'(with --test_dir)')
    return plan


def runs_hold_out(runs, echo):
    """The test split (train_nn.py --hold_out) of the nets behind the runs' features, as
    transform.py recorded it beside them (`source_of`); for features recorded before it did,
    the hold_out of the weights file they name (each file read once), or None.  Nets with
    different test splits cannot be blended honestly: the larger split is kept out."""
    from retina.model import checkpoint
    found, of_weights = [], {}
    for files in runs.values():
        for file in files:
            source = source_of(file) or {}
            weights = source.get('weights')
            if 'hold_out' in source:
                found.append(source['hold_out'])
            elif weights and released_or_file(weights):
                if weights not in of_weights:
                    state = checkpoint.load(weights)
                    of_weights[weights] = checkpoint.config_of(state).cnf.get('hold_out')
                found.append(of_weights[weights])
    fractions = {value or 0 for value in found}
    if len(fractions) > 1:
        echo(f'note: the nets were trained with different test splits (hold_out '
             f'{", ".join(str(f) for f in sorted(fractions))}); the largest is kept out')
    return max(fractions, default=0) or None


def released_or_file(weights):
    from retina.model import released
    try:
        return released.weights_path(weights).is_file()
    except UserError:
        return False
