"""Whether a heat map finds the lesions, scored honestly: beside the map, a map that never sees
the image and a map that knows the answer.

Every score is per image, over the pixels of the network's window that lie
inside the fundus (the eye's disc; the black surround is neither lesion nor
background), and averaged over the images that have a lesion in the window:

- auroc: the map as a lesion-pixel detector (sklearn's roc_auc_score of the
  map's values against the mask): 0.5 is no better than chance, 1 ranks
  every lesion pixel above every other;
- pointing_exact: the map's maximum lies on a lesion pixel;
- pointing_game: the maximum lies within `tolerance` pixels of a lesion
  (default half a map cell: a map cannot place its maximum more finely);
- mass_in_lesions: the share of the map's positive part inside lesions
  (0 for a map with no positive part).

Two reference maps are scored on the same images, with the same upsampling:

- blind: for image i, the mean map of the OTHER scored images (each scaled
  by its own peak first, so every image weighs the same).  It never sees
  image i, so whatever it scores comes from where lesions usually are (and
  where the fundus is), not from the photograph.  A map that does not beat
  it has not localised anything.
- oracle: the lesion mask average-pooled to the map's grid and upsampled the
  same way: the best a map of that resolution could do.

The deletion check (the drop in prediction when the map's top pixels are
blanked, against random blobs of the map's grain) is kept from the first
version of these scores.
"""
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from retina.core import metrics
from retina.heatmaps.methods import upsample
from retina.model.augment import standardise

SCORE_NAMES = ('auroc', 'pointing_exact', 'pointing_game', 'mass_in_lesions')
VARIANTS = ('map', 'blind', 'oracle')
DELETION_NAMES = ('deletion_top10_drop', 'deletion_random10_drop', 'deletion_excess_drop',
                  'deletion_ratio')
DELETION_FRACTION = 0.1
DELETION_FILLS = ('black', 'mean')
BOOTSTRAP_SAMPLES = 2000


# --- per image -------------------------------------------------------------------

def default_tolerance(window_size, map_size):
    """Half a map cell in window pixels: the map cannot place a maximum more finely."""
    return max(1, int(round(0.5 * max(w / m for w, m in zip(window_size, map_size)))))


def _inside(evidence, inside):
    return np.ones(np.shape(evidence), dtype=bool) if inside is None else inside


def lesion_mass_share(evidence, lesions, inside=None):
    """Share of the positive part of `evidence` (h, w) inside `lesions`; nan if none is positive."""
    positive = np.clip(np.asarray(evidence, dtype=np.float64), 0, None) * _inside(evidence, inside)
    total = positive.sum()
    return float(positive[lesions].sum() / total) if total > 0 else float('nan')


def near_lesions(lesions, tolerance):
    """Boolean map of the pixels within `tolerance` pixels of a lesion."""
    if not lesions.any():
        return np.zeros_like(lesions)
    return ndimage.distance_transform_edt(~lesions) <= tolerance


def points_at_lesion(evidence, lesions, tolerance, inside=None):
    """Whether the maximum of `evidence` (inside the fundus) lies within `tolerance` px of a lesion."""
    masked = np.where(_inside(evidence, inside), evidence, -np.inf)
    y, x = np.unravel_index(int(np.argmax(masked)), masked.shape)
    return bool(near_lesions(lesions, tolerance)[y, x])


def auroc(evidence, lesions, inside=None):
    """AUROC of `evidence` as a detector of the `lesions` pixels inside the fundus (nan when
    the fundus holds only lesion or only background)."""
    from sklearn.metrics import roc_auc_score
    where = _inside(evidence, inside)
    truth = lesions[where]
    if truth.all() or not truth.any():
        return float('nan')
    return float(roc_auc_score(truth, np.asarray(evidence, dtype=np.float64)[where]))


def score_map(evidence, lesions, inside, tolerance):
    """{score name: value} of one upsampled map against one image's lesions."""
    mass = lesion_mass_share(evidence, lesions, inside)
    return dict(auroc=auroc(evidence, lesions, inside),
                pointing_exact=float(points_at_lesion(evidence, lesions, 0, inside)),
                pointing_game=float(points_at_lesion(evidence, lesions, tolerance, inside)),
                mass_in_lesions=0.0 if np.isnan(mass) else mass)


DISC_RADIUS = 0.08   # optic_disc: the disc's radius as a share of the window's side
DISC_BLUR = 0.04     # ... found on the image blurred with this sigma (share of the side)
DISC_OFFSET = 0.2    # ... at least this share of the width left or right of the centre


def optic_disc(window, inside=None, radius=DISC_RADIUS):
    """Boolean (h, w): where the optic disc of the uint8 (h, w, 3) `window` is, approximately:
    a circle of `radius` × the side around the brightest point of the blurred image inside
    the fundus, beside the centre and near the midline (the disc is the brightest part of a
    macula-centred fundus photograph that was not contrast-enhanced; pass the plain
    conversion of an enhanced image).  For measuring how
    much of a map sits on the disc, not for display."""
    h, w = window.shape[:2]
    inside = np.ones((h, w), dtype=bool) if inside is None else inside
    sigma = DISC_BLUR * max(h, w)
    weight = inside.astype(np.float64)
    brightness = np.asarray(window, dtype=np.float64).mean(axis=2)
    blurred = (ndimage.gaussian_filter(brightness * weight, sigma)
               / (ndimage.gaussian_filter(weight, sigma) + 1e-6))
    yy, xx = np.mgrid[:h, :w]
    # Macula-centred photographs (EyePACS, HEI-MED, the synthetic ones) have the disc beside
    # the centre, near the horizontal midline: bright exudates nearer the centre are not it.
    beside = (np.abs(xx - (w - 1) / 2) >= DISC_OFFSET * w) & (np.abs(yy - (h - 1) / 2) <= 0.25 * h)
    where = inside & beside if (inside & beside).any() else inside
    y, x = np.unravel_index(int(np.argmax(np.where(where, blurred, -np.inf))), (h, w))
    return (yy - y) ** 2 + (xx - x) ** 2 <= (radius * max(h, w)) ** 2


# --- reference maps ------------------------------------------------------------------

def blind_maps(maps):
    """(N, h, w): for each image, the mean of the OTHER images' maps, each divided by its peak |value|.

    Image i's own map is subtracted from the sum before dividing, so the
    result for i is computed without image i (nan when there is no other).
    """
    maps = torch.as_tensor(maps, dtype=torch.float64)
    peak = maps.abs().amax(dim=(1, 2), keepdim=True)
    scaled = maps / torch.where(peak > 0, peak, torch.ones_like(peak))
    n = len(scaled)
    if n < 2:
        return torch.full_like(scaled, float('nan')).float()
    return ((scaled.sum(0, keepdim=True) - scaled) / (n - 1)).float()


def grid_oracle(coverage, grid, window_size):
    """The lesion coverage (h, w) of the window average-pooled to the map's grid and upsampled back."""
    pooled = F.adaptive_avg_pool2d(torch.as_tensor(coverage, dtype=torch.float32)[None, None], tuple(grid))
    return upsample(pooled[:, 0], window_size)[0]


def bootstrap_interval(names, values, samples=BOOTSTRAP_SAMPLES, level=0.95, seed=0):
    """(mean, low, high): the mean of the finite `values` (one per image of `names`) and its
    percentile bootstrap interval over resamples of the patients (`metrics.bootstrap`: both
    eyes of a drawn patient together).  Images whose names carry no eye (`IDRiD_01`, as in
    most lesion-mask sets) are each their own patient, so there the resample is one of
    images: such sets do not say which photographs share a patient."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return float('nan'), float('nan'), float('nan')
    interval = metrics.bootstrap([name for name, keep in zip(names, finite) if keep], np.mean,
                                 values[finite], n=samples, seed=seed, level=level)
    return interval.value, interval.low, interval.high


# --- deletion --------------------------------------------------------------------------

def blank(x, where, fill='mean', *, constants):
    """`x` (N, 3, h, w, standardised) with the pixels where `where` (N, h, w) is True blanked.

    `fill` 'black' is raw 0, the photograph's surround (standardised:
    -mean / std with the net's `constants`); 'mean' is the data set's mean colour
    (standardised: 0).
    """
    if fill not in DELETION_FILLS:
        raise ValueError(f'fill must be one of {", ".join(DELETION_FILLS)}, not {fill!r}')
    value = torch.zeros(1, 3, 1, 1, device=x.device, dtype=x.dtype)
    if fill == 'black':
        value = standardise(value, constants=constants)
    return torch.where(where[:, None], value, x)


def top_pixels(maps, size, fraction):
    """Boolean (N, *size): the top `fraction` of the pixels of `maps` upsampled to `size`."""
    up = upsample(maps.float(), size).flatten(1)
    chosen = torch.zeros_like(up, dtype=torch.bool)
    chosen.scatter_(1, up.topk(max(1, int(round(fraction * up.shape[1]))), dim=1).indices, True)
    return chosen.reshape(-1, *size)


@torch.no_grad()
def deletion_drops(net, x, maps, fraction=DELETION_FRACTION, generator=None, fill='mean', *,
                   constants):
    """(drop when blanking the top `fraction` of the map's pixels, drop for a random `fraction`).

    `maps` (N, h', w') are upsampled to the input; drops are prediction(x) -
    prediction(blanked x), per image.  The random pixels are the top
    `fraction` of a random map at the same resolution, upsampled the same
    way: blobs of the same grain in random places.  Scattered single black
    pixels would be no control: they look like microaneurysms and raise
    the prediction.  `constants`: the net's pixel constants (LoadedNet.constants), which
    standardised `x` (none is assumed).
    """
    size = tuple(x.shape[-2:])
    random_maps = torch.rand(maps.shape, generator=generator).to(maps.device)
    net.eval()
    before = net(x)[:, 0]
    top = before - net(blank(x, top_pixels(maps, size, fraction), fill,
                             constants=constants))[:, 0]
    random = before - net(blank(x, top_pixels(random_maps, size, fraction), fill,
                                constants=constants))[:, 0]
    return top.float().cpu().numpy(), random.float().cpu().numpy()


# --- the summary -------------------------------------------------------------------------

@dataclasses.dataclass
class Record:
    """One image's scores for one lesion kind: {variant: {score: value}}."""
    name: str
    kind: str
    level: int
    values: dict


@dataclasses.dataclass
class Scores:
    """Everything a run scored; `lines()` prints it and `as_dict()` gives it to programs."""
    level_source: str
    fill: str = 'mean'
    tolerance: int = 0
    grid: tuple = ()
    records: list = dataclasses.field(default_factory=list)
    top_drops: list = dataclasses.field(default_factory=list)
    random_drops: list = dataclasses.field(default_factory=list)
    no_mask: dict = dataclasses.field(default_factory=dict)     # kind -> names of images without a mask
    no_label: list = dataclasses.field(default_factory=list)
    kinds: tuple = ('',)

    def table(self, kind, level=None):
        """{score: {variant: mean}} over the records of `kind` (and `level`), and their number."""
        chosen = [r for r in self.records if r.kind == kind and (level is None or r.level == level)]
        table = {score: {variant: _mean([r.values[variant][score] for r in chosen]) for variant in VARIANTS}
                 for score in SCORE_NAMES}
        return table, len(chosen)

    def auroc_over_blind(self, kind):
        """(mean, low, high) of the per-image AUROC of the map minus the blind map's, with its
        interval over patients (`bootstrap_interval`)."""
        chosen = [r for r in self.records if r.kind == kind]
        return bootstrap_interval([r.name for r in chosen],
                                  [r.values['map']['auroc'] - r.values['blind']['auroc']
                                   for r in chosen])

    def deletion(self):
        top, random = np.mean(self.top_drops or [np.nan]), np.mean(self.random_drops or [np.nan])
        return dict(deletion_top10_drop=float(top), deletion_random10_drop=float(random),
                    deletion_excess_drop=float(top - random),
                    deletion_ratio=float(top / random) if random > 0 else float('nan'))

    def levels(self, kind):
        return sorted({r.level for r in self.records if r.kind == kind})

    def as_dict(self):
        out = dict(level_source=self.level_source, tolerance=self.tolerance, grid=list(self.grid),
                   kinds={}, deletion=self.deletion(), deletion_images=len(self.top_drops))
        for kind in self.kinds:
            table, n = self.table(kind)
            mean, low, high = self.auroc_over_blind(kind)
            out['kinds'][kind or 'lesion'] = dict(
                n=n, scores=table, auroc_minus_blind=dict(mean=mean, low=low, high=high),
                levels={str(level): dict(zip(('scores', 'n'), self.table(kind, level)))
                        for level in self.levels(kind)})
        return out

    def lines(self):
        grid = 'x'.join(str(s) for s in self.grid)
        notes = [f'# localisation: images of {self.level_source} with a lesion in the network\'s window; '
                 f'every score per image inside the fundus, then averaged; the same images in every column',
                 f'# columns: map  blind (mean map of the other images, never this one)  oracle (the mask '
                 f'pooled to the {grid} grid); pointing_game: a lesion within {self.tolerance} px of the '
                 f'maximum']
        values = []
        for kind in self.kinds:
            table, n = self.table(kind)
            tag = f'[{kind}]' if kind else ''
            notes_kind = f'{kind} ' if kind else ''
            values.append(f'# {notes_kind}{n} image(s)')
            for score in SCORE_NAMES:
                values.append(f'{score}{tag}: ' + '  '.join(f'{table[score][v]:.4f}' for v in VARIANTS))
            mean, low, high = self.auroc_over_blind(kind)
            values.append(f'# {notes_kind}auroc minus blind: {mean:+.4f}, 95% bootstrap interval over '
                          f'patients [{low:+.4f}, {high:+.4f}]')
            for level in self.levels(kind):
                level_table, level_n = self.table(kind, level)
                values.append(f'# {notes_kind}level {level} ({level_n} image(s)): ' + '   '.join(
                    f'{score} ' + '/'.join(f'{level_table[score][v]:.3f}' for v in VARIANTS)
                    for score in SCORE_NAMES))
        for kind, names in self.no_mask.items():
            if names:
                notes.append(f'# {kind + ": " if kind else ""}{len(names)} image(s) have no mask'
                             f'{" of this kind" if kind else ""} and are not localised (e.g. {names[0]})')
        if self.no_label:
            notes.append(f'# {len(self.no_label)} image(s) have no label and are not scored '
                         f'(e.g. {self.no_label[0]})')
        if not self.top_drops:
            return notes + values + ['# deletion: not measured (no single net made these maps, or no '
                                     'image was scored)']
        deletion = self.deletion()
        values.append(f'# deletion: {len(self.top_drops)} image(s); {DELETION_FRACTION:.0%} of the window '
                      f'set to {"black" if self.fill == "black" else "the mean colour"}: the map\'s top '
                      f'pixels, or random blobs of the map\'s grain')
        if deletion['deletion_random10_drop'] <= 0:
            values.append(f'# deletion_ratio is nan: blanking random blobs did not lower the prediction '
                          f'(change {-deletion["deletion_random10_drop"]:+.4f}); deletion_excess_drop '
                          f'(top minus random) is the comparison that stays defined')
        return notes + values + [f'{key}: {value:.4f}' for key, value in deletion.items()]


def _mean(values):
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float('nan')
