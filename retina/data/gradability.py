"""Can this photograph be graded?  The checks predict.py runs on every photograph.

Screening graders answer "ungradable" for 10-20% of photographs (blur, poor exposure, a small
pupil, eyelashes); a net grades anything, a black frame included.  Each photograph gets a
verdict, `gradable` yes or no, and the reasons:

- `too small`: the eye is less than half the converted size across (blown up more than 2×);
- `no eye found`: the converted square is not a bright disc on a dark surround: the eye
  covers too little or all of it, or the corners outside the inscribed circle are bright (a
  surround that is a dim, even margin rather than black counts as dark: `eye_mask`);
- `too dark`, `overexposed` (too bright, or many saturated pixels), `low contrast`: the
  brightness inside the eye, its saturated share and its spread;
- `out of focus`: the fine detail of the green channel inside the eye (the eye's edge left
  out) against its coarser detail, on the eye at DETAIL_SIZE pixels: blur takes the fine away
  first (measured at 512 px, not 128, so that a blur that wipes out the small vessels of a
  large photograph is seen);
- `heavily compressed`: a JPEG saved at a quality below what the net's view of it tolerates
  (`jpeg_quality`, from the file's own quantisation tables: the lower the quality and the
  fewer photograph pixels per pixel the net sees, the more its blocks and ringing reach the
  net), or, for any file, 8×8 blocks in the decoded pixels (`blockiness`: a JPEG re-saved as
  PNG or at a high quality keeps its blocks);
- `grayscale`: no colour in the eye.  The nets were trained on colour photographs and tell
  red lesions from pigment and exudates from reflections by colour; a grayscale copy moved a
  level-0 eye to level 1 (BENCHMARKS.md, "Gradability");
- `not a photograph`: large patches of exactly one colour inside the "eye" (drawings, icons,
  screenshots, text pasted on the photograph): a camera's noise never leaves them;
- `part of the eye`: the eye in the square is far from symmetric (a quarter of the eye, a
  crop that cuts the fundus): its mask overlaps its mirror images little, or one side of the
  square is far more eye than the opposite side (the straight edge of a cut) and the eye is
  widest at that cut (a camera's frame that cuts a cap off a whole field leaves the field's
  widest row inside the square: that is graded); the grade would be of the part shown;
- `unlike the training photos`: the Mahalanobis distance of the net's pooled features (its
  centred window) from those of its training photographs of the nearest level, beyond 2.0
  times the 99th percentile of its validation photographs' distances
  (`retina.model.feature_stats.FeatureStats`, stored in the checkpoint).  The distance is to the nearest level's mean, so that a severe eye is
  measured against the severe eyes the net trained on, not taken for a bad photograph;
- `unstable under re-encoding` (only with predict.py --check_stability): the photograph
  re-saved as a JPEG of quality 75 (what a viewer or mail client does) moves its level by more
  than one (predict.py: `unstable`).  Off by default: the released nets are that fragile for
  13-16% of good raw photographs.

The image measures are taken on the photograph cropped and resized to ANALYSIS_SIZE pixels
as convert.py crops it, before any --enhance (the focus at DETAIL_SIZE).  The thresholds were set on the real photographs
of ../shared/data (eyepacs_raw, eyepacs_raw1024, heimed: at most 2% of them called
ungradable) and on strongly degraded copies of them (most of which must be):
bench/bench_gradability.py measures both and writes the table to BENCHMARKS.md.
"""

import numpy as np

ANALYSIS_SIZE = 128
SURROUND = 15            # a pixel whose brightest channel is at most this is surround, not eye
                         # (SURROUND above the corners' own level where they are not black:
                         # `eye_mask`)
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
MIN_DETAIL_FOCUS = 0.45  # the same measure on the eye at DETAIL_SIZE (real photographs of five
                         # sources: 2nd percentile 0.53-0.62; a 8-px blur of a 1536-px photograph:
                         # 0.30-0.50)
MIN_COARSE_FOCUS = 0.41  # the 128-px measure, judged beside the detail's: a strong blur leaves
                         # the detail band to the 8-bit quantisation, whose steps pass it (a
                         # blur of 4% of the width: detail 0.84-1.9, caught by it for 3% of the
                         # photographs) but not the 128-px one (≤ 0.31 for 99%); real
                         # photographs ≥ 0.417 at the 0.1st percentile (ODIR-5K the lowest)
DETAIL_SIZE = 512
MIN_CHROMA = 0.05        # mean (max − min channel) / mean brightness inside the eye; real
                         # photographs ≥ 0.07 (eyepacs256's publisher-enhanced grey-white ones
                         # included), grayscale 0
MIN_CHROMA_ENHANCED = 0.002  # the same on a photograph that arrived with a look already
                         # (--enhance local_contrast brings the channels to one mean: real ones
                         # ≥ 0.004, 1st percentile 0.014; grayscale ones exactly 0)
MAX_FLAT = 0.08          # share of the eye's pixels whose 3×3 neighbourhood is one exact grey
                         # level (saturated ones aside): real ≤ 0.03, icons and drawings 0.3-0.9
MIN_SYMMETRY = 0.6       # overlap of the eye's mask with its mirror images; real photographs
                         # ≥ 0.5-0.7 at the 0.3rd percentile, a quarter of the eye 0.2-0.8
MAX_EDGE_ASYMMETRY = 0.45  # how much more of one side of the square than of the opposite side
                         # is eye, each side read as the more eye of its outer EDGE_BAND rows (a
                         # cut through the fundus leaves one side all eye; the box's last row is
                         # often the dim fringe of an eye whose field is cut there too, so one
                         # row alone called 15 of 1,051 real photographs over 0.55).  Real
                         # photographs (eyepacs_raw, eyepacs_raw1024, HEI-MED, at 256 px): 99.5th
                         # percentile 0.35, 2 of 1,051 above 0.45; quarters of them: 26 of
                         # 2,102 at or under 0.45 (one row at 0.6: 1 and 71)
EDGE_BAND = 2
MIN_WIDEST_INSIDE = 0.1  # a cut edge is the frame's, not a cut through the fundus, when the eye
                         # is widest this far inside the square from that side (a fraction of
                         # the side) and at least WIDER times wider there: a frame that cuts
                         # off a cap of the field leaves its diameter inside, a cut at or past
                         # the centre (a half, a quarter) leaves the widest row at the cut.
                         # Halves and quarters of the 1,051 real photographs: the widest row
                         # within 0.10 of the cut side, every one; whole eyepacs256 fields cut
                         # at the top: 18 of the 24 the cut edge refused (of 2,666) lie beyond
                         # it (0.12-0.63)
WIDER = 1 / 0.97         # the widest row's eye against the cut side's: 3% more
# JPEG quality below which a photograph is heavily compressed, by how many photograph pixels
# the net's crop gets per pixel (the blocks are 8 photograph pixels: at 4 or more per net pixel
# they are averaged away).  Set on test-split photographs re-saved at each quality
# (bench/bench_compression.py): where the grade moves, the photograph is refused.
# eyepacs256 photographs (1 pixel per net pixel) re-saved at 20 and eyepacs_raw ones (about 5.5)
# at 10 moved the released eyepacs-256's level by more than one for 20% and 75% of them; every
# real photograph of the five sources is a JPEG of quality 75 or more.
MIN_QUALITY = ((1.5, 30), (6.0, 20), (float('inf'), 15))
MAX_BLOCKINESS = 2.6     # gradient across 8×8 block edges / within blocks, at full resolution
                         # (real photographs: 0.9-2.4, raw1024's q75 JPEGs the highest)

REASONS = ('too small', 'no eye found', 'too dark', 'overexposed', 'low contrast',
           'out of focus', 'heavily compressed', 'grayscale', 'not a photograph',
           'part of the eye', 'unlike the training photos', 'unstable under re-encoding')


def _resized(rgb, size=ANALYSIS_SIZE):
    from PIL import Image
    if rgb.shape[0] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR,
                                                  reducing_gap=3.0))


def _outside(size):
    """The corners of a size × size square outside the circle the eye of a whole field fills."""
    y, x = np.mgrid[:size, :size] + 0.5
    return np.hypot(x - size / 2, y - size / 2) > 0.52 * size


def eye_mask(rgb):
    """Which pixels of a converted photograph (S × S × 3 uint8) are eye: brighter, in their
    brightest channel, than SURROUND above the corners' median, where the corners are not
    black (a dim, even margin: eyepacs256's photographs arrived with one, 30-40 of 255, that
    the fixed threshold took for eye: 11 of its 828 test-split photographs were called 'no
    eye found'), else than SURROUND (a camera's black surround)."""
    brightest = np.asarray(rgb).max(axis=2)
    return _eye(brightest, _outside(brightest.shape[0]))


def _eye(brightest, outside):
    """`eye_mask` of a photograph's brightest channel, given its corners `outside`."""
    corners = float(np.median(brightest[outside]))
    return brightest > (corners + SURROUND if corners > SURROUND else SURROUND)


def _focus(rgb, edge=EDGE, inner=None):
    """Fine detail (a band between Gaussian blurs of σ 1 and 2 pixels) against coarser detail
    (σ 2 to 4) of the green channel inside the eye, its edge left out (`inner`: that mask, when
    the caller has it)."""
    from scipy import ndimage
    if inner is None:
        inner = ndimage.binary_erosion(eye_mask(rgb), iterations=edge)
    if inner.sum() < 16:
        return 0.0
    green = rgb[..., 1].astype(np.float64)
    # Bands, not the Laplacian: the finest scale of a dim photograph is mostly 8-bit
    # quantisation, which a blurred photograph keeps; blur removes the first band before the
    # second, while a dim or flat photograph loses both alike.
    fine, middle, coarse = (ndimage.gaussian_filter(green, s) for s in (1.0, 2.0, 4.0))
    return float((fine - middle)[inner].std() / max((middle - coarse)[inner].std(), 1e-6))


def detail_size(eye_side):
    """The side the focus is judged at for an eye `eye_side` photograph pixels across:
    DETAIL_SIZE, or the photograph's own size when it is smaller (an upsampled eye has no fine
    detail to lose), but never under ANALYSIS_SIZE."""
    return int(max(ANALYSIS_SIZE, min(DETAIL_SIZE, round(eye_side))))


def detail_focus(rgb):
    """The focus measure on the eye at its detail size (S × S × 3 uint8, `detail_size`)."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    return _focus(rgb, max(EDGE, EDGE * rgb.shape[0] // ANALYSIS_SIZE))


def jpeg_quality(image):
    """The IJG quality (1..100) whose scaled standard luminance table is nearest the JPEG's
    own (a PIL image, opened), or None for a photograph that is not a JPEG."""
    tables = getattr(image, 'quantization', None)
    if not tables or 0 not in tables or len(tables[0]) != 64:
        return None
    global _IJG_TABLES
    if _IJG_TABLES is None:
        from retina.data.jpeg import quantisation_tables
        _IJG_TABLES = quantisation_tables(np.arange(1, 101))[:, 0].reshape(100, 64).numpy()
    own = np.asarray(tables[0], dtype=np.float64)
    return int(np.argmin(np.abs(_IJG_TABLES - own).sum(axis=1))) + 1


_IJG_TABLES = None


def blockiness(rgb, limit=1024):
    """Mean luminance step across the 8×8 block edges of the JPEG grid against the mean step
    elsewhere, inside the eye, on the decoded photograph (H × W × 3 uint8, at most `limit`
    pixels a side from its top-left corner, where the grid starts); about 1 for a photograph
    without blocks."""
    rgb = np.asarray(rgb)[:limit, :limit]
    if min(rgb.shape[:2]) < 16:
        return 1.0
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    eye = rgb.max(axis=2) > SURROUND
    ratios = []
    for axis in (0, 1):
        step = np.abs(np.diff(grey, axis=axis))
        inside = eye[1:] & eye[:-1] if axis == 0 else eye[:, 1:] & eye[:, :-1]
        at_edge = (np.arange(step.shape[axis]) % 8) == 7
        at_edge = at_edge[:, None] if axis == 0 else at_edge[None, :]
        edge, within = inside & at_edge, inside & ~at_edge
        if edge.sum() < 64 or within.sum() < 64:
            return 1.0
        ratios.append(step[edge].mean() / max(step[within].mean(), 1e-3))
    return float(np.mean(ratios))


def compression_limit(pixels_per_net_pixel):
    """The lowest JPEG quality a photograph with this many photograph pixels per net pixel
    may have (MIN_QUALITY)."""
    for most, quality in MIN_QUALITY:
        if pixels_per_net_pixel < most:
            return quality
    return MIN_QUALITY[-1][1]


def heavily_compressed(quality, blocks, pixels_per_net_pixel):
    """Whether a photograph of JPEG `quality` (None: not a JPEG) and `blockiness` `blocks`
    (None: not measured) is too compressed for a net that sees it at `pixels_per_net_pixel`."""
    if quality is not None and quality < compression_limit(pixels_per_net_pixel):
        return True
    return blocks is not None and blocks > MAX_BLOCKINESS and pixels_per_net_pixel < 6.0


def file_measures(path, image):
    """(JPEG quality or None, blockiness or None, the file's own (width, height)) of the
    photograph file `path` whose decode is the PIL `image`: the blockiness only where the
    decode is at the file's full resolution (a reduced JPEG decode averages the blocks away).
    The file's header is read once, for all three."""
    from PIL import Image
    try:
        with Image.open(path) as opened:
            quality, size = jpeg_quality(opened), opened.size
    except Exception:  # decoded once already: what the caller read is what counts
        return None, None, image.size
    full = sorted(image.size) == sorted(size)
    return quality, blockiness(np.asarray(image)) if full else None, size


def _side(mask):
    """The eye's share of the top side of `mask`: the largest of its outer EDGE_BAND rows."""
    return max(float(mask[i].mean()) for i in range(EDGE_BAND))


def _edge_asymmetry(eye):
    """How much more of one side of the square than of the opposite side is eye (the larger of
    left-right and top-bottom); a side's share is the largest of its outer EDGE_BAND rows."""
    return max(abs(_side(eye) - _side(eye[::-1])), abs(_side(eye.T) - _side(eye.T[::-1])))


def _widest_inside(eye):
    """From the side of the square with the most eye: how far inside (a fraction of the side)
    the eye is widest, or 0 when it is not at least WIDER times wider there than at that side."""
    views = (eye, eye[::-1], eye.T, eye.T[::-1])
    mask = max(views, key=_side)
    rows = mask.mean(axis=1)
    widest = int(np.argmax(rows))
    return widest / len(rows) if rows[widest] >= WIDER * _side(mask) else 0.0


def measures(rgb, detail=None):
    """The image measures of a converted photograph (S × S × 3 uint8, before --enhance):
    a dict of fill, corners, brightness, saturated, green_saturated, green, contrast, focus,
    chroma, flat, symmetry, edge_asymmetry, widest_inside, and detail_focus when `detail` (the
    eye at DETAIL_SIZE) is given."""
    from scipy import ndimage
    rgb = _resized(np.asarray(rgb, dtype=np.uint8))
    size = rgb.shape[0]
    brightest = rgb.max(axis=2)
    outside = _outside(size)
    eye = _eye(brightest, outside)
    luminance = (rgb @ np.array([0.299, 0.587, 0.114])) / 255
    inner = ndimage.binary_erosion(eye, iterations=EDGE)
    green = rgb[..., 1].astype(np.float64)
    count = eye.sum()
    out = dict(fill=float(eye.mean()), corners=float(brightest[outside].mean() / 255),
               symmetry=float(min((eye & eye[:, ::-1]).sum(), (eye & eye[::-1]).sum())
                              / max(min((eye | eye[:, ::-1]).sum(), (eye | eye[::-1]).sum()), 1)),
               edge_asymmetry=_edge_asymmetry(eye), widest_inside=_widest_inside(eye))
    if detail is not None:
        out['detail_focus'] = detail_focus(detail)
    if count < 16:
        return dict(out, brightness=0.0, saturated=0.0, green_saturated=0.0, green=0.0,
                    contrast=0.0, focus=0.0, chroma=0.0, flat=0.0)
    inside = luminance[eye]
    out.update(brightness=float(inside.mean()),
               saturated=float((rgb[eye] >= SATURATED).any(axis=1).mean()),
               # red is near saturation in many a good fundus photograph; green is not
               green_saturated=float((rgb[..., 1][eye] >= SATURATED).mean()),
               green=float(green[eye].mean() / 255),
               contrast=float(inside.std()))
    pixels = rgb[eye].astype(np.float64)
    out['chroma'] = float((pixels.max(axis=1) - pixels.min(axis=1)).mean()
                          / max(pixels.mean(), 1.0))
    # Exactly flat 3×3 patches: a camera's noise never leaves one (saturated pixels aside)
    grey = rgb.astype(np.int32).sum(axis=2)
    flat = (ndimage.maximum_filter(grey, 3) == ndimage.minimum_filter(grey, 3)) & \
        (brightest < SATURATED)
    out['flat'] = float(flat[inner].mean()) if inner.any() else 0.0
    out['focus'] = _focus(rgb, inner=inner) if inner.sum() >= 16 else 0.0
    return out


def reasons(found, eye_side, crop_size, quality=None, blocks=None, pixels_per_net_pixel=None,
            enhanced=False):
    """The reasons (of REASONS) that measures `found`, the eye's side in the decoded
    photograph (pixels), its JPEG `quality` and `blockiness` (None: not a JPEG / not measured)
    and the photograph's own pixels per converted pixel [default: eye_side / crop_size] give
    for calling it ungradable; [] when it is gradable.  Without `detail_focus` among the
    measures, the focus is judged on the 128-px measure (`MIN_FOCUS`); with it, on both
    (`MIN_DETAIL_FOCUS`, `MIN_COARSE_FOCUS`).  `enhanced`: the
    photograph arrived with a look already (its colours evened out: only none is grayscale)."""
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
    focused = (found['detail_focus'] >= MIN_DETAIL_FOCUS and found['focus'] >= MIN_COARSE_FOCUS
               if 'detail_focus' in found else found['focus'] >= MIN_FOCUS)
    if not no_eye and found['brightness'] >= MIN_BRIGHTNESS and not focused:
        out.append('out of focus')
    if heavily_compressed(quality, blocks, pixels_per_net_pixel or eye_side / crop_size):
        out.append('heavily compressed')
    if not no_eye and found.get('chroma', 1.0) < (MIN_CHROMA_ENHANCED if enhanced else MIN_CHROMA):
        out.append('grayscale')
    if found.get('flat', 0.0) > MAX_FLAT:
        out.append('not a photograph')
    cut = (found.get('edge_asymmetry', 0.0) > MAX_EDGE_ASYMMETRY
           and found.get('widest_inside', 0.0) < MIN_WIDEST_INSIDE)  # not the frame's cut
    if not no_eye and (found.get('symmetry', 1.0) < MIN_SYMMETRY or cut):
        out.append('part of the eye')
    return out
