"""Heat maps of a folder of converted images, drawn and scored: what ram.py runs.

A method of `retina.heatmaps.methods` (the regression activation map of a
RAM net by default, or Grad-CAM / LayerCAM at any conv layer of any net)
gives each image a map at a conv layer's resolution; `--fuse` adds the
min-max normalised maps of a second net (a 128-px and a 256-px heat-map
net, as the RAM repository's notebook fused them).

Geometry.  The network sees the centred h x w window of the S x S converted
image (112 of 128 for the 128-pixel nets).  The map is upsampled (bicubic,
see `upsample`) to that window and drawn over it, coloured only inside the
fundus; the margin outside the window, which the network never sees, is
not shown.  With `--fuse` the images are converted for the larger net; the
smaller net sees the same window shrunk to its input (a 256-px image's 224
window shrunk to 112 is the 128-px image's 112 window).

Lesion masks (`--masks`) must line up with the converted images.  A mask is
accepted at the converted image's size (S x S, cropped like the image), as
any other square (resized), or at the original photograph's resolution
together with the photograph itself (`--photos`): the eye's box is found on
the photograph exactly as convert.py finds it and the same box is cut from
the mask.  Running convert.py on a mask folder does not work: it would look
for the eye in the mask, find none and fall back to the centred square.
A mask pixel at the converted size is a lesion when at least
MASK_COVERAGE of it is covered, so that microaneurysms survive shrinking.
A masks folder whose subfolders hold the masks (exudate/, red/, ...) is
scored per lesion kind.

Scores (see `retina.heatmaps.scores`): images of level >= 1 (the labels'
level if given, else the predicted one; every image with `all_levels`)
that have a lesion in the window, each map beside the image-blind map and
the grid oracle, overall and per level.
"""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from retina.core import atomic, paths
from retina.core.errors import UserError
from retina.core.metrics import FIXED_CUTS, LEVELS, to_levels
from retina.data import crop
from retina.data.cache import check_side
from retina.data.images import BadImage, collect_images, image_name, list_images, load_rgb
from retina.data.labels import load_labels
from retina.heatmaps import figures, methods, scores as scoring
from retina.model import checkpoint, released
from retina.model.augment import centre_crop
from retina.model.nets import is_ram_net
from retina.model.scoring import prepare_window

MASK_COVERAGE = 0.25        # share of a converted pixel a lesion must cover to count
DELETION_SEED = 0
METHODS = tuple(methods.METHODS)


# --- inputs --------------------------------------------------------------------

def load_window(path, window_size):
    """(uint8 (3, h, w) centred window the network sees, side S of the converted image)."""
    image = load_rgb(path)
    width, height = image.size
    if width != height:
        raise BadImage(f'{path}: {width}x{height} is not square, so it is not a converted image; '
                       f'convert it first (python convert.py --crop_size 128 ...)')
    check_side(width, window_size, path, f'the net ({window_size[1]}x{window_size[0]} window)',
               too_small=BadImage)
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

    def coverage(self, name, image_size, window_size):
        """Float (h, w) share of each window pixel covered by lesions, or None when `name` has no mask."""
        path = self.masks.get(name)
        if path is None:
            return None
        coverage = np.asarray(self.converted(path, name, image_size), dtype=np.float32) / 255.0
        return centre_crop(torch.from_numpy(coverage), window_size).numpy()

    def lesions(self, name, image_size, window_size):
        """Boolean (h, w) lesions in the network's window, or None when `name` has no mask."""
        coverage = self.coverage(name, image_size, window_size)
        return None if coverage is None else coverage >= MASK_COVERAGE

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


def mask_sources(folder, photos=None):
    """{kind: MaskSource}: one per subfolder of `folder` that holds masks, else {'': the folder}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f'{folder}: no such masks folder; it should hold {{image}}.png lesion masks '
                        f'(white = lesion), or one subfolder of them per lesion kind')
    kinds = sorted(p for p in folder.iterdir() if p.is_dir() and any(
        q.suffix.lower() in paths.IMAGE_EXTENSIONS for q in p.iterdir()))
    if kinds:
        return {kind.name: MaskSource(kind, photos) for kind in kinds}
    return {'': MaskSource(folder, photos)}


# --- the run -----------------------------------------------------------------------

def net_for_method(config, weights_from, device, method='ram'):
    """The `checkpoint.LoadedNet` of the config with the weights of `weights_from`
    (`checkpoint.resolve_weights`; default: its best-kappa weights), checked to make maps of
    `method` (before loading: a baseline config has no RAM)."""
    if method == 'ram' and not is_ram_net(config.layers):
        raise UserError(f'{config.path}: {config.name} is a baseline config (RMS-pool head) and has '
                        f'no regression activation map; use --cnf {config.name}_ram, or --method '
                        f'gradcam or layercam for this net')
    loaded = checkpoint.load_net(config, weights_from, device)
    if method == 'ram':
        methods.check_ram_net(loaded.net)
    return loaded


def check_preprocessing(image_paths, nets):
    """Every image folder must be prepared (convert.py --enhance) as each net's training images
    were (`nets`: LoadedNets)."""
    from retina.data import preprocess
    for folder in dict.fromkeys(Path(p).parent for p in image_paths):
        for loaded in nets:
            preprocess.check_matches(folder, loaded.preprocessing, loaded.weights)


def check_output_dir(output_dir, image_paths, *input_folders):
    """The heat maps must not land among the inputs: a folder of converted images (or of
    masks or photographs) that receives non-square PNGs is spoiled for the next run."""
    released.check_not_released(output_dir, '--output_dir')
    out = Path(output_dir).resolve()
    folders = {Path(p).parent.resolve() for p in image_paths}
    folders |= {Path(f).resolve() for f in input_folders if f}
    for folder in sorted(folders):
        if out == folder or folder in out.parents:
            raise UserError(f'--output_dir {output_dir} is inside the input folder {folder}; the '
                            f'heat maps would be mixed with the images: choose a folder outside '
                            f'it, e.g. {paths.RAM_DIR}')


@dataclasses.dataclass
class Item:
    """One image after the forward passes: its map at conv resolution and what scoring needs."""
    path: Path
    name: str
    size: int
    map: torch.Tensor             # (h', w') on the CPU
    prediction: float
    label: int = None
    scored: bool = False
    coverage: dict = dataclasses.field(default_factory=dict)   # kind -> float16 (h, w) in the window
    inside: np.ndarray = None
    cuts: tuple = FIXED_CUTS  # the net's level cut-offs (checkpoint.level_cuts)
    shown: torch.Tensor = None    # (h', w') the map as coloured: score units (methods.in_score_units)

    @property
    def level(self):
        """The true label when known, else the predicted level."""
        return self.label if self.label is not None else int(to_levels([self.prediction],
                                                                           self.cuts)[0])


@dataclasses.dataclass
class RunSummary:
    written: list
    by_level: Path
    failed: list
    scores: scoring.Scores = None


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


def make_maps(loaded, image_paths, output_dir, method='ram', layer=None, include_bias=False,
              fuse_with=None, per_image_scale=False, signed=False, cmap=None, alpha=figures.OPACITY,
              masks=None, photos=None, labels=None, all_levels=False, batch_size=None,
              deletion_fill='mean', draw=True, progress=True, save_maps=False, fuse_images=None):
    """Write a heat map per image and the by-level figure; score localisation when `masks` is given.

    With `save_maps` each image's map, as the method made it (conv resolution, float32; fused
    maps on their grid), is saved beside its figure as .npy (with --scores_only too).

    `loaded` is the net (`checkpoint.LoadedNet`); `fuse_with` a second one whose maps are
    fused with its; the images must then be converted for the larger of the two, unless
    `fuse_images` (a folder) holds the same photographs converted for `fuse_with`, which then
    sees its own images (as predict.py --fuse runs it).
    Without `draw` nothing is written (scores only).
    """
    nets = [loaded] + ([fuse_with] if fuse_with else [])
    config = loaded.config
    window_size = max((n.input_size for n in nets), key=lambda s: s[0] * s[1])
    title = '+'.join(n.config.name for n in nets)
    tag = methods.method_tag(method, layer, include_bias, loaded.net)
    cmap = cmap or (figures.SIGNED_CMAP if signed else figures.SEQUENTIAL_CMAP)
    batch_size = batch_size or config.cnf['batch_size_test']
    known = load_labels(labels) if labels else None
    sources = mask_sources(masks, photos) if masks else None
    fuse_paths = own_images(fuse_images, image_paths) if fuse_images and fuse_with else None
    scores = None
    if sources:
        level_source = ('every level' if all_levels else 'level >= 1') + (
            f' by the labels of {labels}' if labels else '' if all_levels else ' as predicted')
        scores = scoring.Scores(level_source=level_source,
                                fill=deletion_fill, kinds=tuple(sources))
    generator = torch.Generator().manual_seed(DELETION_SEED)
    items, failed = [], []
    bar = tqdm(total=len(image_paths), desc=f'{tag} {title}', unit='img', disable=not progress)
    with bar:
        for batch in _batches(image_paths, batch_size, window_size, failed, bar):
            items.extend(_forward(nets, batch, method, layer, include_bias, known, sources, scores,
                                  all_levels, window_size, generator, failed, fuse_paths))
            bar.update(len(batch))
    if scores is not None:
        _score(items, scores, window_size)
    if save_maps:
        for item in items:
            atomic.save_npy(paths.heat_map(output_dir, item.name, title, signed, tag)
                            .with_suffix('.npy'), item.map.float().numpy())
    if not draw:
        return RunSummary(written=[], by_level=None, failed=failed, scores=scores)
    net = ' + '.join(figures.net_name(n.config.name, n.weights) for n in nets)
    written, by_level = _draw(items, output_dir, title, tag, window_size, cmap, alpha, signed,
                              per_image_scale, by_label=known is not None, failed=failed,
                              legend=figures.legend(method, len(nets) == 2, per_image_scale, signed),
                              net=f'{net}, {tag}' + (', fused' if len(nets) == 2 else ''),
                              cuts=checkpoint.level_cuts([loaded]))
    return RunSummary(written=written, by_level=by_level, failed=failed, scores=scores)


def own_images(folder, image_paths):
    """{image name: path} of the --fuse net's own converted images in `folder`, one for each
    of `image_paths`."""
    found = {image_name(p): p for p in collect_images([folder], what='converted images')}
    missing = [image_name(p) for p in image_paths if image_name(p) not in found]
    if missing:
        raise UserError(f'{folder}: no image {missing[0]} (of {len(missing)} missing); --fuse_images '
                        f'must hold every image of --images converted for the --fuse net')
    return found


def _forward(nets, batch, method, layer, include_bias, known, sources, scores, all_levels,
             window_size, generator, failed, fuse_paths=None):
    """Items of a batch: maps (fused when there are two nets), predictions, masks of the scored ones."""
    device = next(nets[0].net.parameters()).device
    windows = torch.stack([window for _, window, _ in batch]).to(device)
    maps, inputs = [], []
    for n in nets:
        own = windows
        if n is not nets[0] and fuse_paths is not None:   # its own conversion of the photograph
            own = torch.stack([load_window(fuse_paths[image_name(path)], n.input_size)[0]
                               for path, _, _ in batch]).to(device)
        x = prepare_window(own, n.spec)
        m, p = methods.compute_maps(method, n.net, x, layer=layer if n is nets[0] else None,
                                    include_bias=include_bias)
        maps.append(m)
        inputs.append(x)
        if n is nets[0]:
            predictions = p
    fused = methods.fuse(*maps) if len(maps) == 2 else maps[0]
    shown = methods.in_score_units(method, fused, predictions, fused=len(maps) == 2).cpu()
    items = []
    cuts = checkpoint.level_cuts(nets[:1])  # the first net's score is the prediction
    for i, (path, window, size) in enumerate(batch):
        name = image_name(path)
        label = known.get(name) if known is not None else None
        item = Item(path=path, name=name, size=size, cuts=cuts, map=fused[i].float().cpu(),
                    prediction=float(predictions[i]), label=label, shown=shown[i])
        items.append(item)
        if sources is None:
            continue
        if known is not None and label is None:
            scores.no_label.append(name)
            continue
        if not all_levels and item.level < 1:
            continue
        item.scored = True
        item.inside = figures.fundus_mask(window.permute(1, 2, 0).cpu().numpy())
        for kind, source in sources.items():
            try:
                coverage = source.coverage(name, size, window_size)
            except BadImage as error:
                failed.append(str(error))
                tqdm.write(f'mask skipped: {error}', file=sys.stderr)
                continue
            if coverage is None:
                scores.no_mask.setdefault(kind, []).append(name)
                continue
            item.coverage[kind] = coverage.astype(np.float16)
    scored = [i for i, item in enumerate(items) if item.scored]
    if scores is not None and scored and len(nets) == 1:
        index = torch.tensor(scored, device=device)
        top, random = scoring.deletion_drops(nets[0].net, inputs[0][index], maps[0][index],
                                             generator=generator, fill=scores.fill,
                                             constants=nets[0].constants)
        scores.top_drops.extend(top.tolist())
        scores.random_drops.extend(random.tolist())
    return items


def _score(items, scores, window_size):
    """Every scored image's map, blind map and grid oracle against its lesions, per kind."""
    scored = [item for item in items if item.scored]
    if not scored:
        return
    grid = tuple(scored[0].map.shape)
    scores.grid = grid
    scores.tolerance = scoring.default_tolerance(window_size, grid)
    maps = torch.stack([item.map for item in scored])
    blind = scoring.blind_maps(maps) if len(scored) > 1 else None
    for i, item in enumerate(scored):
        # Upsampled one image at a time: a whole large run at window size would not fit in memory.
        evidence = methods.upsample(maps[i:i + 1], window_size)[0].numpy()
        blind_i = methods.upsample(blind[i:i + 1], window_size)[0].numpy() if blind is not None else None
        for kind, coverage in item.coverage.items():
            lesions = coverage.astype(np.float32) >= MASK_COVERAGE
            if not (lesions & item.inside).any():
                continue
            oracle = scoring.grid_oracle(coverage.astype(np.float32), grid, window_size).numpy()
            values = {variant: scoring.score_map(heat, lesions, item.inside, scores.tolerance)
                      if heat is not None else dict.fromkeys(scoring.SCORE_NAMES, float('nan'))
                      for variant, heat in (('map', evidence), ('oracle', oracle), ('blind', blind_i))}
            scores.records.append(scoring.Record(name=item.name, kind=kind, level=item.level,
                                                 values=values))


def examples_by_level(items, by_label):
    """{level: the item of that level whose prediction is nearest it, or None}.

    The level is the true label when `by_label` (items without a label are
    left out), else the predicted level: a figure by label shows what the
    net makes of each grade, one by prediction what it thinks each grade is.
    """
    best = {level: None for level in LEVELS}
    for item in items:
        if (by_label and item.label is None) or item.level not in best:
            continue
        current = best[item.level]
        if current is None or abs(item.prediction - item.level) < abs(current.prediction - item.level):
            best[item.level] = item
    return best


def _draw(items, output_dir, title, tag, window_size, cmap, alpha, signed, per_image_scale,
          by_label, failed, legend, net, cuts):
    """Write each image's picture (`figures.render`, as predict.py draws) and the by-level
    figure, on the one scale in score units unless `per_image_scale`.

    Each window is read again rather than holding every image of a large run in memory.
    """
    def window_of(item):
        window, _ = load_window(item.path, window_size)
        return window.permute(1, 2, 0).numpy()

    written, drawable = [], []
    for item in items:
        try:
            window = window_of(item)
        except BadImage as error:       # changed on disk since the forward pass
            failed.append(str(error))
            continue
        drawable.append(item)
        photo, heat = figures.enlarged(window, item.shown)
        top = methods.colour_peak([heat if signed else np.clip(heat, 0, None)], signed) \
            if per_image_scale else None
        level = int(to_levels([item.prediction], cuts)[0])
        lines = figures.caption(item.name, item.prediction, level, None, net=net, label=item.label)
        path = paths.heat_map(output_dir, item.name, title, signed, tag)
        figures.save_picture(path, figures.render(photo, heat, lines, legend, cmap, alpha, signed,
                                                  top))
        written.append(path)

    def example(item):
        window = window_of(item)
        return figures.Example(
            name=item.name, window=window,
            heat=methods.upsample(item.shown[None], window_size)[0].numpy(),
            prediction=item.prediction, map_mean=float(item.map.mean()), label=item.label,
            inside=item.inside if item.inside is not None else figures.fundus_mask(window))

    from matplotlib.colors import Normalize
    top = methods.SCALE_TOP
    shared = Normalize(-top, top) if signed else Normalize(0.0, top)
    best = examples_by_level(drawable, by_label)
    chosen = {level: example(item) if item is not None else None for level, item in best.items()}
    by_level = paths.heat_map_figure(output_dir, title, signed, tag)
    figures.save(figures.by_level_figure(chosen, f'{tag} {title}', cmap, alpha, signed, shared, by_label),
                 by_level)
    return written, by_level
