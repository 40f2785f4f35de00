"""Can this photograph be graded?  The checks predict.py runs on every photograph.

Screening graders answer "ungradable" for 10-20% of photographs (blur, poor exposure, a small
pupil, eyelashes); a net grades anything, a black frame included.  Each photograph gets a
verdict, `gradable` yes or no, and the reasons:

- `too small`: the eye is less than half the converted size across (blown up more than 2×);
- `no eye found`: the converted square is not a bright disc on a dark surround: the eye
  covers too little or all of it, or the corners outside the inscribed circle are bright;
- `too dark`, `overexposed` (too bright, or many saturated pixels), `low contrast`: the
  brightness inside the eye, its saturated share and its spread;
- `out of focus`: the fine detail of the green channel inside the eye (the eye's edge left
  out) against its coarser detail: blur takes the fine away first;
- `unlike the training photos`: the Mahalanobis distance of the net's pooled features (its
  centred window) from those of its training photographs, beyond 1.75 times the 99th
  percentile of its validation photographs' distances (`FeatureStats`, stored in the
  checkpoint).

The image measures are taken on the photograph cropped and resized to ANALYSIS_SIZE pixels
as convert.py crops it, before any --enhance.  The thresholds were set on the real photographs
of ../shared/data (eyepacs_raw, eyepacs_raw1024, heimed: at most 2% of them called
ungradable) and on strongly degraded copies of them (most of which must be):
bench/bench_gradability.py measures both and writes the table to BENCHMARKS.md.
"""
from dataclasses import dataclass

import numpy as np

ANALYSIS_SIZE = 128
SURROUND = 15            # a pixel whose brightest channel is at most this is surround, not eye
SATURATED = 250          # a channel at or above this is saturated
EDGE = 3                 # pixels of the eye's edge left out of the focus measure

# Thresholds, set on the 1,051 real photographs and their degraded copies
# (bench/bench_gradability.py; BENCHMARKS.md, "Gradability").
MIN_FILL, MAX_FILL = 0.35, 0.985  # share of the square covered by the eye (real: 0.57-0.91)
MAX_CORNERS = 0.40       # mean brightest channel (of 1) in the corners outside the circle
MIN_BRIGHTNESS = 0.10    # mean luminance inside the eye, of 1
DIM = 0.25               # a low-contrast photograph dimmer than this is called too dark
MAX_BRIGHTNESS = 0.85
MAX_GREEN_SATURATED = 0.10  # share of the eye's pixels with a saturated green (red saturates
                            # in many a good photograph; green does not)
MIN_CONTRAST = 0.042     # standard deviation of the luminance inside the eye, of 1
MIN_FOCUS = 0.46         # fine detail of the green channel against coarser (`measures`)
TOO_SMALL = 0.5          # the eye's side must be at least this × the converted size
FEATURE_PERCENTILE = 99  # of the validation photographs' feature distances ...
FEATURE_MARGIN = 1.75    # ... times this is the threshold: raw photographs of other sources sit
                         # further out than the net's own validation photographs (at the bare
                         # 99th percentile, 20-36% of those of eyepacs_raw, eyepacs_raw1024 and
                         # HEI-MED were refused; at 1.75x, 1% or less: BENCHMARKS.md)

REASONS = ('too small', 'no eye found', 'too dark', 'overexposed', 'low contrast',
           'out of focus', 'unlike the training photos')


def _resized(rgb, size=ANALYSIS_SIZE):
    from PIL import Image
    if rgb.shape[0] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR,
                                                  reducing_gap=3.0))


def measures(rgb):
    """The image measures of a converted photograph (S × S × 3 uint8, before --enhance):
    a dict of fill, corners, brightness, saturated, green_saturated, green, contrast, focus."""
    from scipy import ndimage
    rgb = _resized(np.asarray(rgb, dtype=np.uint8))
    size = rgb.shape[0]
    brightest = rgb.max(axis=2)
    eye = brightest > SURROUND
    luminance = (rgb @ np.array([0.299, 0.587, 0.114])) / 255
    y, x = np.mgrid[:size, :size] + 0.5
    outside = np.hypot(x - size / 2, y - size / 2) > 0.52 * size
    inner = ndimage.binary_erosion(eye, iterations=EDGE)
    green = rgb[..., 1].astype(np.float64)
    count = eye.sum()
    out = dict(fill=float(eye.mean()), corners=float(brightest[outside].mean() / 255))
    if count < 16:
        return dict(out, brightness=0.0, saturated=0.0, green_saturated=0.0, green=0.0,
                    contrast=0.0, focus=0.0)
    inside = luminance[eye]
    out.update(brightness=float(inside.mean()),
               saturated=float((rgb[eye] >= SATURATED).any(axis=1).mean()),
               # red is near saturation in many a good fundus photograph; green is not
               green_saturated=float((rgb[..., 1][eye] >= SATURATED).mean()),
               green=float(green[eye].mean() / 255),
               contrast=float(inside.std()))
    if inner.sum() < 16:
        return dict(out, focus=0.0)
    # Focus: fine detail (a band between Gaussian blurs of σ 1 and 2 pixels) against coarser
    # detail (σ 2 to 4) inside the eye: blur removes the first before the second, while a dim
    # or flat photograph loses both alike.  Bands, not the Laplacian: the finest scale of a dim
    # photograph is mostly 8-bit quantisation, which a blurred photograph keeps.
    fine, middle, coarse = (ndimage.gaussian_filter(green, s) for s in (1.0, 2.0, 4.0))
    out['focus'] = float((fine - middle)[inner].std() / max((middle - coarse)[inner].std(),
                                                            1e-6))
    return out


def reasons(found, eye_side, crop_size):
    """The reasons (of REASONS) that measures `found` and the eye's side in the decoded
    photograph (pixels) give for calling it ungradable; [] when it is gradable."""
    out = []
    if eye_side < TOO_SMALL * crop_size:
        out.append('too small')
    no_eye = (not MIN_FILL <= found['fill'] <= MAX_FILL) or found['corners'] > MAX_CORNERS
    if no_eye:
        out.append('no eye found')
    flat = not no_eye and found['contrast'] < MIN_CONTRAST
    if found['brightness'] < MIN_BRIGHTNESS or (flat and found['brightness'] < DIM):
        out.append('too dark')
    elif flat:
        out.append('low contrast')
    if found['brightness'] > MAX_BRIGHTNESS or found['green_saturated'] > MAX_GREEN_SATURATED:
        out.append('overexposed')
    if not no_eye and found['brightness'] >= MIN_BRIGHTNESS and found['focus'] < MIN_FOCUS:
        out.append('out of focus')
    return out


@dataclass
class FeatureStats:
    """Mean and inverse covariance of a net's pooled features (centred window) on its
    training photographs, and the distance beyond which a photograph is unlike them."""
    mean: np.ndarray
    precision: np.ndarray
    threshold: float

    @classmethod
    def fit(cls, train_features, valid_features, percentile=FEATURE_PERCENTILE,
            margin=FEATURE_MARGIN):
        """Ledoit-Wolf shrunk covariance of `train_features`; the threshold `margin` times
        the `percentile` of the distances of `valid_features` (photographs the net did not
        train on)."""
        from sklearn.covariance import LedoitWolf
        train = np.asarray(train_features, dtype=np.float64)
        estimate = LedoitWolf().fit(train)
        stats = cls(mean=estimate.location_, precision=estimate.precision_, threshold=0.0)
        stats.threshold = margin * float(np.percentile(stats.distances(valid_features),
                                                       percentile))
        return stats

    def distances(self, features):
        centred = np.asarray(features, dtype=np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum('ij,jk,ik->i', centred, self.precision, centred),
                                  0))

    def to_state(self):
        import torch
        return dict(mean=torch.from_numpy(self.mean.astype(np.float32)),
                    precision=torch.from_numpy(self.precision.astype(np.float32)),
                    threshold=float(self.threshold))

    @classmethod
    def from_state(cls, state):
        if not state:
            return None
        return cls(mean=state['mean'].double().numpy(),
                   precision=state['precision'].double().numpy(),
                   threshold=float(state['threshold']))


def centred_features(model, images, rows, config, runtime):
    """The pooled features (N × F, float64) of `images[rows]` (a uint8 cache) on the centred
    window, as predict.py computes them for a photograph (`inference.predict`)."""
    from retina.inference import predict
    return predict(model, images, rows, config, runtime, features=True).astype(np.float64)


def attach_feature_stats(path, images, train_rows, valid_rows, runtime):
    """Fit `FeatureStats` of the checkpoint at `path` on the cached `images` of its training
    and validation rows, and write them into the checkpoint (its `feature_stats`)."""
    import torch

    from retina import atomic, checkpoint
    state = checkpoint.load(path)
    config = checkpoint.config_of(state)
    model = checkpoint.load_net(config, path, runtime.device).net.to(
        memory_format=torch.channels_last)
    stats = FeatureStats.fit(centred_features(model, images, train_rows, config, runtime),
                             centred_features(model, images, valid_rows, config, runtime))
    state = dict(state, model={k: v.clone() for k, v in state['model'].items()},
                 feature_stats=stats.to_state())
    atomic.torch_save(path, state)
    return stats
