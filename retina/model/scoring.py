"""The one way from images to a trained net's scores: every stage that feeds a net (validation,
transform.py's TTA features, predict.py, ram.py, the release, the benchmarks) goes through here.

Three steps, each a function of the net's `checkpoint.InputSpec` (its window, look, pixel
constants, precision and cut-offs: `LoadedNet.spec`) and nothing else:

- `prepare`: uint8 converted images (N, 3, S, S) to the net's input: the centred window, or
  the augmentations of `params`, standardised and colour-noised with the spec's constants;
- `score`: the net's output (and pooled features) on such a batch, in the spec's precision
  (bf16 autocast or none) unless the caller asks for another;
- `tta`: `score` under each of a list of augmentations (`augmentations`: transform.py's
  Halton parameter sets, [None] for the centred window alone).

A spec is never guessed: a missing one is an error, not the Kaggle constants.
"""
import collections

import numpy as np
import torch
import torch.nn.functional as F

from retina.model.augment import broadcast_params, prepare_batch, tta_params

Scored = collections.namedtuple('Scored', 'scores features')


def _checked(spec):
    if spec is None or not hasattr(spec, 'constants'):
        raise ValueError(f'no input spec (got {spec!r}): pass the LoadedNet\'s .spec '
                         f'(checkpoint.load_net), or checkpoint.InputSpec.of_config(config) for '
                         f'a net being trained; the pixel constants are never guessed')
    return spec


def dtype_of(precision):
    """The network input's dtype in `precision`: bf16 (what autocast convolutions read) or
    float32."""
    return torch.bfloat16 if precision == 'bf16' else torch.float32


def as_batch(arrays, device='cpu'):
    """(S, S, 3) uint8 arrays (converted images) as one uint8 (N, 3, S, S) batch on `device`."""
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.contiguous().to(device)


def prepare(images, spec, params=None, precision=None, memory_format=torch.contiguous_format):
    """The net's input from uint8 `images` (N, 3, S, S): the centred window of `spec`, or
    augmented by `params` (one dict of floats from `augmentations`, applied to every image, or
    per-image tensors); a new tensor in `precision`'s dtype [default: the spec's] laid out in
    `memory_format`, standardised with the spec's constants."""
    spec = _checked(spec)
    if params is not None and not torch.is_tensor(params['rotation']):
        params = broadcast_params(params, len(images), images.device)
    return prepare_batch(images, spec.window, params, dtype=dtype_of(precision or spec.precision),
                         memory_format=memory_format, constants=spec.constants)


def prepare_window(windows, spec):
    """The net's fp32 input from windows already cut from the converted images (N, 3, h, w):
    ram.py cuts the larger net's window once and shrinks it (bilinear, antialiased) to a
    smaller net's input; a window of the net's own size is used as it is."""
    spec = _checked(spec)
    x = windows.float()
    if tuple(x.shape[-2:]) != tuple(spec.window):
        x = F.interpolate(x, size=tuple(spec.window), mode='bilinear', align_corners=False,
                          antialias=True)
    return prepare(x, spec, precision='fp32')


def autocast(device, precision):
    """The context a net's forward pass runs in: bf16 autocast for 'bf16', else none."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')


def score(net, images, spec, params=None, precision=None, memory_format=torch.contiguous_format,
          features=False):
    """`Scored(scores, features)` of `net` on uint8 `images` (N, 3, S, S), prepared by
    `prepare`: the output per image (N,) and, with `features`, the pooled features (N, F),
    both float32 copies on the device (a CUDA graph's output is never handed out)."""
    precision = precision or _checked(spec).precision
    x = prepare(images, spec, params, precision, memory_format)
    with autocast(x.device, precision):
        if not features:
            return Scored(net(x).squeeze(1).to(torch.float32, copy=True), None)
        out, feat = net(x, return_features=True)
        return Scored(out.squeeze(1).to(torch.float32, copy=True),
                      feat.to(torch.float32, copy=True))


def augmentations(config, n_iter, skip=0, sequence='scrambled'):
    """transform.py's parameter sets of `config`'s net (`augment.tta_params`: its aug_params
    and sigma), [None] (the centred window) for one iteration."""
    if n_iter == 1:
        return [None]
    return tta_params(n_iter, skip, config.cnf['aug_params'], config.cnf['sigma'], sequence)


def tta(net, images, spec, params_list, precision=None, memory_format=torch.contiguous_format):
    """`score` (with features) of `images` under each parameter set of `params_list`
    (`augmentations`), one `Scored` per set, in order: the one test-time augmentation loop."""
    for params in params_list:
        yield score(net, images, spec, params, precision, memory_format, features=True)
