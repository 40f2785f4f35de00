"""A data set's own standardisation constants (the original's make_pca.py), for its configs.

    python -m retina.stats --directory data/train_medium --labels data/trainLabels.csv

writes `data/stats_train_medium.json` with

- `mean`, `std`: per channel (R, G, B), over every pixel of the converted
  images, the black surround of the eye included, as the Kaggle constants
  (SPEC §3) were computed;
- `colour_u`, `colour_ev`: the colour PCA of the standardised pixels: the
  eigenvectors of their 3 × 3 covariance (columns of U) and the square roots
  of its eigenvalues, largest first (their squares sum to 3, the trace of a
  correlation matrix); the colour noise is U · (c ∘ EV), c ~ N(0, sigma);
- `balance_weights`: per level 0..4, images / images of that level, the
  weights the class-balanced sampling starts from;
- `about`: where the numbers came from (not read by configs).

A config takes them over by merging:

    from configs.c_512_5x5_32 import cnf as base
    from retina.data.stats import load_stats
    cnf = dict(base, **load_stats('data/stats_train_medium.json'))

Configs without these keys use the Kaggle constants.  The checkpoint keeps the
resolved config, so transform.py, predict.py, ram.py and the ONNX export use
the constants the net was trained with.
"""
import json
from pathlib import Path

import click
import numpy as np

from retina.core.errors import UserError, handle_errors
from retina.core.options import (CONTEXT_SETTINGS, directory_option, labels_option,
                                 no_progress_option, output_file_option, seed_option)

# config key -> (shape, what its values must be, test of the values)
CONSTANT_KEYS = {
    'mean': ((3,), 'pixel values 0..255', lambda v: (v >= 0) & (v <= 255)),
    'std': ((3,), 'positive numbers', lambda v: v > 0),
    'colour_u': ((3, 3), 'finite numbers', lambda v: np.isfinite(v)),
    'colour_ev': ((3,), 'numbers ≥ 0', lambda v: v >= 0),
    'balance_weights': ((5,), 'positive numbers', lambda v: v > 0),
}
DESCRIPTIONS = {
    'mean': 'channel means (R, G, B) of the raw pixels [default: Kaggle, SPEC §3]',
    'std': 'channel standard deviations of the raw pixels [default: Kaggle]',
    'colour_u': 'colour PCA eigenvectors (3 × 3, columns) of the standardised pixels '
                '[default: Kaggle]',
    'colour_ev': 'square roots of the colour PCA eigenvalues [default: Kaggle]',
    'balance_weights': 'class-balance weights per level 0..4 at epoch 0 [default: Kaggle]',
}
# The Kaggle U's first row: each column's sign is chosen to match it, so that a data set
# like Kaggle's gets columns pointing the same way (an eigenvector's sign is arbitrary).
_U_SIGNS = np.array([-1.0, 1.0, 1.0])


def check_constants(cnf, where):
    """The constants `cnf` carries (see CONSTANT_KEYS) as plain nested lists of floats, checked:
    right shape, finite, in range.  `where` names the config or file in the messages."""
    checked = {}
    for key, (shape, what, test) in CONSTANT_KEYS.items():
        if key not in cnf:
            continue
        try:
            values = np.asarray(cnf[key], dtype=np.float64)
        except (TypeError, ValueError):
            values = None
        if values is None or values.shape != shape:
            size = ' × '.join(map(str, shape))
            raise UserError(f'{where}: {key} must be {size} numbers, found {cnf[key]!r:.80}; '
                            f'python -m retina.stats computes it from your images')
        if not (np.isfinite(values).all() and test(values).all()):
            raise UserError(f'{where}: {key} must be finite {what}, found '
                            f'{values.tolist()}; python -m retina.stats computes it')
        checked[key] = values.tolist()
    return checked


def load_stats(path):
    """The constants of a file written by `python -m retina.stats`, for a config to merge:
    `cnf = dict(base, **load_stats(path))`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: statistics file not found; write it with python -m '
                        f'retina.stats --directory YOUR_TRAIN_FOLDER --output {path}')
    try:
        content = json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f'{path}: not a JSON file ({error}); write it again with python -m '
                        f'retina.stats') from None
    if not isinstance(content, dict) or not any(k in content for k in CONSTANT_KEYS):
        raise UserError(f'{path}: no {", ".join(CONSTANT_KEYS)} in the file; write it with '
                        f'python -m retina.stats')
    return check_constants(content, path)


class Moments:
    """Running sums of the pixels and their outer products (float64), image by image."""

    def __init__(self):
        self.count, self.total, self.products = 0, np.zeros(3), np.zeros((3, 3))

    def add(self, pixels):
        pixels = np.asarray(pixels, dtype=np.float64).reshape(-1, 3)
        self.count += len(pixels)
        self.total += pixels.sum(0)
        self.products += pixels.T @ pixels

    def mean_std_pca(self):
        """(mean, std, U, EV): U and EV from the covariance of the standardised pixels."""
        mean = self.total / self.count
        covariance = self.products / self.count - np.outer(mean, mean)
        std = np.sqrt(np.clip(np.diag(covariance), 0, None))
        if not (std > 0).all():
            flat = ', '.join(name for name, s in zip('RGB', std) if s <= 0)
            raise UserError(f'channel {flat} has the same value in every pixel: no standard '
                            f'deviation to divide by; are these converted photographs?')
        correlation = covariance / np.outer(std, std)
        eigenvalues, u = np.linalg.eigh(correlation)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, u = np.clip(eigenvalues[order], 0, None), u[:, order]
        u *= np.where(np.sign(u[0]) == _U_SIGNS, 1.0, -1.0)[None, :]
        return mean, std, u, np.sqrt(eigenvalues)


def balance_weights(levels):
    """images / images of each level 0..4 (levels without an image get 1.0) and the counts."""
    counts = np.bincount(np.asarray(levels, dtype=np.int64), minlength=5)[:5]
    weights = np.where(counts > 0, len(levels) / np.maximum(counts, 1), 1.0)
    return weights, counts


def compute(folder, labels=None, sample=None, seed=0, progress=True, echo=None):
    """The statistics of the converted images of `folder` (a random `sample` of them if given)
    and, with a `labels` file, the balance weights of its labelled images: a JSON-able dict.

    Images without a label are an error, unless `echo` is given: then it hears why there are
    no balance weights (the default labels file of another folder, e.g. a test folder).
    """
    from tqdm import tqdm

    from retina.data.images import image_name, list_images, load_rgb
    from retina.data.labels import labelled_images, load_labels

    image_paths, levels = list_images(folder), None
    if labels is not None and echo is not None:
        known = load_labels(labels)
        unlabelled = sum(image_name(p) not in known for p in image_paths)
        if unlabelled:
            echo(f'note: {unlabelled} image(s) of {folder} have no label in {labels}: no '
                 f'balance weights (--labels names the file with their levels)')
            labels = None
    if labels is not None:
        image_paths, levels = labelled_images(folder, labels)
    if not image_paths:
        raise UserError(f'{folder}: no images; point --directory at a folder convert.py wrote')
    used = list(image_paths)
    if sample is not None and sample < len(used):
        chosen = np.sort(np.random.default_rng(seed).choice(len(used), sample, replace=False))
        used = [used[i] for i in chosen]
    from retina.data.cache import image_size_of
    side = image_size_of(image_paths)  # raw photographs (not square) are refused at once
    moments = Moments()
    for path in tqdm(used, desc=f'statistics of {Path(folder).name}', unit='img',
                     disable=not progress, dynamic_ncols=True):
        pixels = np.asarray(load_rgb(path))
        if pixels.shape[:2] != (side, side):  # as training refuses a folder of mixed sizes
            raise UserError(f'{path}: {pixels.shape[1]}×{pixels.shape[0]}, but '
                            f'{image_paths[0].name} is {side}×{side}: {folder} mixes sizes; '
                            f'convert the photographs into it with one convert.py --crop_size')
        moments.add(pixels)
    mean, std, u, ev = moments.mean_std_pca()
    out = dict(mean=mean.tolist(), std=std.tolist(), colour_u=u.tolist(), colour_ev=ev.tolist())
    about = dict(directory=str(folder), images=len(used), of_images=len(image_paths),
                 pixels=moments.count, seed=seed if len(used) < len(image_paths) else None)
    if levels is not None:
        weights, counts = balance_weights(levels)  # all labelled images, not the sample
        out['balance_weights'] = weights.tolist()
        about.update(labels=str(labels), level_counts=counts.tolist(),
                     missing_levels=[int(k) for k in np.flatnonzero(counts == 0)])
    out['about'] = about
    return out


def write(stats, output):
    from retina.core import atomic
    with atomic.atomic_path(output) as tmp:
        tmp.write_text(json.dumps(stats, indent=2) + '\n', encoding='utf-8')


@click.command(context_settings=CONTEXT_SETTINGS)
@directory_option("converted images (convert.py's output, e.g. data/train_medium).", required=True,
                  type=click.Path(exists=True, file_okay=False))
@labels_option('for the class-balance weights; every image of --directory needs a label '
               '[default: data/trainLabels.csv if it exists and labels every image, else no '
               'balance weights].')
@output_file_option('the JSON to write [default: data/stats_DIRECTORY.json].')
@click.option('--sample', type=click.IntRange(min=1),
              help='Use a random sample of this many images for the pixel statistics (the '
                   'balance weights always count every labelled image). [default: all]')
@seed_option('of the --sample draw.')
@no_progress_option()
@handle_errors()
def main(directory, labels, output, sample, seed, no_progress):
    """Compute the channel means and standard deviations over all pixels of the converted
    images of DIRECTORY (the black surround included, as the Kaggle constants were), the
    colour PCA of the standardised pixels and the class-balance weights of its labels; write
    them as JSON for configs to use:

        cnf = dict(base, **load_stats('data/stats_train_medium.json'))

    (base: the cnf the config starts from; from retina.data.stats import load_stats).  Configs
    without them use the Kaggle constants.
    """
    from retina.core import paths
    lenient = labels is None  # the default labels may be another folder's: then no weights
    if labels is None and paths.LABELS_FILE.is_file():
        labels = paths.LABELS_FILE
    output = Path(output) if output else paths.dataset_stats(directory)
    stats = compute(directory, labels, sample, seed, progress=not no_progress,
                    echo=(lambda line: click.echo(line, err=True)) if lenient else None)
    write(stats, output)
    about = stats['about']
    click.echo(f'{about["images"]} image(s), {about["pixels"]:,} pixels: mean '
               f'{_numbers(stats["mean"])}, std {_numbers(stats["std"])}, colour EV '
               f'{_numbers(stats["colour_ev"], 4)}')
    if 'balance_weights' in stats:
        click.echo(f'levels 0..4: {about["level_counts"]} images, balance weights '
                   f'{_numbers(stats["balance_weights"], 3)}')
        if about['missing_levels']:
            click.echo(f'note: no image of level {", ".join(map(str, about["missing_levels"]))}'
                       f' in {directory}; weight 1.0 written for it', err=True)
    else:
        click.echo('no balance weights (no --labels): configs keep the Kaggle ones')
    click.echo(f'wrote {output}; a config uses it with cnf = dict(base, '
               f'**load_stats({str(output)!r}))')


def _numbers(values, digits=2):
    return '[' + ', '.join(f'{v:.{digits}f}' for v in values) + ']'
