"""Augmentation: per-image affine warps, standardisation and colour noise, batched in torch.

The same functions serve training (random parameters) and test-time
augmentation (quasi-random Halton parameters), on whatever device holds the
batch.  Parameters are plain dicts of tensors, one entry per image:
rotation and shear in degrees, translation in input pixels, zoom per axis,
flip as 0/1, the colour-noise vector and, where the config asks for it, the JPEG
quality (retina/data/jpeg.py; 0: not re-encoded).

Geometry: the forward transform maps an input point p (relative to the input
centre; x right, y down) to F·p + t in the output, with F = R(rotation) ·
shear · zoom · flip; positive rotation turns the picture counter-clockwise.
The output is the centred out_h × out_w window; outside the photo is black.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from retina.data.jpeg import random_qualities, recompressed
from retina.data.labels import MEAN, STD

# The quasi-random sequences of the TTA augmentations (tta_params), recorded beside
# the features they made.
TTA_SEQUENCES = ('scrambled', 'halton')
TTA_SEQUENCE_HELP = (
    'The quasi-random sequence of the TTA augmentations.  scrambled (the default): the Halton '
    'sequence with each base\'s digits permuted (a fixed permutation per base), so that its '
    'first points are spread over every dimension; halton: the unscrambled sequence, as the '
    'original drew it (exact reproduction), whose first points in the large bases are all '
    'small: of its first 10, none is flipped and the colour shifts average -0.4 and -0.25 '
    'sigma.  Recorded beside the features; predict.py applies a blend with the sequence its '
    'features were made with.')

# Krizhevsky PCA colour noise, as the original applies it.
COLOUR_U = np.array([[-0.56543481, 0.71983482, 0.40240142],
                     [-0.5989477, -0.02304967, -0.80036049],
                     [-0.56694071, -0.6935729, 0.44423429]], dtype=np.float32)
COLOUR_EV = np.array([1.65513492, 0.48450358, 0.1565086], dtype=np.float32)


@dataclass(frozen=True)
class PixelConstants:
    """A data set's channel mean and std (raw 0..255 pixels) and the colour PCA of its
    standardised pixels (U: eigenvectors as columns; EV: square roots of the eigenvalues).

    Tuples of floats: hashable, so the tensors made of them are cached per constants.
    """
    mean: tuple
    std: tuple
    colour_u: tuple
    colour_ev: tuple


def _floats(values):
    return tuple(np.asarray(values, dtype=np.float64).tolist())


# SPEC §3: the constants of the Kaggle training set, what every config uses by default.
KAGGLE = PixelConstants(mean=_floats(MEAN), std=_floats(STD),
                        colour_u=tuple(_floats(row) for row in COLOUR_U),
                        colour_ev=_floats(COLOUR_EV))


_INTERNED = {KAGGLE: KAGGLE}


def constants_for(cnf):
    """The `PixelConstants` of a config: its own `mean`, `std`, `colour_u`, `colour_ev`
    (see retina.data.stats), each defaulting to the Kaggle one.

    Equal constants are the same object: a torch.compile'd prepare_batch that guards on
    the object's identity does not compile again each epoch.
    """
    constants = PixelConstants(
        mean=_floats(cnf.get('mean', KAGGLE.mean)), std=_floats(cnf.get('std', KAGGLE.std)),
        colour_u=tuple(_floats(row) for row in cnf.get('colour_u', KAGGLE.colour_u)),
        colour_ev=_floats(cnf.get('colour_ev', KAGGLE.colour_ev)))
    return _INTERNED.setdefault(constants, constants)


def identity_params(n, device='cpu'):
    zeros = torch.zeros(n, device=device)
    return dict(rotation=zeros, shear=zeros, tx=zeros, ty=zeros, zoom_x=zeros + 1,
                zoom_y=zeros + 1, flip=zeros, colour=torch.zeros(n, 3, device=device))


def random_params(n, aug, sigma, generator=None, device='cpu', jpeg=None):
    """Training augmentation parameters for `n` images, drawn on `device`; with `jpeg` (the
    config's optional `jpeg` key) also each image's JPEG quality (0: not re-encoded)."""
    def uniform(lo_hi):
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)

    log_zoom = [math.log(z) for z in aug['zoom_range']]
    zoom_x = torch.exp(uniform(log_zoom))
    zoom_y = torch.exp(uniform(log_zoom)) if aug.get('allow_stretch') else zoom_x
    flip = (torch.rand(n, generator=generator, device=device) < 0.5).float() \
        if aug.get('do_flip') else torch.zeros(n, device=device)
    params = dict(rotation=uniform(aug['rotation_range']), shear=uniform(aug['shear_range']),
                  tx=uniform(aug['translation_range']), ty=uniform(aug['translation_range']),
                  zoom_x=zoom_x, zoom_y=zoom_y, flip=flip,
                  colour=sigma * torch.randn(n, 3, generator=generator, device=device))
    if jpeg:
        params['jpeg'] = random_qualities(n, jpeg, generator, device)
    return params


HALTON_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29)
SCRAMBLE_SEED = 2015


def _digit_permutations(bases=HALTON_BASES, seed=SCRAMBLE_SEED):
    """One fixed permutation of the digits 1..b-1 per base b, 0 kept in place (Braaten and
    Weller's scrambling: the trailing zeros of every index stay zeros)."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([[0], 1 + rng.permutation(base - 1)]) for base in bases]


def halton(indices, bases=HALTON_BASES, scrambled=False):
    """Points `indices` of the Halton sequence (unscrambled: scipy's qmc.Halton rows; with
    `scrambled` each digit permuted by `_digit_permutations`), computed directly: a --skip of
    10**12 costs no more than a --skip of 0 (scipy would draw them all)."""
    permutations = _digit_permutations(bases) if scrambled else [None] * len(bases)

    def radical_inverse(index, base, permutation):
        value, scale = 0.0, 1.0 / base
        while index:
            index, digit = divmod(index, base)
            value += (digit if permutation is None else permutation[digit]) * scale
            scale /= base
        return value

    points = [[radical_inverse(i, b, p) for b, p in zip(bases, permutations)] for i in indices]
    return np.array(points, dtype=np.float64).reshape(-1, len(bases))


def tta_params(n_iter, skip, aug, sigma, sequence='scrambled'):
    """One parameter set per TTA iteration from the 10-d Halton sequence (`sequence`: one of
    TTA_SEQUENCES; 'halton' is the original's).

    Returns a list of dicts of Python floats; with n_iter == 1 there is no augmentation.
    """
    if sequence not in TTA_SEQUENCES:
        raise ValueError(f'sequence must be one of {", ".join(TTA_SEQUENCES)}, not {sequence!r}')
    if n_iter == 1:
        return [dict(rotation=0.0, shear=0.0, tx=0.0, ty=0.0, zoom_x=1.0, zoom_y=1.0,
                     flip=0.0, colour=[0.0, 0.0, 0.0])]
    from scipy.stats import norm  # here: a second of import that training never needs
    # Both sequences start at the origin, a degenerate corner (an infinite colour shift);
    # point k of the sequence is row k + 1 here.
    indices = range(skip + 1, skip + n_iter + 1)
    points = np.clip(halton(indices, scrambled=sequence == 'scrambled'), 1e-6, 1 - 1e-6)

    def scale(u, lo_hi):
        return float(lo_hi[0] + u * (lo_hi[1] - lo_hi[0]))

    log_zoom = [math.log(z) for z in aug['zoom_range']]
    out = []
    for u in points:
        zoom_x = math.exp(scale(u[6], log_zoom))
        zoom_y = math.exp(scale(u[7], log_zoom)) if aug.get('allow_stretch') else zoom_x
        out.append(dict(rotation=scale(u[0], aug['rotation_range']),
                        tx=scale(u[1], aug['translation_range']),
                        ty=scale(u[2], aug['translation_range']),
                        colour=[float(sigma * norm.ppf(v)) for v in u[3:6]],
                        zoom_x=zoom_x, zoom_y=zoom_y,
                        flip=float(u[8] > 0.5) if aug.get('do_flip') else 0.0,
                        shear=scale(u[9], aug['shear_range'])))
    return out


def broadcast_params(params, n, device='cpu'):
    """Turn one dict of floats (from `tta_params`) into per-image tensors for `n` images."""
    out = {k: torch.full((n,), float(v), device=device) for k, v in params.items() if k != 'colour'}
    # Filled on the device: a copy from host memory would wait for the GPU to catch up.
    out['colour'] = torch.stack([torch.full((n,), float(c), device=device)
                                 for c in params['colour']], 1)
    return out


_CONSTANTS = {}


def _constant(name, device, dtype=torch.float32, *, constants):
    """One of `constants` (a net's `PixelConstants`) as a tensor on `device`, copied there once.

    Copying a small host array to a GPU inside the training step would make the
    host wait for the queue to drain (pageable memory): every batch would then
    pay the step's launch time on top of its GPU time.
    """
    if not isinstance(constants, PixelConstants):
        raise ValueError(f'pixel constants needed, not {constants!r}: pass the net\'s own '
                         f'(LoadedNet.spec.constants, or constants_for(cnf) while training); '
                         f'none is assumed')
    key = (name, device, dtype, constants)
    if key not in _CONSTANTS:
        # float32 first: the Kaggle constants give exactly the tensors they always gave.
        mean, std = (np.asarray(v, dtype=np.float32) for v in (constants.mean, constants.std))
        values = dict(mean=mean, std=std, colour_u=constants.colour_u,
                      colour_ev=constants.colour_ev,
                      inverse_std=1 / np.asarray(std, dtype=np.float64),
                      standard_shift=-np.asarray(mean, dtype=np.float64) / std)[name]
        _CONSTANTS[key] = torch.as_tensor(np.asarray(values, dtype=np.float32)).to(
            device=device, dtype=dtype)
    return _CONSTANTS[key]


def place_constants(device, constants):
    """Copy the constants `prepare_batch` reads to `device` now, outside compiled code.

    Filled from inside a compiled `prepare_batch`, the cached tensors would be outputs of
    its first graph (and the cache's change would make the second call compile again);
    with CUDA graphs, memory that the next replay reuses.  The key's device carries its
    index, as `x.device` does.
    """
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    for name in ('colour_u', 'colour_ev', 'standard_shift', 'inverse_std'):
        _constant(name, device, constants=constants)


def affine_theta(params, in_size, out_size):
    """(N, 2, 3) matrices for `F.affine_grid` mapping output to input normalised coordinates.

    `in_size` and `out_size` are (height, width).
    """
    rot = torch.deg2rad(params['rotation'].float())
    shear = torch.deg2rad(params['shear'].float())
    cos, sin = torch.cos(rot), torch.sin(rot)
    n = rot.shape[0]
    # forward = R · S · Z · Flip, built row by row for a batch.
    rotation = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    shear_m = torch.zeros(n, 2, 2, device=rot.device)
    shear_m[:, 0, 0] = 1
    shear_m[:, 0, 1] = torch.tan(shear)
    shear_m[:, 1, 1] = 1
    zoom_flip = torch.zeros(n, 2, 2, device=rot.device)
    zoom_flip[:, 0, 0] = params['zoom_x'].float() * (1 - 2 * params['flip'].float())
    zoom_flip[:, 1, 1] = params['zoom_y'].float()
    inverse = _inverse_2x2(rotation @ shear_m @ zoom_flip)
    (in_h, in_w), (out_h, out_w) = in_size, out_size
    # Output pixels -> normalised output, then normalised input <- input pixels: row i of
    # the inverse scales by d_in[i], column j by d_out[j] (Python floats: no host copy).
    d_in, d_out = (2.0 / in_w, 2.0 / in_h), (out_w / 2.0, out_h / 2.0)
    linear = torch.stack([torch.stack([d_in[i] * d_out[j] * inverse[:, i, j] for j in (0, 1)], -1)
                          for i in (0, 1)], -2)
    shift = torch.stack([params['tx'].float(), params['ty'].float()], -1)
    moved = (inverse @ shift[..., None])[..., 0]
    offset = torch.stack([-d_in[0] * moved[:, 0], -d_in[1] * moved[:, 1]], -1)
    return torch.cat([linear, offset[..., None]], dim=2)


def _inverse_2x2(m):
    """Closed-form inverse of a batch of 2×2 matrices (no solver, no device sync)."""
    a, b, c, d = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
    det = a * d - b * c
    return torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / det[:, None, None]


def warp(images, params, out_size, mode='bilinear'):
    """Warp a uint8 or float (N, 3, H, W) batch to float (N, 3, *out_size) raw pixel values."""
    theta = affine_theta(params, images.shape[-2:], out_size)
    grid = sampling_grid(theta, out_size)
    return F.grid_sample(images.float(), grid, mode=mode, padding_mode='zeros', align_corners=False)


def sampling_grid(theta, out_size):
    """`F.affine_grid(theta, (N, C, *out_size), align_corners=False)`, by one broadcast add.

    affine_grid multiplies every output pixel's (x, y, 1) by theta in a batched matmul of
    inner size 3, which on the CPU took longer than the grid_sample itself (35 ms of a
    128-image batch of 112 px); the grid is separable: x's part per column plus y's per row.
    """
    out_h, out_w = out_size
    xs = (torch.arange(out_w, dtype=theta.dtype, device=theta.device) * 2 + 1) / out_w - 1
    ys = (torch.arange(out_h, dtype=theta.dtype, device=theta.device) * 2 + 1) / out_h - 1
    by_row = theta[:, None, :, 1] * ys[None, :, None] + theta[:, None, :, 2]   # N × H × 2
    by_column = theta[:, None, :, 0] * xs[None, :, None]                       # N × W × 2
    return by_row[:, :, None, :] + by_column[:, None, :, :]                    # N × H × W × 2


def centre_offsets(size, out_size):
    """(top, left) of the centred out_size window in a (h, w) image: the one evaluation
    window (validation, features, predict.py, the ONNX export, the heat maps' placement)."""
    return (size[0] - out_size[0]) // 2, (size[1] - out_size[1]) // 2


def centre_crop(images, out_size):
    """The centred window without resampling (validation, plain feature extraction)."""
    top, left = centre_offsets(images.shape[-2:], out_size)
    return images[..., top:top + out_size[0], left:left + out_size[1]].float()


def standardise(x, constants):
    """(x − mean) / std with `constants` (the net's `PixelConstants`)."""
    mean = _constant('mean', x.device, x.dtype, constants=constants)[None, :, None, None]
    std = _constant('std', x.device, x.dtype, constants=constants)[None, :, None, None]
    return (x - mean) / std


def colour_shift(colour, constants):
    """(N, 3) noise vectors c -> (N, 3) per-channel shifts U · (c ∘ EV)."""
    u = _constant('colour_u', colour.device, constants=constants)
    ev = _constant('colour_ev', colour.device, constants=constants)
    return (colour.float() * ev) @ u.T


def augment_batch(images, params, out_size, dtype=torch.float32,
                  memory_format=torch.contiguous_format, *, constants):
    """uint8 batch -> [JPEG re-encoded,] warped, standardised, colour-noised batch (the
    original order; the compression comes first, as it happens to a photograph)."""
    if 'jpeg' in params:
        images = recompressed(images, params['jpeg'])
    return _standardised(warp(images, params, out_size),
                         colour_shift(params['colour'], constants), dtype, memory_format,
                         constants)


def _standardised(x, shift, dtype, memory_format, constants):
    """(x − mean) / std + `shift` (N × 3 or None), written once into a new `dtype` tensor laid
    out in `memory_format`.

    One multiply-add from the raw pixels straight into the network's input format: the
    separate subtract, divide, add and layout copy each read and wrote the whole batch again,
    and on the CPU they cost more than the warp itself.  On the GPU the result is bf16
    channels_last, what the autocast convolutions read, so they need no conversion either.
    """
    offset = _constant('standard_shift', x.device, constants=constants)[None, :, None, None]
    if shift is not None:
        offset = offset + shift.float()[:, :, None, None]
    inverse_std = _constant('inverse_std', x.device, constants=constants)[None, :, None, None]
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # dynamo cannot trace `out=` into a channels_last tensor (a graph break: two graphs and
        # an eager op), inductor fuses this form into one kernel; the ONNX export (a trace)
        # has no `out=` form of addcmul
        return torch.addcmul(offset, x, inverse_std).to(dtype).contiguous(
            memory_format=memory_format)
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=memory_format)
    return torch.addcmul(offset, x, inverse_std, out=out)


def prepare_batch(images, out_size, params=None, dtype=torch.float32,
                  memory_format=torch.contiguous_format, *, constants):
    """The network's input: augmented when `params` is given, else the centred window; a new
    `dtype` tensor in `memory_format` (train.py: bf16 channels_last on the GPU), standardised
    and colour-noised with `constants` (`constants_for(cnf)` while training, a loaded net's
    `spec.constants` after: `retina.model.scoring.prepare`; never assumed)."""
    if params is None:
        return _standardised(centre_crop(images, out_size), None, dtype, memory_format,
                             constants)
    return augment_batch(images, params, out_size, dtype, memory_format, constants=constants)
