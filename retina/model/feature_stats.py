"""The statistics of a net's pooled features on its training photographs, stored in its
checkpoint: predict.py calls a photograph whose features lie far from them "unlike the training
photos" (retina.data.gradability lists every check)."""
from dataclasses import dataclass

import numpy as np
import torch

from retina.core import atomic
from retina.model import checkpoint
from retina.model.inference import predict

FEATURE_PERCENTILE = 99  # of the validation photographs' feature distances ...
FEATURE_MARGIN = 2.0     # ... times this is the threshold: raw photographs of other sources sit
                         # further out than the net's own validation photographs (at the bare
                         # 99th percentile, 20-36% of those of eyepacs_raw, eyepacs_raw1024 and
                         # HEI-MED were refused; at 1.75x, 3.4% of eyepacs_raw and eyepacs_raw1024
                         # with the released eyepacs-256, at 2.0x 1.7% and 0.9%: BENCHMARKS.md)
MIN_LEVEL_PHOTOS = 10  # a level with fewer training photographs gets no mean of its own


@dataclass
class FeatureStats:
    """Means and inverse covariance of a net's pooled features (centred window) on its
    training photographs, and the distance beyond which a photograph is unlike them.

    With the training photographs' levels, one mean per level and a covariance of the features
    about their level's mean: a photograph's distance is to the nearest level's mean, so that
    a level-4 eye, far from the mass of level-0 eyes, is measured against the level-4 eyes the
    net trained on.  Without levels (checkpoints written before them), one mean."""
    mean: np.ndarray        # (F,) or (K, F): one row per level
    precision: np.ndarray
    threshold: float

    @classmethod
    def fit(cls, train_features, valid_features, percentile=FEATURE_PERCENTILE,
            margin=FEATURE_MARGIN, train_levels=None):
        """Ledoit-Wolf shrunk covariance of `train_features` about their level's mean (about
        the overall mean without `train_levels`); the threshold `margin` times the `percentile`
        of the distances of `valid_features` (photographs the net did not train on)."""
        from sklearn.covariance import LedoitWolf
        train = np.asarray(train_features, dtype=np.float64)
        levels = np.asarray(train_levels) if train_levels is not None else np.array([])
        kept = [k for k in np.unique(levels) if (levels == k).sum() >= MIN_LEVEL_PHOTOS]
        if kept:
            mean = np.stack([train[levels == k].mean(axis=0) for k in kept])
            rows = np.isin(levels, kept)
            residuals = train[rows] - mean[np.searchsorted(np.array(kept), levels[rows])]
            estimate = LedoitWolf(assume_centered=True).fit(residuals)
        else:
            mean, estimate = train.mean(axis=0), LedoitWolf().fit(train)
        stats = cls(mean=mean, precision=estimate.precision_, threshold=0.0)
        stats.threshold = margin * float(np.percentile(stats.distances(valid_features),
                                                       percentile))
        return stats

    def distances(self, features):
        features = np.asarray(features, dtype=np.float64)
        means = self.mean.reshape(-1, features.shape[1])
        each = []
        for mean in means:
            centred = features - mean
            each.append(np.einsum('ij,jk,ik->i', centred, self.precision, centred))
        return np.sqrt(np.maximum(np.min(each, axis=0), 0))

    def to_state(self):
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


def centred_features(model, images, rows, spec, runtime, batch_size):
    """The pooled features (N × F, float64) of `images[rows]` (a uint8 cache) on the centred
    window of `spec` (the net's `checkpoint.InputSpec`), as predict.py computes them for a
    photograph (`inference.predict`)."""
    return predict(model, images, rows, spec, runtime, batch_size,
                   features=True).astype(np.float64)


def attach_feature_stats(path, images, train_rows, valid_rows, runtime, levels=None):
    """Fit `FeatureStats` of the checkpoint at `path` on the cached `images` of its training
    and validation rows (with `levels`, the levels of every image: one mean per level), and
    write them into the checkpoint (its `feature_stats`)."""
    state = checkpoint.load(path)
    config = checkpoint.config_of(state)
    loaded = checkpoint.load_net(config, path, runtime.device)
    model = loaded.net.to(memory_format=torch.channels_last)
    batch_size = runtime.eval_batch_size(config.cnf)
    stats = FeatureStats.fit(centred_features(model, images, train_rows, loaded.spec, runtime,
                                              batch_size),
                             centred_features(model, images, valid_rows, loaded.spec, runtime,
                                              batch_size),
                             train_levels=None if levels is None else np.asarray(levels)[train_rows])
    state = dict(state, model={k: v.clone() for k, v in state['model'].items()},
                 feature_stats=stats.to_state())
    atomic.torch_save(path, state)
    return stats
