"""Test-time-augmented feature extraction (transform.py) and reading feature files back.

For each of n_iter Halton augmentations the net's feature layer (RMS pool
for baseline nets, global average pool for RAM nets) is computed for every
image; the running mean and standard deviation over the iterations are
saved every 5 iterations.  Rows follow the sorted image list of the folder;
a names file beside each feature file records which image each row is.
"""
import json
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


def source_of(feature_path):
    """What transform.py recorded about the weights (and images) a feature file came from:
    the dict of X_SPLIT_source_iter_N_skip_K.json beside it, or None if there is none."""
    feature_path = Path(feature_path)
    source = names_file_for(feature_path).name.replace('_names_iter_', '_source_iter_', 1)
    try:
        recorded = json.loads(feature_path.with_name(source).with_suffix('.json').read_text())
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


SAVE_EVERY = 5


def load_model(config, weights_path, device):
    """The net of `weights_path`, in eval mode on `device`; it must be weights of `config`."""
    return rebuild(config, weights_path)[0].to(device).eval()


def rebuild(config, weights_path):
    """(net with the weights of `weights_path`, the checkpoint dict), on the CPU; the net's
    `preprocessing` is the look of its training images, its `pixel_constants` the mean, std
    and colour PCA it was trained with (`augment.constants_for`).

    The net is rebuilt from the checkpoint's own resolved config, so weights stay
    usable after the config module is edited; weights of another config must fit
    this one's layers exactly.
    """
    from retina import checkpoint
    from retina.augment import constants_for
    state = checkpoint.load(weights_path)
    trained = checkpoint.config_of(state) if state.get('config_name') == config.name else config
    model = build_uninitialised(trained)
    checkpoint.load_exact(model, state, weights_path, config.name)
    model.pixel_constants = constants_for(trained.cnf)
    # Which look the training images had (convert.py --enhance): every later stage that
    # loads the net (transform, ram, predict, export) compares its images' look with it.
    model.preprocessing = state.get('preprocessing', 'none')
    return model, state


def build_uninitialised(config):
    """The config's net with uninitialised weights, for loading a checkpoint into.

    Built on the meta device and then given (empty) storage: the orthogonal
    initialisation of a 512-px net takes seconds of QR decompositions that
    loading the weights throws away.  Every parameter and buffer must then come
    from the checkpoint, which `checkpoint.load_exact` checks; a net with a
    buffer that checkpoints do not hold is built the ordinary way.
    """
    import torch
    with torch.device('meta'):
        model = config.build_net()
    saved = set(model.state_dict())
    if not all(name in saved for name, _ in model.named_buffers()):
        return config.build_net()
    return model.to_empty(device='cpu')


def weights_fingerprint(model):
    """A short hash of the model's parameters and buffers: equal weights, equal fingerprint."""
    import hashlib

    from retina.checkpoint import unwrap
    digest = hashlib.sha256()
    for name, value in sorted(unwrap(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _previous_progress(config_name, split, n_iter, skip, names, fingerprint, images_key, echo):
    """Sums recovered from the last saved iteration of an interrupted run of the same weights
    on the same images (`images_key`: their folder, sizes and modification times)."""
    from retina import paths
    saved = range((n_iter - 1) // SAVE_EVERY * SAVE_EVERY, 0, -SAVE_EVERY)
    for done in [n_iter, *saved]:  # n_iter itself: the run is already complete
        mean_path = paths.features(config_name, split, 'mean', done, skip)
        std_path = paths.features(config_name, split, 'std', done, skip)
        if mean_path.is_file() and std_path.is_file():
            try:  # names and fingerprint first: the arrays are read only if they are usable
                if read_names(mean_path) != names:
                    continue
                source = json.loads(paths.feature_source(config_name, split, done, skip)
                                    .read_text())
                if source['fingerprint'] != fingerprint:
                    echo(f'{split}: {mean_path} came from other weights; starting from the '
                         f'first iteration')
                    return 0, None, None
                if source.get('images') != images_key:
                    echo(f'{split}: {mean_path} came from other images (another folder, or '
                         f'images changed since); starting from the first iteration')
                    return 0, None, None
                mean, _ = load_features(mean_path)
                std, _ = load_features(std_path)
            except (UserError, OSError, ValueError, KeyError, TypeError):
                continue
            mean, std = mean.astype(np.float64), std.astype(np.float64)
            return done, mean * done, (std ** 2 + mean ** 2) * done
    return 0, None, None


def extract_features(config, model, folder, split, n_iter=1, skip=0, device='cpu',
                     batch_size=None, progress=True, echo=print, restart=False, weights=None):
    """Write running mean/std features of `folder`'s images every SAVE_EVERY iterations.

    Returns a dict: the final mean and std paths, the row and feature counts.  `weights`
    (the file's name) is recorded beside the features with the weights' fingerprint.
    Two extractions of one config, split and skip would write the same files (the
    saves at iterations 5, 10, ... too), so the second is refused while the first runs.
    """
    from retina import lock, paths
    with lock.hold(paths.features_lock(config.name, split, skip),
                   f'the {split} features of {config.name} (skip {skip})', echo):
        return _extract_features(config, model, folder, split, n_iter, skip, device,
                                 batch_size, progress, echo, restart, weights)


def _extract_features(config, model, folder, split, n_iter, skip, device, batch_size,
                      progress, echo, restart, weights):
    import torch
    from tqdm import tqdm

    from retina import atomic, cache, paths, preprocess
    from retina.augment import broadcast_params, prepare_batch, tta_params
    from retina.images import image_name, list_images
    from retina.runtime import Runtime, batches, place_images

    image_paths = list_images(folder)
    names = [image_name(p) for p in image_paths]
    preprocess.check_matches(folder, getattr(model, 'preprocessing', 'none'), weights)
    images = cache.load_images(image_paths, progress=progress)
    cache.check_size(images, config.input_size, folder, config.name)
    images_key = cache.cache_key(image_paths, images.shape[-1])
    device = torch.device(device)
    # On the GPU when it fits (a 512-px Kaggle test set is 42 GB), else streamed from the host.
    images = place_images(images, Runtime(device), 'auto')
    model = model.to(memory_format=torch.channels_last)
    batch_size = batch_size or config.cnf['batch_size_test']
    augmentations = tta_params(n_iter, skip, config.cnf['aug_params'], config.cnf['sigma'])
    fingerprint = weights_fingerprint(model)
    start, total, total_sq = (0, None, None) if restart else _previous_progress(
        config.name, split, n_iter, skip, names, fingerprint, images_key, echo)
    if start == n_iter:
        echo(f'{split}: already complete ({n_iter} iterations of these weights); '
             f'--restart computes it again')
    elif start:
        echo(f'{split}: continuing from iteration {start} of an earlier run')
    order = np.arange(len(names))
    bar = tqdm(total=(n_iter - start) * len(names), desc=f'{config.name} {split} features',
               unit='img', disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for iteration in range(start, n_iter):
            params = augmentations[iteration] if n_iter > 1 else None
            rows = []
            for batch, _ in batches(images, order, batch_size, device):
                x = prepare_batch(batch, config.input_size,
                                  broadcast_params(params, len(batch), device) if params else None,
                                  constants=getattr(model, 'pixel_constants', None))
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16,
                                    enabled=device.type == 'cuda'):
                    _, features = model(x, return_features=True)
                rows.append(features.float())  # stays on the device: no wait per batch
                bar.update(len(batch))
            features = torch.cat(rows).double()
            if total is None:
                total, total_sq = torch.zeros_like(features), torch.zeros_like(features)
            elif not isinstance(total, torch.Tensor):  # sums of an interrupted run
                total, total_sq = (torch.from_numpy(a).to(device) for a in (total, total_sq))
            total += features
            total_sq += features ** 2
            done = iteration + 1
            if done % SAVE_EVERY == 0 or done == n_iter:
                mean = (total / done).cpu().numpy()
                std = np.sqrt(np.maximum((total_sq / done).cpu().numpy() - mean ** 2, 0))
                atomic.write_text(paths.feature_names(config.name, split, done, skip),
                                  '\n'.join(names) + '\n')
                for stat, value in (('mean', mean), ('std', std)):
                    atomic.save_npy(paths.features(config.name, split, stat, done, skip),
                                    value.astype(np.float32))
                # Last: a run killed before this line leaves files a rerun will not trust.
                atomic.write_text(paths.feature_source(config.name, split, done, skip),
                                  json.dumps(dict(fingerprint=fingerprint, weights=weights,
                                                  images=images_key)))
    bar.close()
    return dict(mean=paths.features(config.name, split, 'mean', n_iter, skip),
                std=paths.features(config.name, split, 'std', n_iter, skip), rows=len(names),
                features=int(total.shape[1]))
