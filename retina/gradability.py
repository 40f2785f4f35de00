"""Can this photograph be graded?  The checks predict.py runs on every photograph.

Screening graders answer "ungradable" for 10-20% of photographs (blur, poor exposure, a small
pupil, eyelashes); a net grades anything, a black frame included.  Each photograph gets a
verdict, `gradable` yes or no, and the reasons:

- `too small`: the eye is less than half the converted size across (blown up more than 2×);
- `no eye found`: the converted square is not a bright disc on a dark surround: the eye
  covers too little or all of it, or the corners outside the inscribed circle are bright;
- `too dark`, `overexposed` (too bright, or many saturated pixels), `low contrast`: the
  brightness inside the eye, its saturated share and its spread;
- `out of focus`: the spread of the Laplacian of the green channel inside the eye (the
  eye's edge left out) relative to the eye's brightness, so that a dimmer photograph is not
  called blurred for being dim;
- `unlike the training photos`: the Mahalanobis distance of the net's pooled features (its
  centred window) from those of its training photographs, beyond the distance of most of
  its validation photographs (`FeatureStats`, stored in the checkpoint).

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

# Thresholds (bench/bench_gradability.py; BENCHMARKS.md, "Gradability").
MIN_FILL, MAX_FILL = 0.35, 0.985  # share of the square covered by the eye
MAX_CORNERS = 0.25       # mean brightest channel (of 1) in the corners outside the circle
MIN_BRIGHTNESS = 0.12    # mean luminance inside the eye, of 1
MAX_BRIGHTNESS = 0.80
MAX_SATURATED = 0.20     # share of the eye's pixels with a saturated channel
MIN_CONTRAST = 0.025     # standard deviation of the luminance inside the eye, of 1
MIN_SHARPNESS = 0.040    # std of the green Laplacian inside the eye / its mean green
TOO_SMALL = 0.5          # the eye's side must be at least this × the converted size
FEATURE_PERCENTILE = 99  # of the validation photographs' feature distances: the threshold

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
    a dict of fill, corners, brightness, saturated, contrast, sharpness."""
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
    laplacian = ndimage.laplace(green)
    count = eye.sum()
    out = dict(fill=float(eye.mean()), corners=float(brightest[outside].mean() / 255))
    if count < 16:
        return dict(out, brightness=0.0, saturated=0.0, contrast=0.0, sharpness=0.0)
    inside = luminance[eye]
    out.update(brightness=float(inside.mean()),
               saturated=float((rgb[eye] >= SATURATED).any(axis=1).mean()),
               contrast=float(inside.std()))
    out['sharpness'] = (float(laplacian[inner].std() / max(green[inner].mean(), 1.0))
                        if inner.sum() >= 16 else 0.0)
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
    if found['brightness'] < MIN_BRIGHTNESS:
        out.append('too dark')
    if found['brightness'] > MAX_BRIGHTNESS or found['saturated'] > MAX_SATURATED:
        out.append('overexposed')
    if not no_eye and found['contrast'] < MIN_CONTRAST:
        out.append('low contrast')
    if not no_eye and found['brightness'] >= MIN_BRIGHTNESS and \
            found['sharpness'] < MIN_SHARPNESS:
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
    def fit(cls, train_features, valid_features, percentile=FEATURE_PERCENTILE):
        """Ledoit-Wolf shrunk covariance of `train_features`; the threshold at `percentile`
        of the distances of `valid_features` (photographs the net did not train on)."""
        from sklearn.covariance import LedoitWolf
        train = np.asarray(train_features, dtype=np.float64)
        estimate = LedoitWolf().fit(train)
        stats = cls(mean=estimate.location_, precision=estimate.precision_, threshold=0.0)
        stats.threshold = float(np.percentile(stats.distances(valid_features), percentile))
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
