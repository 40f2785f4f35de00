"""Drawing heat maps: one renderer for ram.py and predict.py, inside the eye only, on one scale.

`render` draws every picture a user sees of one photograph: the photograph (predict.py: at
its own resolution, shrunk only beyond MAX_PHOTO_WIDTH; ram.py: the network's window
enlarged to PICTURE_SIZE), the map coloured over it, a caption above (the photograph, its
score and level or why it is ungradable, the gradable verdict, the net and the method) and
a colour bar with its legend beside it.

The rule of the colours (`methods.in_score_units`, `methods.colour_levels`): the map in
score units per pixel, its positive part over [0, SCALE_TOP] = [0, 4], the same scale for
every photograph of every run, so that a level-0 photograph shows little colour and a weak
map looks weak beside a strong one (ram.py --per_image_scale scales each picture to its own
peak instead, and says so on its bar).  The opacity grows with the level, so the eye shows
through where the map says little.  Nothing is coloured outside the eye: the eye's disc is
found on the picture's photograph itself (`fundus_mask`), the black surround of a fundus
photograph is no tissue.  Each PNG carries the scale, its unit and where the photograph
lies in the picture as text chunks (retina.scale, retina.legend, retina.caption,
retina.photo_box).
`by_level_figure` is ram.py's summary of one example per level, on the same scale.
"""
import dataclasses

import numpy as np
from scipy import ndimage

from retina.core import atomic
from retina.core.metrics import LEVELS, to_levels
from retina.data import preprocess

SEQUENTIAL_CMAP = 'jet'
SIGNED_CMAP = 'RdBu_r'
OPACITY = 0.6            # of the map where it reaches the top of the scale
PICTURE_SIZE = 1024      # ram.py: the network's window enlarged to this side
MAX_PHOTO_WIDTH = 1536   # predict.py: a wider photograph is shrunk to this width


def fundus_mask(window):
    """Boolean (h, w): the eye's disc in the uint8 (h, w, 3) `window`, holes filled.

    The eye as convert.py's preprocessing finds it (`preprocess.fundus_mask`:
    the blurred brightest channel above a low threshold, holes filled, so
    dark lesions stay in), reduced to its largest connected part so that
    specks of noise in the surround are not coloured.  An image with no
    bright part is all fundus.
    """
    eye = preprocess.fundus_mask(np.asarray(window))
    labels, count = ndimage.label(eye)
    if count == 0:
        return np.ones(eye.shape, dtype=bool)
    return labels == 1 + int(np.argmax(ndimage.sum(eye, labels, range(1, count + 1))))


@dataclasses.dataclass
class Example:
    """One image with its map, as drawn."""
    name: str
    window: np.ndarray       # (h, w, 3) uint8: what the network saw
    heat: np.ndarray         # (h, w) upsampled map
    prediction: float
    map_mean: float          # mean of the map at conv resolution
    label: int = None
    inside: np.ndarray = None   # (h, w) bool: the fundus

    @property
    def level(self):
        return int(to_levels([self.prediction])[0])


def shown(example, signed):
    """The map as coloured: its positive part unless `signed`, and nothing (nan) outside the fundus."""
    heat = example.heat if signed else np.clip(example.heat, 0, None)
    inside = example.inside if example.inside is not None else fundus_mask(example.window)
    return np.where(inside, heat, np.nan)


def _figure(width_in, height_in):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _overlay(axes, example, cmap, norm, alpha, signed):
    from matplotlib import colormaps
    colours = colormaps[cmap].with_extremes(bad=(0, 0, 0, 0))   # outside the fundus: the photograph only
    axes.imshow(example.window, interpolation='bilinear')
    image = axes.imshow(np.ma.masked_invalid(shown(example, signed)), cmap=colours, norm=norm,
                        alpha=alpha, interpolation='bilinear')
    axes.set_axis_off()
    return image


def _opaque(image):
    """The colour scale of an overlay, drawn at full opacity so its colours can be read."""
    from matplotlib.cm import ScalarMappable
    return ScalarMappable(norm=image.norm, cmap=image.cmap)


def save(figure, path):
    with atomic.atomic_path(path) as tmp:
        figure.savefig(tmp, format='png')


def legend(method, fused=False, per_image=False, signed=False):
    """The colour bar's legend: what a colour means, in the units of `methods.in_score_units`."""
    from retina.heatmaps.methods import SCALE_TOP
    what = ('sum of two nets\' min-max normalised maps' if fused else
            'RAM' if method == 'ram' else {'gradcam': 'Grad-CAM', 'layercam': 'LayerCAM'}[method])
    unit = ('score units per pixel: the map\'s mean is the score less the bias' if method == 'ram'
            and not fused else 'the score spread over the eye as the map spreads it')
    scale = ('each picture on its own peak (--per_image_scale)' if per_image else
             f'{SCALE_TOP:g} everywhere would make a level-{SCALE_TOP:g} score; one scale for '
             f'every photograph')
    return f'{what}, {unit}; {scale}' + ('; blue: against the grade' if signed else '')


def caption(name, score, level=None, gradable=None, reasons='', net='', label=None,
            score_name='score'):
    """The lines written above a picture: the photograph and its grade, the gradable verdict,
    the net.  `gradable` is 'yes', 'no' or None (not checked); `level` None: no level given."""
    grade = f'level {level}' if level is not None and level != '' else 'no level'
    first = f'{name}: {grade} ({score_name} {score:.2f})' + (f', label {label}' if label is not None else '')
    verdict = {'yes': 'gradable: yes', 'no': f'gradable: NO ({reasons})'}.get(
        gradable, 'gradable: not checked (a converted image; predict.py checks photographs)')
    return [first, verdict, net]


def _font(size):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def render(photo, heat, lines, legend_text, cmap=None, alpha=OPACITY, signed=False, top=None,
           outline=None):
    """The picture (PIL RGB) of one photograph: `photo` (H, W, 3) uint8 with `heat` (H, W,
    score units, NaN where there is no map) coloured inside the eye on the scale [0, top]
    ([-top, top] when `signed`; default methods.SCALE_TOP), `lines` above it, a colour bar
    with `legend_text` on its right, and the net's window `outline` (left, top, right, bottom
    in photo pixels) if given.  The photograph keeps its size; where it lies in the picture
    is `photo_box`."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    from retina.heatmaps import methods
    photo = np.asarray(photo, dtype=np.uint8)[..., :3]
    height, width = photo.shape[:2]
    top = methods.SCALE_TOP if top is None else top
    cmap = colormaps[cmap or (SIGNED_CMAP if signed else SEQUENTIAL_CMAP)]
    heat = np.where(fundus_mask(photo), np.asarray(heat, dtype=np.float64), np.nan)
    levels = np.nan_to_num(methods.colour_levels(heat, top, signed), nan=0.0)
    colour = cmap((levels + 1) / 2 if signed else levels)[..., :3] * 255
    opacity = (alpha * np.abs(levels))[..., None]
    coloured = photo * (1 - opacity) + colour * opacity

    size = max(12, round(width / 64))
    font, small = _font(size), _font(max(10, round(size * 0.8)))
    header = round(size * (1.5 * len(lines) + 1))
    panel = size * 12
    picture = Image.new('RGB', (width + panel, height + header), (0, 0, 0))
    picture.paste(Image.fromarray(np.clip(coloured, 0, 255).astype(np.uint8)), (0, header))
    draw = ImageDraw.Draw(picture)
    for row, line in enumerate(lines):
        draw.text((size // 2, size // 2 + round(row * 1.5 * size)), line, fill=(255, 255, 255),
                  font=font)
    if outline is not None:
        left, upper, right, lower = outline
        draw.rectangle((left, upper + header, right - 1, lower - 1 + header), outline=(255, 255, 255),
                       width=max(1, width // 600))
    # The colour bar, at full opacity so its colours can be read, ticks at five values.
    bar_left, bar_top = width + size, header + 2 * size
    bar_height, bar_width = max(4 * size, round(height * 0.55)), round(size * 1.5)
    ramp = np.linspace(1, -1 if signed else 0, bar_height)
    strip = cmap((ramp + 1) / 2 if signed else ramp)[:, None, :3] * 255
    picture.paste(Image.fromarray(np.repeat(strip, bar_width, axis=1).astype(np.uint8)),
                  (bar_left, bar_top))
    draw.text((bar_left, header + size // 2), 'score units', fill=(255, 255, 255), font=small)
    for value in np.linspace(-top if signed else 0, top, 5):
        y = bar_top + round((top - value) / (2 * top if signed else top) * (bar_height - 1))
        draw.line((bar_left + bar_width, y, bar_left + bar_width + size // 3, y), fill=(255, 255, 255))
        draw.text((bar_left + bar_width + size // 2, y - size // 2), f'{value:.3g}',
                  fill=(255, 255, 255), font=small)
    import textwrap
    wrapped = textwrap.wrap(legend_text, width=max(12, round(panel / (0.5 * size)) - 2))
    for row, line in enumerate(wrapped):
        draw.text((width + size // 2, bar_top + bar_height + size + round(row * 1.2 * size)), line,
                  fill=(220, 220, 220), font=small)
    picture.info.update({'retina.scale': f'{-top if signed else 0:g}..{top:g}',
                         'retina.legend': legend_text, 'retina.caption': '\n'.join(lines),
                         'retina.photo_box': f'0,{header},{width},{header + height}'})
    return picture


def photo_box(picture):
    """(left, top, right, bottom) of the photograph inside a picture `render` made (or read back
    from its PNG)."""
    return tuple(int(v) for v in picture.info['retina.photo_box'].split(','))


def save_picture(path, picture):
    """Write a `render` picture as PNG with its scale, legend and photo box as text chunks."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for key, value in picture.info.items():
        if key.startswith('retina.'):
            info.add_text(key, value)
    atomic.save_image(path, picture, pnginfo=info)


def enlarged(window, grid_map, size=PICTURE_SIZE):
    """(photo, heat) of ram.py's picture: the network's window (h, w, 3) enlarged to `size` px
    on its longer side (never shrunk), and the map (h', w', score units) upsampled to it."""
    import torch
    from PIL import Image

    from retina.heatmaps import methods
    height, width = window.shape[:2]
    scale = max(1.0, size / max(height, width))
    shape = (round(height * scale), round(width * scale))
    photo = np.asarray(Image.fromarray(window).resize(shape[::-1], Image.Resampling.LANCZOS))
    heat = methods.upsample(torch.as_tensor(grid_map).float()[None], shape)[0]
    return photo, heat.numpy()


def net_name(config_name, weights=None):
    """How a picture names its net: 'eyepacs-256 (c_256_5x5_32_ram)' for a released model's
    file, else the config's name."""
    from pathlib import Path

    from retina.core.errors import UserError
    from retina.model import released
    if weights is None:
        return config_name
    try:
        entries = released.index()['models']
    except UserError:
        entries = {}
    for name, entry in entries.items():
        if Path(weights).resolve() == (released.default_folder() / entry['file']).resolve():
            return f'{name} ({config_name})'
    return config_name


def by_level_figure(examples, title, cmap, alpha, signed, norm, by_label):
    """One column per level 0..4: the image above, its map below, on one colour scale.

    `examples` maps each level to an `Example` or None (drawn as empty
    panels); the level is the true label when `by_label`, else the predicted one.
    """
    figure = _figure(11.5, 5.2)
    source = 'label' if by_label else 'predicted level'
    image = None
    for column, level in enumerate(LEVELS):
        left = 0.02 + column * 0.178
        top_axes = figure.add_axes([left, 0.47, 0.17, 0.37])
        bottom_axes = figure.add_axes([left, 0.07, 0.17, 0.37])
        example = examples.get(level)
        if example is None:
            for axes in (top_axes, bottom_axes):
                axes.set_xticks([])
                axes.set_yticks([])
                axes.text(0.5, 0.5, 'none', ha='center', va='center', color='grey',
                          transform=axes.transAxes)
            top_axes.set_title(f'level {level}\n(no image of this {source})\n', fontsize=8)
            continue
        top_axes.imshow(example.window, interpolation='bilinear')
        top_axes.set_axis_off()
        label = f', label {example.label}' if example.label is not None else ''
        top_axes.set_title(f'level {level}\n{example.name}\npredicted {example.prediction:.2f}{label}',
                           fontsize=8)
        image = _overlay(bottom_axes, example, cmap, norm, alpha, signed)
    figure.suptitle(f'{title}: heat maps by {source} '
                    f'({"signed" if signed else "positive part"}, one colour scale)', fontsize=11)
    if image is not None:
        bar = figure.colorbar(_opaque(image), cax=figure.add_axes([0.925, 0.07, 0.015, 0.37]))
        bar.ax.tick_params(labelsize=8)
    return figure
