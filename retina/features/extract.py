"""Test-time-augmented feature extraction (transform.py).

For each of n_iter Halton augmentations the net's feature layer (RMS pool
for baseline nets, global average pool for RAM nets) is computed for every
image; the running mean and standard deviation over the iterations are
saved every 5 iterations (`feature_files.save`).  Rows follow the sorted
image list of the folder; a names file beside each feature file records
which image each row is.
"""
import numpy as np

from retina.core.errors import UserError
from retina.features.files import load_features, read_names, source_of

SAVE_EVERY = 5


def _previous_progress(config_name, split, n_iter, skip, names, fingerprint, images_key, echo,
                       precision=None, sequence='halton'):
    """Sums recovered from the last saved iteration of an interrupted run of the same weights
    on the same images (`images_key`: their folder, sizes and modification times)."""
    from retina.core import paths
    saved = range((n_iter - 1) // SAVE_EVERY * SAVE_EVERY, 0, -SAVE_EVERY)
    for done in [n_iter, *saved]:  # n_iter itself: the run is already complete
        mean_path = paths.features(config_name, split, 'mean', done, skip)
        std_path = paths.features(config_name, split, 'std', done, skip)
        if mean_path.is_file() and std_path.is_file():
            try:  # names and fingerprint first: the arrays are read only if they are usable
                if read_names(mean_path) != names:
                    continue
                source = source_of(mean_path)
                if source['fingerprint'] != fingerprint:  # no source: TypeError, skipped
                    echo(f'{split}: {mean_path} came from other weights; starting from the '
                         f'first iteration')
                    return 0, None, None
                if source.get('images') != images_key:
                    echo(f'{split}: {mean_path} came from other images (another folder, or '
                         f'images changed since); starting from the first iteration')
                    return 0, None, None
                if source.get('precision', precision) != precision:
                    echo(f'{split}: {mean_path} was computed in {source["precision"]}, this run '
                         f'in {precision}; starting from the first iteration')
                    return 0, None, None
                made_with = source.get('sequence', 'halton')  # unrecorded: the original's
                if made_with != sequence:
                    echo(f'{split}: {mean_path} was made with the {made_with} TTA sequence, '
                         f'this run with {sequence}; starting from the first iteration')
                    return 0, None, None
                mean, _ = load_features(mean_path)
                std, _ = load_features(std_path)
            except (UserError, OSError, ValueError, KeyError, TypeError):
                continue
            mean, std = mean.astype(np.float64), std.astype(np.float64)
            return done, mean * done, (std ** 2 + mean ** 2) * done
    return 0, None, None


def extract_features(config, loaded, folder, split, n_iter=1, skip=0, device='cpu',
                     batch_size=None, progress=True, echo=print, restart=False, weights=None,
                     compile_model=None, precision='auto', sequence='scrambled'):
    """Write running mean/std features of `folder`'s images every SAVE_EVERY iterations.

    `loaded` is the `checkpoint.LoadedNet` (its preprocessing must be the folder's, its pixel
    constants standardise the images).  Returns a dict: the final mean and std paths, the row
    and feature counts.  `weights` (the file's name as given; default: the net's) is recorded
    beside the features with the weights' fingerprint.
    `batch_size` defaults to Runtime.eval_batch_size (larger on a GPU); `compile_model`
    None compiles the net on a GPU and not on the CPU; `precision` is one of
    precision.PRECISIONS ('auto': bf16 on a GPU, fp32 on the CPU); `sequence` one of
    augment.TTA_SEQUENCES (recorded beside the features).
    Two extractions of one config, split and skip would write the same files (the
    saves at iterations 5, 10, ... too), so the second is refused while the first runs.
    """
    from retina.core import lock, paths
    with lock.hold(paths.features_lock(config.name, split, skip),
                   f'the {split} features of {config.name} (skip {skip})', echo):
        return _extract_features(config, loaded, folder, split, n_iter, skip, device,
                                 batch_size, progress, echo, restart, weights, compile_model,
                                 precision, sequence)


def _extract_features(config, loaded, folder, split, n_iter, skip, device, batch_size,
                      progress, echo, restart, weights, compile_model, precision, sequence):
    import torch
    from tqdm import tqdm

    from retina.core import paths
    from retina.core.runtime import (Runtime, compile_or_eager, place_images, release_memory,
                                     smaller_batch)
    from retina.data import cache, crop, preprocess
    from retina.data.images import image_name, list_images
    from retina.features import files as feature_files
    from retina.model import scoring

    image_paths = list_images(folder)
    names = [image_name(p) for p in image_paths]
    weights = weights or str(loaded.weights)
    preprocess.check_matches(folder, loaded.preprocessing, weights)
    warning = loaded.encoding_known and crop.encoding_warning(image_paths, loaded.spec.encoding,
                                                              weights)
    if warning:
        echo(warning)
    images = cache.load_images(image_paths, progress=progress)
    cache.check_size(images, config.input_size, folder, config.name)
    images_key = cache.cache_key(image_paths, images.shape[-1])
    device = torch.device(device)
    # 'auto' is bf16 on a GPU and fp32 on the CPU: a blend fitted on these features is applied
    # by predict.py to features it computes a few photographs at a time, and bf16 CPU
    # arithmetic changes with the batch (up to 0.02 on a blend's score); --precision bf16 asks
    runtime = Runtime(device, precision='' if precision == 'auto' else precision)
    # On the GPU when it fits (a 512-px Kaggle test set is 42 GB), else streamed from the host.
    images = place_images(images, runtime, 'auto')
    model = loaded.net.to(memory_format=torch.channels_last)
    batch_size = batch_size or runtime.eval_batch_size(config.cnf)
    augmentations = scoring.augmentations(config, n_iter, skip, sequence)
    fingerprint = loaded.fingerprint
    start, total, total_sq = (0, None, None) if restart else _previous_progress(
        config.name, split, n_iter, skip, names, fingerprint, images_key, echo,
        runtime.precision, sequence)
    if start == n_iter:
        echo(f'{split}: already complete ({n_iter} iterations of these weights); '
             f'--restart computes it again')
    elif start:
        echo(f'{split}: continuing from iteration {start} of an earlier run')
    if total is not None:  # sums of an interrupted run
        total, total_sq = (torch.from_numpy(a).to(device) for a in (total, total_sq))
    compile_model = runtime.cuda if compile_model is None else compile_model
    net = compile_or_eager(model, echo) if compile_model else model
    order = np.arange(len(names))
    bar = tqdm(total=(n_iter - start) * len(names), desc=f'{config.name} {split} features',
               unit='img', disable=not progress, dynamic_ncols=True)
    # The iterations between two saves run inside the batch loop: each batch is gathered
    # (from a host cache: copied to the GPU) once for SAVE_EVERY augmentations, where a pass
    # per iteration streamed the whole cache again each time (42 GB per iteration for the
    # 512-px Kaggle test set).  `start` is 0 or a saved iteration: blocks end at saves.
    for first in range(start, n_iter, SAVE_EVERY):
        block = range(first, min(first + SAVE_EVERY, n_iter))
        # Out of memory (a GPU smaller than the default batch needs), the block is done again
        # at half the batch size from its starting sums, kept on the host: the largest batch
        # that fits is found.
        before = None if total is None else tuple(t.to('cpu', copy=True) for t in (total, total_sq))
        shown = bar.n
        while True:
            try:
                total, total_sq = _feature_block(net, images, order, batch_size,
                                                 [augmentations[i] for i in block], loaded.spec,
                                                 runtime, total, total_sq, len(names), bar)
                break
            except torch.OutOfMemoryError as error:
                batch_size = smaller_batch(error, batch_size, runtime, f'{split} features')
            # The failed attempt added into the sums in place (or made new ones, lost with it).
            if before is None:
                total = total_sq = None
            else:
                total.copy_(before[0])
                total_sq.copy_(before[1])
            release_memory(runtime)
            bar.update(shown - bar.n)
        done = block[-1] + 1
        mean, std = feature_files.mean_and_std(total.cpu().numpy(), total_sq.cpu().numpy(), done)
        feature_files.save(config.name, split, done, skip, names, mean, std,
                           dict(fingerprint=fingerprint, weights=weights, images=images_key,
                                precision=runtime.precision, sequence=sequence,
                                hold_out=loaded.hold_out))
    bar.close()
    return dict(mean=paths.features(config.name, split, 'mean', n_iter, skip),
                std=paths.features(config.name, split, 'std', n_iter, skip), rows=len(names),
                features=int(total.shape[1]))


def _feature_block(net, images, order, batch_size, block, spec, runtime, total, total_sq,
                   rows, bar):
    """The TTA iterations of `block` (their augmentation parameter sets) added to the running
    sums (None at the start: created at the first batch, `rows` × features); returns the
    sums."""
    import contextlib

    import torch

    from retina.core.runtime import batches
    from retina.model import scoring
    with torch.no_grad(), contextlib.closing(batches(images, order, batch_size,
                                                     runtime.device)) as stream:
        for batch, chunk in stream:
            for scored in scoring.tta(net, batch, spec, block, runtime.precision,
                                      torch.channels_last):
                features = scored.features.double()  # stays on the device: no wait
                if total is None:
                    total = features.new_zeros(rows, features.shape[1])
                    total_sq = torch.zeros_like(total)
                total.index_add_(0, chunk, features)
                total_sq.index_add_(0, chunk, features ** 2)
                bar.update(len(batch))
    return total, total_sq
