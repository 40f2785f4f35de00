"""Synthetic fundus photographs with known lesions, for tests and quick experiments.

The real Kaggle data (35,126 training photographs, tens of gigabytes) is too
big for a test suite or a laptop demo.  This module draws look-alikes: a
bright orange-red eye disc on black, an optic disc on the nasal side, a vessel
tree, and the lesions that define the diabetic-retinopathy levels 0-4.  Every
lesion is also painted into a binary mask, so that regression activation maps
can be checked against where the lesions really are.

The layout under the output folder copies the competition's:

    train/{patient}_{left|right}.jpeg   test/{patient}_{left|right}.jpeg
    trainLabels.csv                     testLabels.csv (for scoring only)
    masks/{patient}_{left|right}.png    SYNTHETIC.txt (how it was made)
    masks_by_kind/{red,exudate,other_bright}/{patient}_{left|right}.png
                                        (with --masks_by_kind)

masks_by_kind/ splits the lesions like the HEI-MED experts' masks: red
(microaneurysms, haemorrhages, new vessels, pre-retinal bleeds), exudate
(hard exudates) and other_bright (cotton-wool spots), so that a heat map can
be scored on the small dark lesions apart from the bright ones
(`ram.py --masks DIR/masks_by_kind`).

Lesion sizes are fractions of the eye radius so that they stay visible after
the pipeline crops the eye and shrinks it to 128 pixels.  Every image has its
own random generator seeded from (seed, patient, eye), so a photograph does
not depend on which others are generated or in what order.

    python -m retina.synthetic --out data/synthetic --n_patients 60
"""
import math
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from retina.core.atomic import save_image, write_text
from retina.core.errors import UserError, handle_errors
from retina.core.options import CONTEXT_SETTINGS, output_folder_option, seed_option
from retina.core.paths import IMAGE_EXTENSIONS

LEVELS = (0, 1, 2, 3, 4)
# Skewed towards healthy eyes like the real data, but with enough severe
# cases for a small training set to learn levels 3 and 4.
LEVEL_FRACTIONS = (0.40, 0.15, 0.20, 0.125, 0.125)
# Both eyes of a patient usually have the same level; otherwise they differ by one.
SAME_LEVEL_PROBABILITY = 0.8
EYES = ('left', 'right')
JPEG_QUALITY = 95
MARKER_FILE = 'SYNTHETIC.txt'

# (fewest, most) lesions of each kind per level; exudates come in clusters.
_SEVERE_NONPROLIFERATIVE = {'microaneurysm': (18, 30), 'haemorrhage': (12, 20), 'exudate_cluster': (4, 7),
                            'cotton_wool_spot': (1, 4)}
LESION_COUNTS = {
    0: {},
    1: {'microaneurysm': (4, 10)},
    2: {'microaneurysm': (10, 18), 'haemorrhage': (3, 6), 'exudate_cluster': (1, 3)},
    3: _SEVERE_NONPROLIFERATIVE,
    4: {**_SEVERE_NONPROLIFERATIVE, 'neovascular_tangle': (2, 4)},
}
PRERETINAL_HAEMORRHAGE_PROBABILITY = 0.6

# Radii as fractions of the eye radius R.
MICROANEURYSM_RADIUS = (0.015, 0.025)
HAEMORRHAGE_RADIUS = (0.04, 0.08)
EXUDATE_RADIUS = (0.02, 0.04)
COTTON_WOOL_RADIUS = (0.05, 0.08)
PRERETINAL_RADIUS = (0.12, 0.18)

# The masks_by_kind/ folder of each lesion, named like HEI-MED's mask folders.
LESION_KINDS = {'microaneurysm': 'red', 'haemorrhage': 'red', 'neovascular_tangle': 'red',
                'preretinal_haemorrhage': 'red', 'exudate_cluster': 'exudate',
                'cotton_wool_spot': 'other_bright'}
KINDS = tuple(dict.fromkeys(LESION_KINDS.values()))   # red, exudate, other_bright


@dataclass(frozen=True)
class ImageSpec:
    """One photograph to generate: whose eye, its level and its split."""
    patient: int
    eye: str
    level: int
    split: str

    @property
    def name(self):
        return f'{self.patient}_{self.eye}'


@dataclass(frozen=True)
class EyeGeometry:
    """Where things are in one photograph, in pixels; `nasal` is +1 when the optic disc is right of centre."""
    width: int
    height: int
    cx: float
    cy: float
    radius: float
    nasal: int
    disc_x: float
    disc_y: float
    disc_rx: float
    disc_ry: float
    fovea_x: float
    fovea_y: float


# --------------------------------------------------------------------------
# Which patients, eyes, levels and splits


def _counts_by_quota(fractions, total):
    """Split `total` into integer counts closest to `fractions` (largest remainder)."""
    exact = np.asarray(fractions) * total
    counts = np.floor(exact).astype(int)
    shortfall = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind='stable')[:shortfall]] += 1
    return counts


def plan_images(n_patients, seed, one_eye_fraction, test_fraction):
    """The photographs to generate, sorted by patient and eye.

    Patient levels follow LEVEL_FRACTIONS by quota rather than by chance, and
    test patients are picked evenly along the patients sorted by level, so
    that even a small set has close to the same mix of levels in both splits.
    """
    rng = np.random.default_rng(seed)
    patients = np.arange(1, n_patients + 1)
    patient_levels = rng.permutation(np.repeat(LEVELS, _counts_by_quota(LEVEL_FRACTIONS, n_patients)))

    n_test = min(round(n_patients * test_fraction), n_patients - 1)
    by_level = np.lexsort((rng.random(n_patients), patient_levels))
    test_positions = np.floor((np.arange(n_test) + rng.random()) * n_patients / max(n_test, 1)).astype(int)
    test_patients = set(patients[by_level[test_positions]].tolist())

    n_one_eyed = round(n_patients * one_eye_fraction)
    one_eyed = set(rng.choice(patients, size=n_one_eyed, replace=False).tolist())

    specs = []
    for patient, level in zip(patients.tolist(), patient_levels.tolist()):
        eye_levels = {eye: level for eye in EYES}
        if rng.random() >= SAME_LEVEL_PROBABILITY:
            step = rng.choice((-1, 1))
            if not 0 <= level + step <= 4:
                step = -step
            eye_levels[EYES[rng.integers(2)]] = int(level + step)
        kept_eyes = [EYES[rng.integers(2)]] if patient in one_eyed else list(EYES)
        split = 'test' if patient in test_patients else 'train'
        specs.extend(ImageSpec(patient, eye, eye_levels[eye], split) for eye in kept_eyes)
    return specs


def image_rng(seed, patient, eye):
    """The random source of one photograph, independent of all the others."""
    return np.random.default_rng([seed, patient, EYES.index(eye)])


# --------------------------------------------------------------------------
# Drawing one photograph


def _eye_geometry(rng, width, height, eye):
    short_side = min(width, height)
    radius = rng.uniform(0.46, 0.49) * short_side
    cx = width / 2 + rng.uniform(-0.015, 0.015) * short_side
    cy = height / 2 + rng.uniform(-0.015, 0.015) * short_side
    # Photographed from the front, a right eye's optic disc (its nasal side) is on the viewer's right.
    nasal = 1 if eye == 'right' else -1
    disc_x = cx + nasal * rng.uniform(0.38, 0.46) * radius
    disc_y = cy + rng.uniform(-0.06, 0.06) * radius
    disc_rx = rng.uniform(0.11, 0.13) * radius
    disc_ry = disc_rx * rng.uniform(1.05, 1.2)
    # The fovea lies about two and a half disc diameters temporal of the disc, slightly lower.
    fovea_x = disc_x - nasal * rng.uniform(0.52, 0.60) * radius
    fovea_y = disc_y + rng.uniform(0.0, 0.06) * radius
    return EyeGeometry(width, height, cx, cy, radius, nasal, disc_x, disc_y, disc_rx, disc_ry,
                       fovea_x, fovea_y)


def _smooth_noise(rng, width, height, cell):
    """Low-frequency noise with standard deviation about 1: random values on a coarse grid, upsampled."""
    coarse = rng.standard_normal((max(2, round(height / cell)), max(2, round(width / cell)))).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, 'F').resize((width, height), Image.BICUBIC))


def _retina_albedo(g, rng, base_colour):
    """The retina's colour before illumination: mottled orange-red, a darker macula, a pale optic disc."""
    ys, xs = np.ogrid[0:g.height, 0:g.width]
    xs = xs.astype(np.float32)
    ys = ys.astype(np.float32)

    mottling = (1 + rng.uniform(0.02, 0.04) * _smooth_noise(rng, g.width, g.height, cell=g.radius / 5)
                + 0.015 * _smooth_noise(rng, g.width, g.height, cell=g.radius / 40))
    fovea_distance2 = ((xs - g.fovea_x) ** 2 + (ys - g.fovea_y) ** 2) / (0.13 * g.radius) ** 2
    macula = 1 - rng.uniform(0.18, 0.3) * np.exp(-fovea_distance2 / 2)
    shade = mottling * macula
    albedo = shade[..., None] * np.asarray(base_colour, dtype=np.float32)

    disc_distance = np.sqrt(((xs - g.disc_x) / g.disc_rx) ** 2 + ((ys - g.disc_y) / g.disc_ry) ** 2)
    disc_alpha = np.clip((1.1 - disc_distance) / 0.25, 0, 1)[..., None]
    disc_colour = np.array([rng.uniform(235, 255), rng.uniform(175, 210), rng.uniform(100, 140)], np.float32)
    cup_alpha = np.clip((0.55 - disc_distance) / 0.3, 0, 1)[..., None]
    cup_colour = np.array([255, 240, 200], np.float32)
    albedo = albedo * (1 - disc_alpha) + disc_colour * disc_alpha
    return albedo * (1 - cup_alpha) + cup_colour * cup_alpha


def _illumination(g, rng):
    """Brightness of the flash over the photo: darker toward the rim, a little uneven, zero outside the eye."""
    ys, xs = np.ogrid[0:g.height, 0:g.width]
    dx = (xs.astype(np.float32) - g.cx) / g.radius
    dy = (ys.astype(np.float32) - g.cy) / g.radius
    r = np.sqrt(dx ** 2 + dy ** 2)
    vignette = 1 - rng.uniform(0.35, 0.55) * r ** rng.uniform(2.0, 3.0)
    tilt = rng.uniform(0, 2 * math.pi)
    uneven = 1 + rng.uniform(0.0, 0.1) * (dx * math.cos(tilt) + dy * math.sin(tilt))
    # One pixel of soft edge, so the eye's rim is anti-aliased like a real photo's.
    inside = np.clip((1 - r) * g.radius + 0.5, 0, 1)
    return vignette * uneven * inside


def _wrap_angle(angle):
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _grow_vessel(draw, rng, g, start, angle, width, colour, steps, bend_towards=None):
    """Draw one vessel and its branches as a random walk that thins with distance."""
    step_length = 0.035 * g.radius
    thinnest = max(1.0, 0.004 * g.radius)
    pending = [(start[0], start[1], angle, width, steps, bend_towards)]
    while pending:
        x, y, angle, width, steps, target = pending.pop()
        target = angle if target is None else target
        for _ in range(steps):
            angle += 0.1 * _wrap_angle(target - angle) + rng.normal(0, 0.08)
            next_x = x + step_length * math.cos(angle)
            next_y = y + step_length * math.sin(angle)
            line_width = max(1, round(width))
            draw.line([(x, y), (next_x, next_y)], fill=colour, width=line_width)
            if line_width >= 3:
                # Round joints, so that a thick vessel has no notches where its segments meet.
                half = (line_width - 1) / 2
                draw.ellipse([next_x - half, next_y - half, next_x + half, next_y + half], fill=colour)
            x, y = next_x, next_y
            width *= 0.97
            if math.hypot(x - g.cx, y - g.cy) > g.radius or width < thinnest:
                break
            if width > 2 * thinnest and rng.random() < 0.12:
                branch_angle = angle + rng.choice((-1, 1)) * rng.uniform(0.5, 1.0)
                pending.append((x, y, branch_angle, width * 0.65, max(3, steps // 2), None))
                width *= 0.85


def _draw_vessel_tree(draw, rng, g, base_colour):
    """Veins and arteries leave the optic disc in four arcades; the temporal ones arch around the macula."""
    base = np.asarray(base_colour)
    vein = tuple(int(c) for c in base * (0.50, 0.30, 0.38))
    artery = tuple(int(c) for c in base * (0.70, 0.45, 0.50))
    temporal = math.pi if g.nasal > 0 else 0.0
    nasal = 0.0 if g.nasal > 0 else math.pi
    up, down = -math.pi / 2, math.pi / 2
    arcades = [
        # (initial direction, direction it bends towards, length in steps)
        (up - g.nasal * 0.35, temporal, 38),
        (down + g.nasal * 0.35, temporal, 38),
        (up + g.nasal * 0.5, nasal, 18),
        (down - g.nasal * 0.5, nasal, 18),
    ]
    for initial, bend_towards, steps in arcades:
        for colour, width, offset in ((vein, 0.030, 0.12), (artery, 0.022, -0.12)):
            _grow_vessel(draw, rng, g, (g.disc_x, g.disc_y), initial + offset + rng.normal(0, 0.1),
                         width * g.radius, colour, steps, bend_towards)


class _LesionPainter:
    """Paints each lesion into the photo and, as 255, into the lesion mask and its kind's mask
    (where a lesion covers another, the other kinds' masks are cleared: the photo shows the top one)."""

    def __init__(self, image, mask, g, rng, base_colour, kind_masks=None):
        self.photo = ImageDraw.Draw(image)
        self.masks = [(ImageDraw.Draw(mask), None)]
        self.masks += [(ImageDraw.Draw(m), kind) for kind, m in (kind_masks or {}).items()]
        self.kind = None
        self.g = g
        self.rng = rng
        self.base = np.asarray(base_colour)

    def paint(self, lesion):
        """Draw one lesion of `lesion` (a LESION_KINDS key)."""
        self.kind = LESION_KINDS[lesion]
        getattr(self, lesion)()

    def _fills(self):
        """(mask drawer, fill) pairs: 255 in the union and the lesion's kind, 0 in the other kinds."""
        return [(draw, 255 if kind in (None, self.kind) else 0) for draw, kind in self.masks]

    def _colour(self, low, high):
        """A colour between `low` and `high` times the retina's own colour, so lesions vary with the eye."""
        return tuple(int(c) for c in self.base * self.rng.uniform(low, high))

    def _point(self, max_fraction=0.85):
        """A random point inside the eye, outside the optic disc."""
        g = self.g
        for _ in range(20):
            r = max_fraction * g.radius * math.sqrt(self.rng.random())
            theta = self.rng.uniform(0, 2 * math.pi)
            x, y = g.cx + r * math.cos(theta), g.cy + r * math.sin(theta)
            if ((x - g.disc_x) / g.disc_rx) ** 2 + ((y - g.disc_y) / g.disc_ry) ** 2 > 1.7:
                break
        return x, y

    def _disc(self, x, y, radius, colour):
        box = [x - radius, y - radius, x + radius, y + radius]
        self.photo.ellipse(box, fill=colour)
        for draw, fill in self._fills():
            draw.ellipse(box, fill=fill)

    def _polygon(self, points, colour):
        self.photo.polygon(points, fill=colour)
        for draw, fill in self._fills():
            draw.polygon(points, fill=fill)

    def _line(self, points, colour, width):
        self.photo.line(points, fill=colour, width=width, joint='curve')
        for draw, fill in self._fills():
            draw.line(points, fill=fill, width=width, joint='curve')

    def _radius(self, fractions):
        return self.rng.uniform(*fractions) * self.g.radius

    def microaneurysm(self):
        colour = self._colour((0.40, 0.08, 0.15), (0.5, 0.15, 0.3))
        self._disc(*self._point(), self._radius(MICROANEURYSM_RADIUS), colour)

    def haemorrhage(self):
        """A blot: one to three overlapping, rotated ellipses, some of them elongated."""
        x, y = self._point()
        colour = self._colour((0.42, 0.1, 0.15), (0.55, 0.2, 0.3))
        radius = self._radius(HAEMORRHAGE_RADIUS)
        for _ in range(self.rng.integers(1, 4)):
            offset_x, offset_y = self.rng.normal(0, 0.35 * radius, 2)
            self._polygon(_ellipse_points(x + offset_x, y + offset_y, radius * self.rng.uniform(0.6, 1.0),
                                          radius * self.rng.uniform(0.35, 0.8), self.rng.uniform(0, math.pi)),
                          colour)

    def exudate_cluster(self):
        """Hard exudates: bright yellow spots, a few together."""
        x, y = self._point(0.75)
        colour = (int(self.rng.uniform(240, 255)), int(self.rng.uniform(215, 240)), int(self.rng.uniform(90, 140)))
        spread = 0.08 * self.g.radius
        for _ in range(self.rng.integers(2, 7)):
            offset_x, offset_y = self.rng.normal(0, spread, 2)
            self._disc(x + offset_x, y + offset_y, self._radius(EXUDATE_RADIUS), colour)

    def cotton_wool_spot(self):
        x, y = self._point(0.7)
        colour = (int(self.rng.uniform(225, 245)), int(self.rng.uniform(200, 220)), int(self.rng.uniform(170, 195)))
        radius = self._radius(COTTON_WOOL_RADIUS)
        self._polygon(_ellipse_points(x, y, radius, radius * self.rng.uniform(0.5, 0.8),
                                      self.rng.uniform(0, math.pi), wobble=0.2, rng=self.rng), colour)

    def neovascular_tangle(self):
        """New vessels: thin, tortuous loops crowded into a small patch, often on or near the optic disc."""
        g = self.g
        if self.rng.random() < 0.6:
            angle = self.rng.uniform(0, 2 * math.pi)
            distance = self.rng.uniform(0.0, 0.2) * g.radius
            centre_x, centre_y = g.disc_x + distance * math.cos(angle), g.disc_y + distance * math.sin(angle)
        else:
            centre_x, centre_y = self._point(0.7)
        extent = self.rng.uniform(0.09, 0.14) * g.radius
        colour = self._colour((0.45, 0.12, 0.2), (0.6, 0.2, 0.3))
        width = max(1, round(0.012 * g.radius))
        step = 0.025 * g.radius
        for _ in range(self.rng.integers(5, 9)):
            x = centre_x + self.rng.normal(0, extent / 3)
            y = centre_y + self.rng.normal(0, extent / 3)
            heading = self.rng.uniform(0, 2 * math.pi)
            points = [(x, y)]
            for _ in range(self.rng.integers(12, 22)):
                if math.hypot(x - centre_x, y - centre_y) > extent:
                    # Turn back inside the patch, which is what makes it a tangle rather than a vessel.
                    heading = math.atan2(centre_y - y, centre_x - x) + self.rng.normal(0, 0.5)
                heading += self.rng.normal(0, 0.9)
                x += step * math.cos(heading)
                y += step * math.sin(heading)
                points.append((x, y))
            self._line(points, colour, width)

    def preretinal_haemorrhage(self):
        """A large boat-shaped bleed: blood settles, so its top edge is flat."""
        g = self.g
        radius = self._radius(PRERETINAL_RADIUS)
        angle = self.rng.uniform(0, 2 * math.pi)
        distance = self.rng.uniform(0.2, 0.55) * g.radius
        x, y = g.cx + distance * math.cos(angle), g.cy + distance * math.sin(angle)
        fluid_level = y - radius * self.rng.uniform(0.1, 0.4)
        points = [(px, max(py, fluid_level)) for px, py in _ellipse_points(x, y, radius, radius * 0.85, 0.0)]
        self._polygon(points, self._colour((0.38, 0.06, 0.1), (0.48, 0.12, 0.2)))


def _ellipse_points(x, y, semi_major, semi_minor, angle, n_points=24, wobble=0.0, rng=None):
    """Corners of a polygon approximating a rotated ellipse; `wobble` roughens its outline."""
    t = np.linspace(0, 2 * np.pi, n_points, endpoint=False)
    scale = 1 + wobble * rng.uniform(-1, 1, n_points) if wobble else 1
    px = semi_major * np.cos(t) * scale
    py = semi_minor * np.sin(t) * scale
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    return list(zip((x + px * cos_a - py * sin_a).tolist(), (y + px * sin_a + py * cos_a).tolist()))


def _draw_lesions(level, image, mask, g, rng, base_colour, kind_masks=None):
    painter = _LesionPainter(image, mask, g, rng, base_colour, kind_masks)
    for lesion, (fewest, most) in LESION_COUNTS[level].items():
        for _ in range(rng.integers(fewest, most + 1)):
            painter.paint(lesion)
    if level == 4 and rng.random() < PRERETINAL_HAEMORRHAGE_PROBABILITY:
        painter.paint('preretinal_haemorrhage')


def make_fundus(level, rng, width=576, height=384, eye='left', by_kind=False):
    """One synthetic photograph of diabetic-retinopathy `level` (0-4) and its lesion mask.

    Returns (RGB image, mode-L mask with 255 where a lesion is, 0 elsewhere),
    both `width` x `height`.  `eye` ('left' or 'right') puts the optic disc on
    the matching side.  `by_kind` adds a third item, {kind: mask} for each of
    KINDS (the same photograph and mask: it draws no random numbers).
    """
    if level not in LEVELS:
        raise ValueError(f'level must be one of {LEVELS}, got {level!r}')
    if eye not in EYES:
        raise ValueError(f'eye must be one of {EYES}, got {eye!r}')
    g = _eye_geometry(rng, width, height, eye)
    red = rng.uniform(150, 200)
    # Green tied to red keeps the retina orange-red; independent draws give olive-brown eyes.
    base_colour = np.array([red, np.clip(red * rng.uniform(0.36, 0.52), 60, 100), rng.uniform(20, 50)])

    albedo = _retina_albedo(g, rng, base_colour)
    image = Image.fromarray(np.clip(albedo, 0, 255).astype(np.uint8), 'RGB')
    _draw_vessel_tree(ImageDraw.Draw(image), rng, g, base_colour)
    mask = Image.new('L', (width, height), 0)
    kind_masks = {kind: Image.new('L', (width, height), 0) for kind in KINDS} if by_kind else None
    _draw_lesions(level, image, mask, g, rng, base_colour, kind_masks)

    # Optics and sensor: slightly soft, slightly grainy, lit unevenly.
    image = image.filter(ImageFilter.GaussianBlur(0.004 * g.radius))
    illumination = _illumination(g, rng)
    photo = np.asarray(image, dtype=np.float32) * illumination[..., None]
    photo += rng.standard_normal(photo.shape, dtype=np.float32) * (2.0 * (illumination[..., None] > 0))
    photo = Image.fromarray(np.clip(photo + 0.5, 0, 255).astype(np.uint8), 'RGB')

    inside_eye = illumination > 0

    def in_eye(lesions):
        return Image.fromarray(np.where(inside_eye & (np.asarray(lesions) > 0), 255, 0).astype(np.uint8), 'L')
    if by_kind:
        return photo, in_eye(mask), {kind: in_eye(m) for kind, m in kind_masks.items()}
    return photo, in_eye(mask)


# --------------------------------------------------------------------------
# Writing a data set


def _check_arguments(n_patients, seed, width, height, one_eye_fraction, test_fraction):
    if n_patients < 1:
        raise UserError(f'n_patients must be at least 1, got {n_patients}')
    if seed < 0:
        raise UserError(f'seed must be 0 or more, got {seed}')
    if width < 64 or height < 64:
        raise UserError(f'width and height must be at least 64 pixels, got {width}x{height}')
    for name, value in (('one_eye_fraction', one_eye_fraction), ('test_fraction', test_fraction)):
        if not 0 <= value < 1:
            raise UserError(f'{name} must be in [0, 1), got {value}')


def _existing_images(folder):
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith('.')]


def _refuse_foreign_photos(out_dir):
    """Never overwrite real photographs: only a folder this generator made, or one without images, is used."""
    if (out_dir / MARKER_FILE).exists():
        return
    if _existing_images(out_dir / 'train') or _existing_images(out_dir / 'test'):
        raise UserError(f'{out_dir} already holds photographs that this generator did not make '
                        f'(no {MARKER_FILE}); choose another folder, e.g. data/synthetic')


def _remove_stale_images(out_dir, specs, masks_by_kind):
    """Delete images of an earlier, larger run, which would otherwise have no label, and masks by
    kind that this run did not write (an earlier run's may belong to other photographs)."""
    wanted = {(spec.split, spec.name) for spec in specs} | {('masks', spec.name) for spec in specs}
    wanted |= {(f'masks_by_kind/{kind}', spec.name) for spec in specs for kind in KINDS
               if masks_by_kind}
    for folder in ('train', 'test', 'masks') + tuple(f'masks_by_kind/{kind}' for kind in KINDS):
        for path in _existing_images(out_dir / folder):
            if (folder, path.stem) not in wanted:
                path.unlink()


def _labels_csv(specs):
    return 'image,level\n' + ''.join(f'{spec.name},{spec.level}\n' for spec in specs)


def generate(out_dir, n_patients=60, seed=0, width=576, height=384, one_eye_fraction=0.15,
             test_fraction=0.25, progress=True, masks_by_kind=False):
    """Write a synthetic data set to `out_dir`; same arguments, same bytes.  `masks_by_kind`
    also writes masks_by_kind/{red,exudate,other_bright}/ (the photographs are the same).

    Returns a summary: {'out_dir', 'patients', 'images', 'levels': {level: n},
    'splits': {'train': {level: n}, 'test': {level: n}}}.
    """
    _check_arguments(n_patients, seed, width, height, one_eye_fraction, test_fraction)
    out_dir = Path(out_dir)
    _refuse_foreign_photos(out_dir)
    specs = plan_images(n_patients, seed, one_eye_fraction, test_fraction)

    for spec in tqdm(specs, desc='synthetic fundus', unit='img', disable=not progress):
        photo, mask, *kinds = make_fundus(spec.level, image_rng(seed, spec.patient, spec.eye), width,
                                          height, spec.eye, by_kind=masks_by_kind)
        save_image(out_dir / spec.split / f'{spec.name}.jpeg', photo, quality=JPEG_QUALITY)
        save_image(out_dir / 'masks' / f'{spec.name}.png', mask)
        for kind, kind_mask in (kinds[0].items() if kinds else ()):
            save_image(out_dir / 'masks_by_kind' / kind / f'{spec.name}.png', kind_mask)
    _remove_stale_images(out_dir, specs, masks_by_kind)

    for split in ('train', 'test'):
        write_text(out_dir / f'{split}Labels.csv', _labels_csv([s for s in specs if s.split == split]))
    write_text(out_dir / MARKER_FILE,
               'Synthetic fundus photographs, made by\n'
               f'  python -m retina.synthetic --out {out_dir} --n_patients {n_patients} --seed {seed} '
               f'--width {width} --height {height} --one_eye_fraction {one_eye_fraction} '
               f'--test_fraction {test_fraction}' + (' --masks_by_kind' if masks_by_kind else '') + '\n'
               'Run that again instead of editing; masks/ holds where the lesions are.\n')

    def level_counts(subset):
        return {level: sum(s.level == level for s in subset) for level in LEVELS}
    return {
        'out_dir': str(out_dir),
        'patients': n_patients,
        'images': len(specs),
        'levels': level_counts(specs),
        'splits': {split: level_counts([s for s in specs if s.split == split]) for split in ('train', 'test')},
    }


@click.command(context_settings=CONTEXT_SETTINGS)
@output_folder_option('--out', 'out_dir', 'train/, test/, masks/ and the label files, e.g. '
                      'data/synthetic.', required=True)
@click.option('--n_patients', default=60, show_default=True, type=click.IntRange(min=1),
              help='Number of patients; most have two eyes.')
@seed_option('the same arguments give byte-identical files.')
@click.option('--width', default=576, show_default=True, type=click.IntRange(min=64), help='Photo width in pixels.')
@click.option('--height', default=384, show_default=True, type=click.IntRange(min=64), help='Photo height in pixels.')
@click.option('--one_eye_fraction', default=0.15, show_default=True,
              type=click.FloatRange(0, 1, max_open=True), help='Fraction of patients with one eye photographed.')
@click.option('--test_fraction', default=0.25, show_default=True,
              type=click.FloatRange(0, 1, max_open=True), help='Fraction of patients put in test/.')
@click.option('--masks_by_kind', is_flag=True,
              help='Also write masks_by_kind/{red,exudate,other_bright}/: the lesion masks split by '
                   'kind like HEI-MED\'s (red: microaneurysms, haemorrhages, new vessels; exudate: '
                   'hard exudates; other_bright: cotton-wool spots), for ram.py --masks.')
@handle_errors()
def main(out_dir, n_patients, seed, width, height, one_eye_fraction, test_fraction, masks_by_kind):
    """Generate synthetic fundus photographs with lesion masks, laid out like the Kaggle data."""
    summary = generate(out_dir, n_patients, seed, width, height, one_eye_fraction, test_fraction,
                       masks_by_kind=masks_by_kind)
    per_level = ', '.join(f'level {level}: {n}' for level, n in summary['levels'].items())
    splits = summary['splits']
    click.echo(f"{summary['images']} photos of {summary['patients']} patients ({per_level}); "
               f"{sum(splits['train'].values())} in {Path(out_dir) / 'train'}, "
               f"{sum(splits['test'].values())} in {Path(out_dir) / 'test'}, "
               f"masks in {Path(out_dir) / 'masks'}")
