"""Regression activation maps (RAM; Wang & Yang 2017): where a RAM net's predicted level comes from.

A RAM net ends in a global average pool of its last conv layer and one
linear unit, so its prediction is b + sum_k w_k mean_xy A_k(x, y), with A_k
the k-th map of the last conv layer (after its untied bias and leaky ReLU).
The map

    RAM(x, y) = sum_k w_k A_k(x, y) + b

therefore has the prediction as its mean: it shows where the severity comes
from.  b is spread evenly (added to every position); `include_bias=False`
gives the evidence map sum_k w_k A_k alone, whose mean is prediction - b.

Geometry.  The network sees the centred h x w window of the S x S converted
image (112 of 128 for the 128-pixel nets) and the map has the last conv
layer's resolution (6 x 6 there).  The map is upsampled bilinearly
(align_corners=False: every map cell covers an equal share of the window)
to the window and drawn over that window; the margin outside it, which the
network never sees, is not shown.

Lesion masks (`--masks`) must line up with the converted images.  A mask is
accepted at the converted image's size (S x S, cropped like the image), as
any other square (resized), or at the original photograph's resolution
together with the photograph itself (`--photos`): the eye's box is found on
the photograph exactly as convert.py finds it and the same box is cut from
the mask.  Running convert.py on a mask folder does not work: it would look
for the eye in the mask, find none and fall back to the centred square.
A mask pixel at the converted size is a lesion when at least
MASK_COVERAGE of it is covered, so that microaneurysms survive shrinking.

Scores (over images of level >= 1: the labels' level if given, else the
predicted one).  All use the upsampled evidence map (no bias: b adds the
same value everywhere):

- ram_mass_in_lesions: per image, the share of the map's positive mass that
  lies in lesions, averaged over images with a lesion in the window;
- pointing_game: the share of those images whose map maximum lies within
  `tolerance` pixels (default half a map cell) of a lesion;
- deletion: the drop in prediction when the top 10% of the map's pixels are
  blanked, against blanking a random 10%: the top 10% of a random map of the
  same resolution, so blobs of the map's grain in random places.  Blanked
  pixels take the image's mean colour by default (`fill='mean'`): black
  blobs look like haemorrhages and raise the prediction; `fill='black'`
  (the photograph's surround) is kept for comparison.

The printed summary also gives the chance level of the two lesion scores
(the share of the window covered by lesions, and within the tolerance of
one), since both depend on how much of the eye is diseased.
"""
import contextlib
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from retina import atomic, crop, data, paths
from retina.augment import centre_crop, standardise
from retina.errors import UserError
from retina.features import rebuild
from retina.images import BadImage, image_name, list_images, load_rgb

LEVELS = data.LEVELS
SEQUENTIAL_CMAP = 'jet'
SIGNED_CMAP = 'RdBu_r'
MASK_COVERAGE = 0.25        # share of a converted pixel a lesion must cover to count
DELETION_FRACTION = 0.1
DELETION_SEED = 0
DELETION_FILLS = ('black', 'mean')
RAM_ADVICE = 'use a *_ram config (e.g. c_512_5x5_32_ram): its global-average-pool head makes the map exact'


# --- the map -----------------------------------------------------------------

class Captured:
    """What a forward hook saw: `activations` is the layer's latest output (detached)."""

    def __init__(self):
        self.activations = None


@contextlib.contextmanager
def capture_activations(net, layer_name):
    """Record the output of `net`'s layer `layer_name` at each forward; the hook is always removed."""
    try:
        module = net.get_submodule(layer_name)
    except AttributeError:
        raise ValueError(f'the network has no layer {layer_name!r}') from None
    captured = Captured()

    def hook(_module, _inputs, output):
        captured.activations = output.detach()

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def check_ram_net(net):
    """Refuse a network whose head does not make the regression activation map exact."""
    if not getattr(net, 'is_ram', False):
        raise UserError(f'this network has no global-average-pool head (a baseline net); {RAM_ADVICE}')
    names = [name for name, _ in net.named_children()]
    after = [name for name in names[names.index(net.last_conv) + 1:]
             if not isinstance(net.get_submodule(name), nn.Dropout)]
    if after != [net.feature_layer, 'output']:
        raise UserError(f'the layers after {net.last_conv} are {", ".join(after)}; a RAM needs exactly '
                        f'a global average pool and the linear output; {RAM_ADVICE}')


@torch.no_grad()
def regression_activation_map(net, x, include_bias=True):
    """(maps (N, h', w') at the last conv layer's resolution, predictions (N,)) for the batch `x`.

    `x` is the standardised network input.  With `include_bias` the output
    bias is added to every position, so each map's mean is its prediction.
    """
    check_ram_net(net)
    was_training = net.training
    net.eval()
    try:
        with capture_activations(net, net.last_conv) as captured:
            predictions = net(x).squeeze(1)
    finally:
        net.train(was_training)
    weight, bias = net.output.weight[0], net.output.bias[0]
    maps = torch.einsum('k,nkhw->nhw', weight.float(), captured.activations.float())
    if include_bias:
        maps = maps + bias
    return maps, predictions.float()


def upsample(maps, size):
    """(N, h', w') maps -> (N, *size), bilinear, every map cell covering an equal share."""
    return F.interpolate(maps[:, None], size=tuple(size), mode='bilinear', align_corners=False)[:, 0]


# --- scores --------------------------------------------------------------------

def default_tolerance(window_size, map_size):
    """Half a map cell in window pixels: the map cannot place a maximum more finely."""
    return max(1, int(round(0.5 * max(w / m for w, m in zip(window_size, map_size)))))


def lesion_mass_share(evidence, lesions):
    """Share of the positive part of `evidence` (h, w) inside the boolean `lesions`; nan if none positive."""
    positive = np.clip(np.asarray(evidence, dtype=np.float64), 0, None)
    total = positive.sum()
    return float(positive[lesions].sum() / total) if total > 0 else float('nan')


def near_lesions(lesions, tolerance):
    """Boolean map of the pixels within `tolerance` pixels of a lesion."""
    if not lesions.any():
        return np.zeros_like(lesions)
    return ndimage.distance_transform_edt(~lesions) <= tolerance


def points_at_lesion(evidence, lesions, tolerance):
    """Whether the maximum of `evidence` lies within `tolerance` pixels of a lesion."""
    y, x = np.unravel_index(int(np.argmax(evidence)), evidence.shape)
    return bool(near_lesions(lesions, tolerance)[y, x])


def blank(x, where, fill='mean'):
    """`x` (N, 3, h, w, standardised) with the pixels where `where` (N, h, w) is True blanked.

    `fill` 'black' is raw 0, the photograph's surround (standardised:
    -mean / std); 'mean' is the data set's mean colour (standardised: 0).
    """
    if fill not in DELETION_FILLS:
        raise ValueError(f'fill must be one of {", ".join(DELETION_FILLS)}, not {fill!r}')
    value = torch.zeros(1, 3, 1, 1, device=x.device, dtype=x.dtype)
    if fill == 'black':
        value = standardise(value)
    return torch.where(where[:, None], value, x)


def top_pixels(maps, size, fraction):
    """Boolean (N, *size): the top `fraction` of the pixels of `maps` upsampled to `size`."""
    up = upsample(maps.float(), size).flatten(1)
    chosen = torch.zeros_like(up, dtype=torch.bool)
    chosen.scatter_(1, up.topk(max(1, int(round(fraction * up.shape[1]))), dim=1).indices, True)
    return chosen.reshape(-1, *size)


@torch.no_grad()
def deletion_drops(net, x, maps, fraction=DELETION_FRACTION, generator=None, fill='mean'):
    """(drop when blanking the top `fraction` of the map's pixels, drop for a random `fraction`).

    `maps` (N, h', w') are upsampled to the input; drops are prediction(x) -
    prediction(blanked x), per image.  The random pixels are the top
    `fraction` of a random map at the same resolution, upsampled the same
    way: blobs of the same grain in random places.  Scattered single black
    pixels would be no control: they look like microaneurysms and raise
    the prediction.
    """
    size = tuple(x.shape[-2:])
    random_maps = torch.rand(maps.shape, generator=generator).to(maps.device)
    net.eval()
    before = net(x).squeeze(1)
    after_top = net(blank(x, top_pixels(maps, size, fraction), fill)).squeeze(1)
    after_random = net(blank(x, top_pixels(random_maps, size, fraction), fill)).squeeze(1)
    return (before - after_top).float().cpu().numpy(), (before - after_random).float().cpu().numpy()


@dataclasses.dataclass
class Scores:
    """Per-image localisation and deletion results, summarised by `lines`."""
    level_source: str
    fill: str = 'mean'
    tolerance: int = 0
    mass: list = dataclasses.field(default_factory=list)
    hits: list = dataclasses.field(default_factory=list)
    top_drops: list = dataclasses.field(default_factory=list)
    random_drops: list = dataclasses.field(default_factory=list)
    mass_chance: list = dataclasses.field(default_factory=list)
    hit_chance: list = dataclasses.field(default_factory=list)
    no_mask: list = dataclasses.field(default_factory=list)
    no_label: list = dataclasses.field(default_factory=list)

    def summary(self):
        mass = np.array(self.mass, dtype=np.float64)
        top, random = np.mean(self.top_drops or [np.nan]), np.mean(self.random_drops or [np.nan])
        return dict(ram_mass_in_lesions=float(np.nanmean(mass)) if np.isfinite(mass).any() else float('nan'),
                    pointing_game=float(np.mean(self.hits)) if self.hits else float('nan'),
                    deletion_top10_drop=float(top), deletion_random10_drop=float(random),
                    deletion_excess_drop=float(top - random),
                    deletion_ratio=float(top / random) if random > 0 else float('nan'))

    def lines(self):
        values = self.summary()
        notes = [f'# localisation: {len(self.hits)} image(s) of level >= 1 ({self.level_source}) with a '
                 f'lesion in the network\'s window; a pointing hit is a lesion within {self.tolerance} px '
                 f'of the map\'s maximum']
        if self.hits:
            notes.append(f'# by chance: lesions cover {np.mean(self.mass_chance):.4f} of the window '
                         f'(mass); {np.mean(self.hit_chance):.4f} of it is within {self.tolerance} px '
                         f'of one (pointing)')
        if self.no_mask:
            notes.append(f'# {len(self.no_mask)} image(s) of level >= 1 have no mask and are not '
                         f'localised (e.g. {self.no_mask[0]})')
        if self.no_label:
            notes.append(f'# {len(self.no_label)} image(s) have no label and are not scored '
                         f'(e.g. {self.no_label[0]})')
        notes.append(f'# deletion: {len(self.top_drops)} image(s) of level >= 1; {DELETION_FRACTION:.0%} '
                     f'of the window set to {"black" if self.fill == "black" else "the mean colour"}: the '
                     f'map\'s top pixels, or random blobs of the map\'s grain')
        if values['deletion_random10_drop'] <= 0:
            notes.append(f'# deletion_ratio is nan: blanking random blobs did not lower the prediction '
                         f'(change {-values["deletion_random10_drop"]:+.4f}); deletion_excess_drop '
                         f'(top minus random) is the comparison that stays defined')
        return notes + [f'{key}: {value:.4f}' for key, value in values.items()]


# --- inputs --------------------------------------------------------------------

def collect_images(specs):
    """Image paths from folders and single files, sorted within each folder; names must be unique."""
    found = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found.extend(list_images(path))
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f'{path}: no such image or folder; pass converted images or a folder of them '
                            f'(e.g. data/test_tiny)')
    seen = {}
    for path in found:
        name = image_name(path)
        if name in seen and seen[name] != path:
            raise UserError(f'{seen[name]} and {path} share the name {name}, so their maps would '
                            f'overwrite each other; rename one or pass only one of them')
        seen[name] = path
    return list(dict.fromkeys(found))


def load_window(path, window_size):
    """(uint8 (3, h, w) centred window the network sees, side S of the converted image)."""
    image = load_rgb(path)
    width, height = image.size
    if width != height:
        raise BadImage(f'{path}: {width}x{height} is not square, so it is not a converted image; '
                       f'convert it first (python convert.py --crop_size 128 ...)')
    if width < max(window_size):
        raise BadImage(f'{path}: {width} px is smaller than the network\'s {window_size[1]}x'
                       f'{window_size[0]} input; convert it with a larger --crop_size')
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())
    return centre_crop(array, window_size).to(torch.uint8), width


class MaskSource:
    """Lesion masks `folder/{image}.png`, brought to the converted image and its network window."""

    def __init__(self, folder, photos=None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f'{self.folder}: no such masks folder; it should hold {{image}}.png lesion '
                            f'masks (white = lesion)')
        self.masks = {image_name(p): p for p in self.folder.iterdir()
                      if p.suffix.lower() in paths.IMAGE_EXTENSIONS}
        self.photos = {image_name(p): p for p in list_images(photos)} if photos else None
        self.photos_folder = photos

    def lesions(self, name, image_size, window_size):
        """Boolean (h, w) lesions in the network's window, or None when `name` has no mask."""
        path = self.masks.get(name)
        if path is None:
            return None
        coverage = np.asarray(self.converted(path, name, image_size), dtype=np.float32) / 255.0
        window = centre_crop(torch.from_numpy(coverage), window_size).numpy()
        return window >= MASK_COVERAGE

    def converted(self, path, name, size):
        """The mask as a mode-L image of the converted image's size (size x size)."""
        mask = load_rgb(path).convert('L')
        if mask.size == (size, size):
            return mask
        if self.photos is not None:
            photo_path = self.photos.get(name)
            if photo_path is None:
                raise UserError(f'{path}: no photograph {name} in {self.photos_folder} to reproduce '
                                f'the eye crop from; add it or remove the mask')
            photo = crop.load_for_crop(photo_path, size)
            original = _original_size(photo_path)
            if abs(mask.width / mask.height - original[0] / original[1]) > 0.01:
                raise UserError(f'{path}: {mask.width}x{mask.height} does not have the shape of its '
                                f'photograph {photo_path} ({original[0]}x{original[1]})')
            box = crop.scale_box(crop.find_eye_box_fast(photo), photo.size, mask.size)
            return mask.resize((size, size), Image.Resampling.BOX, box=box)
        if mask.width == mask.height:
            return mask.resize((size, size), Image.Resampling.BOX)
        raise UserError(f'{path}: the mask is {mask.width}x{mask.height} (the original photograph\'s '
                        f'shape?) but the image is {size}x{size}; pass --photos with the original '
                        f'photographs so each mask is cropped to the eye like its photograph')


def _original_size(path):
    with Image.open(path) as image:
        return image.size


# --- drawing -------------------------------------------------------------------

def _figure(width_in, height_in):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _norm(maps, signed):
    from matplotlib.colors import Normalize
    peak = max(float(np.max(np.abs(m) if signed else m)) for m in maps)
    peak = peak if peak > 1e-6 else 1e-6
    return Normalize(-peak, peak) if signed else Normalize(0.0, peak)


def _overlay(axes, window, ram, cmap, norm, alpha, signed):
    axes.imshow(window, interpolation='bilinear')
    shown = ram if signed else np.clip(ram, 0, None)
    image = axes.imshow(shown, cmap=cmap, norm=norm, alpha=alpha, interpolation='bilinear')
    axes.set_axis_off()
    return image


def _opaque(image):
    """The colour scale of an overlay, drawn at full opacity so its colours can be read."""
    from matplotlib.cm import ScalarMappable
    return ScalarMappable(norm=image.norm, cmap=image.cmap)


def _save(figure, path):
    with atomic.atomic_path(path) as tmp:
        figure.savefig(tmp, format='png')


@dataclasses.dataclass
class Example:
    """One image with its map, as drawn."""
    name: str
    window: np.ndarray       # (h, w, 3) uint8: what the network saw
    ram: np.ndarray          # (h, w) upsampled map including the bias
    prediction: float
    map_mean: float          # mean of the map at conv resolution (= prediction)
    label: int = None

    @property
    def level(self):
        return int(data.to_levels([self.prediction])[0])


def heat_map_figure(example, cnf_name, cmap, alpha, signed):
    figure = _figure(4.4, 4.9)
    axes = figure.add_axes([0.03, 0.03, 0.75, 0.78])
    image = _overlay(axes, example.window, example.ram, cmap, _norm([example.ram], signed), alpha, signed)
    label = f'   label {example.label}' if example.label is not None else ''
    figure.text(0.03, 0.97, f'{example.name}   {cnf_name}', va='top', fontsize=9)
    figure.text(0.03, 0.91, f'predicted {example.prediction:.2f} -> level {example.level}{label}',
                va='top', fontsize=10, weight='bold')
    figure.text(0.03, 0.855, f'RAM mean {example.map_mean:.2f}'
                f'{"   (signed, 0 = white)" if signed else "   (positive part)"}', va='top', fontsize=9)
    bar = figure.colorbar(_opaque(image), cax=figure.add_axes([0.81, 0.05, 0.04, 0.74]))
    bar.ax.tick_params(labelsize=8)
    bar.set_label('RAM (level units)', fontsize=8)
    return figure


def by_level_figure(examples, cnf_name, cmap, alpha, signed):
    """One column per predicted level 0..4: the image above, its RAM below, on one colour scale.

    `examples` maps each level to an `Example` (the run picks the image whose
    prediction is nearest the level) or None, drawn as empty panels saying none.
    """
    figure = _figure(11.5, 5.2)
    shown = [e for e in examples.values() if e is not None]
    norm = _norm([e.ram for e in shown], signed) if shown else _norm([np.zeros(1)], signed)
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
            top_axes.set_title(f'level {level}\n(no image predicted)\n', fontsize=8)
            continue
        top_axes.imshow(example.window, interpolation='bilinear')
        top_axes.set_axis_off()
        label = f', label {example.label}' if example.label is not None else ''
        top_axes.set_title(f'level {level}\n{example.name}\npredicted {example.prediction:.2f}{label}',
                           fontsize=8)
        image = _overlay(bottom_axes, example.window, example.ram, cmap, norm, alpha, signed)
    figure.suptitle(f'{cnf_name}: regression activation maps by predicted level '
                    f'({"signed" if signed else "positive part"}, one colour scale)', fontsize=11)
    if image is not None:
        bar = figure.colorbar(_opaque(image), cax=figure.add_axes([0.925, 0.07, 0.015, 0.37]))
        bar.ax.tick_params(labelsize=8)
        bar.set_label('RAM', fontsize=8)
    return figure


# --- the run -----------------------------------------------------------------------

def load_ram_net(config, weights_from, device):
    """The config's net with the weights of `weights_from` (default: its best-kappa weights)."""
    if not any(kind == 'gap' for kind, _ in config.layers):
        raise UserError(f'{config.path}: {config.name} is a baseline config (RMS-pool head) and has '
                        f'no regression activation map; use --cnf {config.name}_ram')
    path = Path(weights_from) if weights_from else paths.best_kappa_weights(config.name)
    net, state = rebuild(config, path)
    check_ram_net(net)
    return net.to(device).eval(), path, state.get('config_name')


@dataclasses.dataclass
class RunSummary:
    written: list
    by_level: Path
    failed: list
    scores: Scores = None


def _batches(image_paths, batch_size, window_size, failed, bar):
    """Lists of (path, uint8 window, converted size); unreadable images are named and left out."""
    batch = []
    for path in image_paths:
        try:
            batch.append((path, *load_window(path, window_size)))
        except BadImage as error:
            failed.append(str(error))
            tqdm.write(f'skipped: {error}', file=sys.stderr)
            bar.update(1)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def run(config, net, image_paths, output_dir, signed=False, cmap=None, alpha=0.5, masks=None,
        photos=None, labels=None, batch_size=None, deletion_fill='mean', progress=True):
    """Write a heat map per image and the by-level figure; score localisation when `masks` is given."""
    device = next(net.parameters()).device
    window_size = config.input_size
    cmap = cmap or (SIGNED_CMAP if signed else SEQUENTIAL_CMAP)
    batch_size = batch_size or config.cnf['batch_size_test']
    known = data.load_labels(labels) if labels else None
    mask_source = MaskSource(masks, photos) if masks else None
    scores = Scores(level_source=f'labels of {labels}' if labels else 'predicted levels',
                    fill=deletion_fill) if mask_source else None
    generator = torch.Generator().manual_seed(DELETION_SEED)
    best = {level: None for level in LEVELS}
    written, failed = [], []
    bar = tqdm(total=len(image_paths), desc=f'RAM {config.name}', unit='img', disable=not progress)
    with bar:
        for batch in _batches(image_paths, batch_size, window_size, failed, bar):
            windows = torch.stack([window for _, window, _ in batch]).to(device)
            x = standardise(windows.float())
            maps, predictions = regression_activation_map(net, x)
            bias = float(net.output.bias.detach()[0])
            ram = upsample(maps, window_size)
            for i, (path, window, _) in enumerate(batch):
                name = image_name(path)
                example = Example(name=name, window=window.permute(1, 2, 0).cpu().numpy(),
                                  ram=ram[i].cpu().numpy(), prediction=float(predictions[i]),
                                  map_mean=float(maps[i].mean()),
                                  label=known.get(name) if known is not None else None)
                path_out = paths.heat_map(output_dir, name, config.name, signed)
                _save(heat_map_figure(example, config.name, cmap, alpha, signed), path_out)
                written.append(path_out)
                current = best[example.level]
                if current is None or abs(example.prediction - example.level) < \
                        abs(current.prediction - current.level):
                    best[example.level] = example
            if scores is not None:
                _score_batch(net, batch, x, maps - bias, predictions, known, mask_source, scores,
                             window_size, generator, failed)
            bar.update(len(batch))
    by_level = paths.heat_map_figure(output_dir, config.name, signed)
    _save(by_level_figure(best, config.name, cmap, alpha, signed), by_level)
    return RunSummary(written=written, by_level=by_level, failed=failed, scores=scores)


def _score_batch(net, batch, x, evidence, predictions, known, mask_source, scores, window_size,
                 generator, failed):
    """Localisation and deletion scores of a batch; `evidence` is the map without bias (N, h', w')."""
    scores.tolerance = default_tolerance(window_size, evidence.shape[-2:])
    evidence_up = upsample(evidence, window_size)
    chosen = []
    for i, (path, _, size) in enumerate(batch):
        name = image_name(path)
        if known is not None:
            if name not in known:
                scores.no_label.append(name)
                continue
            level = known[name]
        else:
            level = int(data.to_levels([float(predictions[i])])[0])
        if level < 1:
            continue
        chosen.append(i)
        try:
            lesions = mask_source.lesions(name, size, window_size)
        except BadImage as error:
            failed.append(str(error))
            tqdm.write(f'mask skipped: {error}', file=sys.stderr)
            continue
        if lesions is None:
            scores.no_mask.append(name)
            continue
        if not lesions.any():
            continue
        map_i = evidence_up[i].cpu().numpy()
        scores.mass.append(lesion_mass_share(map_i, lesions))
        scores.hits.append(points_at_lesion(map_i, lesions, scores.tolerance))
        scores.mass_chance.append(float(lesions.mean()))
        scores.hit_chance.append(float(near_lesions(lesions, scores.tolerance).mean()))
    if chosen:
        index = torch.tensor(chosen, device=x.device)
        top, random = deletion_drops(net, x[index], evidence[index], generator=generator,
                                     fill=scores.fill)
        scores.top_drops.extend(top.tolist())
        scores.random_drops.extend(random.tolist())
