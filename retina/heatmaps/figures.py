"""Drawing heat maps: inside the fundus only, on one colour scale per run, smoothly upsampled.

The map is coloured only on the eye's disc: the black surround of a fundus
photograph is no tissue, and a map coloured there draws the eye to nothing.
The disc is found on the image itself (`fundus_mask`).  By default every
image of a run shares one colour scale, so that a weak map looks weak
beside a strong one; `per_image=True` scales each image to its own peak.
"""
import dataclasses

import numpy as np
from scipy import ndimage

from retina import atomic, data, preprocess

LEVELS = data.LEVELS
SEQUENTIAL_CMAP = 'jet'
SIGNED_CMAP = 'RdBu_r'


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
        return int(data.to_levels([self.prediction])[0])


def colour_norm(maps, signed):
    """One matplotlib Normalize for all `maps`: [0, peak], or [-peak, peak] when `signed`."""
    from matplotlib.colors import Normalize

    from retina.heatmaps.methods import colour_peak
    peak = colour_peak(maps, signed)
    return Normalize(-peak, peak) if signed else Normalize(0.0, peak)


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


def heat_map_figure(example, title, cmap, alpha, signed, norm, unit):
    """One image: the map over the network's window, its colour bar, the prediction and label."""
    figure = _figure(4.4, 4.9)
    axes = figure.add_axes([0.03, 0.03, 0.75, 0.78])
    image = _overlay(axes, example, cmap, norm, alpha, signed)
    label = f'   label {example.label}' if example.label is not None else ''
    figure.text(0.03, 0.97, f'{example.name}   {title}', va='top', fontsize=9)
    figure.text(0.03, 0.91, f'predicted {example.prediction:.2f} -> level {example.level}{label}',
                va='top', fontsize=10, weight='bold')
    figure.text(0.03, 0.855, f'map mean {example.map_mean:.2f}'
                f'{"   (signed, 0 = white)" if signed else "   (positive part)"}', va='top', fontsize=9)
    bar = figure.colorbar(_opaque(image), cax=figure.add_axes([0.81, 0.05, 0.04, 0.74]))
    bar.ax.tick_params(labelsize=8)
    bar.set_label(unit, fontsize=8)
    return figure


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
