"""JPEG re-encoding as a batched augmentation on the model's device.

Photographs reach the grader re-saved by cameras, mail and viewers, at any quality; a net that
never saw compression takes its blocks and ringing for lesions (a level-0 eye saved at quality 5
was graded level 4).  `jpeg_batch` does what a baseline JPEG encoder and decoder do to a batch,
in torch on the batch's own device: JFIF RGB → YCbCr, 4:2:0 chroma subsampling, 8×8 DCT,
quantisation by the standard tables (ITU T.81 Annex K) scaled to each image's quality as libjpeg
scales them, and back.  It tracks PIL's encoder closely (tests/test_jpeg.py) without a
round trip through the host, so a GPU keeps its batches on the device.

Configs switch it on with the optional key `jpeg` = {'probability': p, 'quality': (low, high)}:
each training image is re-encoded with probability p at a quality drawn uniformly from the range.
With the further key 'consistency': w, each training image is seen twice in its step, under the
same warp and colour noise: once as it is and once re-encoded at a quality from the range; the
loss is the mean of the two squared errors plus w times the squared difference of the two
outputs and of the two feature vectors (each feature divided by its spread in the batch), so the
grade and the features a blend reads learn not to move with compression (`consistency_loss`).
The probability is then unused: the plain view is never re-encoded, the other always.
"""
import math

import torch
import torch.nn.functional as F

LUMA_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
CHROMA_TABLE = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99)
QUALITY_RANGE = (1, 100)
CONFIG_KEYS = {'probability', 'quality', 'consistency'}


def quantisation_tables(quality, device='cpu'):
    """(N,) qualities 1..100 -> (N, 2, 8, 8) luma and chroma tables, as libjpeg scales them
    (jpeg_quality_scaling: 5000/q below 50, 200 − 2q above; entries kept in 1..255)."""
    q = torch.as_tensor(quality, dtype=torch.float32, device=device).clamp(*QUALITY_RANGE)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)
    base = torch.tensor([LUMA_TABLE, CHROMA_TABLE], dtype=torch.float32, device=device)
    tables = torch.floor((base[None] * scale[:, None, None] + 50) / 100).clamp(1, 255)
    return tables.view(-1, 2, 8, 8)


def _dct_matrix(device):
    k = torch.arange(8, dtype=torch.float32, device=device)
    m = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m  # orthonormal: m @ m.T = I


def _basis(device):
    """The 64 8×8 DCT basis images as a (64, 1, 8, 8) convolution kernel (orthonormal)."""
    m = _dct_matrix(device)
    return (m[:, None, :, None] * m[None, :, None, :]).reshape(64, 1, 8, 8)


def _quantised(planes, tables, basis):
    """(N, C, H, W) planes (level-shifted), (N, 8, 8) tables -> the planes after DCT,
    quantisation, dequantisation and inverse DCT; H and W are padded to 8 by edge copies.
    The block DCT is a stride-8 convolution with the 64 basis images, its inverse the
    transposed convolution: one kernel each, where 8×8 matrix products were many small ones."""
    n, c, h, w = planes.shape
    pad_h, pad_w = -h % 8, -w % 8
    if pad_h or pad_w:
        planes = F.pad(planes, (0, pad_w, 0, pad_h), mode='replicate')
    flat = planes.reshape(n * c, 1, *planes.shape[-2:])
    coefficients = F.conv2d(flat, basis, stride=8).view(n, c, 64, -1)
    table = tables.reshape(n, 1, 64, 1)
    coefficients = torch.round(coefficients / table) * table
    blocks = F.conv_transpose2d(coefficients.view(n * c, 64, (h + pad_h) // 8, (w + pad_w) // 8),
                                basis, stride=8)
    return blocks.view(n, c, h + pad_h, w + pad_w)[..., :h, :w]


def jpeg_batch(images, quality):
    """A (N, 3, H, W) uint8 or float batch of 0..255 RGB pixels, each image re-encoded as a JPEG
    of its `quality` (N,) (1..100, 4:2:0 subsampling); float 0..255 out, rounded as a decoder
    rounds."""
    x = images.float()
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    tables = quantisation_tables(quality, x.device)
    basis = _basis(x.device)
    h, w = x.shape[-2:]
    y = _quantised(y[:, None] - 128, tables[:, 0], basis)[:, 0] + 128
    chroma = torch.stack([cb, cr], 1)
    if h > 1 and w > 1:
        chroma = F.avg_pool2d(F.pad(chroma, (0, w % 2, 0, h % 2), mode='replicate'), 2)
    chroma = _quantised(chroma - 128, tables[:, 1], basis) + 128
    if h > 1 and w > 1:  # libjpeg's "fancy" upsampling is a triangle filter: bilinear
        chroma = F.interpolate(chroma, scale_factor=2, mode='bilinear',
                               align_corners=False)[..., :h, :w]
    cb, cr = chroma[:, 0] - 128, chroma[:, 1] - 128
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return torch.round(rgb).clamp(0, 255)


def random_qualities(n, jpeg, generator=None, device='cpu'):
    """(N,) qualities for one training batch: 0 (left alone) or, with the config's probability,
    a quality drawn uniformly from its range."""
    low, high = jpeg['quality']
    chosen = torch.rand(n, generator=generator, device=device) < jpeg['probability']
    quality = torch.round(low + (high - low) * torch.rand(n, generator=generator, device=device))
    return torch.where(chosen, quality, torch.zeros_like(quality))


def recompressed(images, quality):
    """The batch with the images of quality > 0 re-encoded (float 0..255), the rest as they are.

    The images left alone are not touched, so a batch without a quality costs nothing; compiled,
    the whole batch is encoded and the choice made by `torch.where` (no data-dependent shape)."""
    chosen = quality > 0
    x = images.float()
    if torch.compiler.is_compiling():
        return torch.where(chosen[:, None, None, None], jpeg_batch(x, quality.clamp(min=1)), x)
    if not bool(chosen.any()):
        return x
    x = x.clone()
    x[chosen] = jpeg_batch(x[chosen], quality[chosen])
    return x


def paired_qualities(n, jpeg, generator=None, device='cpu'):
    """(2N,) qualities for a batch seen twice (the config's 'consistency'): 0 for the first
    N (the images as they are), a quality from the range for the second N."""
    always = dict(jpeg, probability=1.0)
    return torch.cat([torch.zeros(n, device=device), random_qualities(n, always, generator, device)])


def consistency_loss(outputs, features, weight):
    """`weight` × (mean squared difference of the outputs of the two halves of a paired batch
    + mean over features of their squared difference divided by the feature's variance in the
    batch, which is not differentiated: shrinking a feature does not make it consistent)."""
    plain, squeezed = outputs.float().chunk(2)
    term = (plain - squeezed).pow(2).mean()
    if features is not None:
        f = features.float()
        spread = f.var(dim=0, unbiased=False).detach() + 1e-6
        a, b = f.chunk(2)
        term = term + ((a - b).pow(2) / spread).mean()
    return weight * term


def check(jpeg, path):
    """The config key `jpeg`'s problems, as one message, or None."""
    if not isinstance(jpeg, dict) or not {'probability', 'quality'} <= set(jpeg) <= CONFIG_KEYS:
        return (f"{path}: jpeg must be a dict with the keys probability and quality (and "
                f"optionally consistency) (found {jpeg!r})")
    w = jpeg.get('consistency', 0)
    if not (isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float('inf')):
        return f'{path}: jpeg consistency={w!r}; it must be a number of 0 or more'
    p, q = jpeg['probability'], jpeg['quality']
    if not (isinstance(p, (int, float)) and 0 <= p <= 1):
        return f'{path}: jpeg probability={p!r}; it must be a number from 0 to 1'
    if not (isinstance(q, (tuple, list)) and len(q) == 2 and all(isinstance(v, (int, float)) for v in q)
            and QUALITY_RANGE[0] <= q[0] <= q[1] <= QUALITY_RANGE[1]):
        return f'{path}: jpeg quality={q!r}; it must be (low, high) within 1..100'
    return None
