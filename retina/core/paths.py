"""Where every file of the pipeline lives, keyed on the config name.

The layout follows the original solution (data/, weights/{cnf}/, feature and
submission names); scripts ask this module for paths instead of joining
strings.  Paths are relative to the working directory unless given absolute.
"""
import datetime
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path('data')
WEIGHTS_DIR = Path('weights')
LABELS_FILE = DATA_DIR / 'trainLabels.csv'
FEATURES_DIR = DATA_DIR / 'features'
CACHE_DIR = DATA_DIR / 'cache'
RAM_DIR = DATA_DIR / 'ram'
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.tif', '.tiff')


def resolved(path):
    """`path` made absolute with its links followed, as far as they lead: a link loop or an
    unreadable folder on the way leaves the rest as written (Path.resolve raises there), so a
    check that compares paths never fails on a bad entry it is not about."""
    import os
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(path))


def timestamp():
    return datetime.datetime.now().strftime('%Y%m%d-%H%M%S')


def run_dir(cnf_name):
    """The folder of one config's training run: weights, log.csv, config.json."""
    return WEIGHTS_DIR / cnf_name


def run_lock(cnf_name):
    """Held by the training that writes the run folder (pid, host, start time inside)."""
    return run_dir(cnf_name) / 'run.lock'


def earlier_run_dir(cnf_name):
    """Where a new run moves the folder of an earlier run of the same config."""
    return WEIGHTS_DIR / f'{cnf_name}.earlier-{timestamp()}'


def best_kappa_weights(cnf_name):
    return best_kappa_in(run_dir(cnf_name))


def best_kappa_in(folder):
    """The best-kappa weights of a run folder (weights/CNF/ or a --run_dir)."""
    return Path(folder) / 'weights.pt'


def final_weights(cnf_name):
    return run_dir(cnf_name) / 'weights_final.pt'


def best_loss_weights(cnf_name, epoch, valid_loss):
    return run_dir(cnf_name) / 'best' / f'{epoch:04d}_{timestamp()}_{valid_loss:.6f}.pt'


def epoch_weights(cnf_name, epoch):
    return run_dir(cnf_name) / 'epochs' / f'{epoch:04d}_{timestamp()}.pt'


def resume_checkpoint(cnf_name):
    """The state after the last completed epoch, for `train_nn.py --resume`."""
    return run_dir(cnf_name) / 'last.pt'


def train_log(cnf_name):
    return run_dir(cnf_name) / 'log.csv'


def train_curves(cnf_name):
    """log.csv drawn: losses, validation kappa and learning rate per epoch."""
    return run_dir(cnf_name) / 'curves.png'


def resolved_config(cnf_name):
    return run_dir(cnf_name) / 'config.json'


def features(cnf_name, split, stat, n_iter, skip):
    """`split` is train or test, `stat` is mean or std."""
    return FEATURES_DIR / f'{cnf_name}_{split}_{stat}_iter_{n_iter}_skip_{skip}.npy'


@dataclass(frozen=True)
class FeatureFile:
    """What the name of a feature file says: the arguments `features` built it from."""
    cnf: str
    split: str
    stat: str
    n_iter: int
    skip: int


_FEATURE_FILE = re.compile(r'^(?P<cnf>.+)_(?P<split>train|test)_(?P<stat>mean|std)'
                           r'_iter_(?P<n_iter>\d+)_skip_(?P<skip>\d+)\.npy$')


def parse_features(path):
    """The `FeatureFile` of a name as `features` makes it (CNF_SPLIT_STAT_iter_N_skip_K.npy),
    or None for a file named otherwise.  The only parser of feature names: the names,
    source and test files beside a feature file are built from its parts."""
    match = _FEATURE_FILE.match(Path(path).name)
    if match is None:
        return None
    return FeatureFile(match['cnf'], match['split'], match['stat'], int(match['n_iter']),
                       int(match['skip']))


def feature_names(cnf_name, split, n_iter, skip):
    """The image names a feature file's rows belong to, in row order."""
    return FEATURES_DIR / f'{cnf_name}_{split}_names_iter_{n_iter}_skip_{skip}.txt'


def feature_source(cnf_name, split, n_iter, skip):
    """Which weights a feature file came from (a fingerprint), so a rerun never mixes nets."""
    return FEATURES_DIR / f'{cnf_name}_{split}_source_iter_{n_iter}_skip_{skip}.json'


def features_lock(cnf_name, split, skip):
    """Held by the transform.py run that writes a config's features of one split and skip."""
    return FEATURES_DIR / f'{cnf_name}_{split}_skip_{skip}.lock'


def git_short_sha():
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return 'nogit'
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else 'nogit'


def submission():
    """The default submission name; if it is taken (two in one second), the writer
    (`atomic.write_new`) adds -1, -2, ... instead of replacing it."""
    return DATA_DIR / f'sub_{git_short_sha()}_{timestamp()}.csv'


def fitted_blend(submission_path):
    """The blend that wrote a submission, saved beside it for predict.py --blend."""
    submission_path = Path(submission_path)
    return submission_path.with_name(f'{submission_path.stem}_blend.pt')


def confusion_picture(run_name):
    """blend.py's validation confusion matrix of one run, drawn."""
    safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in str(run_name))
    return DATA_DIR / 'blend' / f'{safe}_confusion.png'


def image_cache(folder, size, key):
    """A uint8 cache of the images of `folder` decoded at `size`; `key` names its content."""
    return CACHE_DIR / f'{Path(folder).name}_{size}_{key}.npy'


def dataset_stats(folder):
    """`python -m retina.stats`'s output for a folder of converted images: its own mean, std,
    colour PCA and balance weights, data/stats_FOLDER.json."""
    return DATA_DIR / f'stats_{Path(folder).name}.json'


def ram_dir(cnf_name):
    return RAM_DIR / cnf_name


def heat_map(output_dir, image, cnf_name, signed, method='ram'):
    """One image's heat map, named after the image, the method and the net(s) that made it."""
    return Path(output_dir) / f'{image}_{method}_{cnf_name}{"_signed" if signed else ""}.png'


def heat_map_figure(output_dir, cnf_name, signed, method='ram'):
    """The figure with one example per level."""
    return Path(output_dir) / f'{method}_{cnf_name}{"_signed" if signed else ""}_by_level.png'


def patient_and_eye(name):
    """`'10_left'` -> `('10', 'left')` (any case: `'16_LEFT'` -> `('16', 'left')`); names
    without an eye suffix are their own patient."""
    patient, _, eye = name.rpartition('_')
    if eye.lower() in ('left', 'right') and patient:
        return patient, eye.lower()
    return name, ''
