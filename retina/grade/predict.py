"""Grade raw photographs in one command (predict.py): crop in memory, score, blend, draw.

Each photograph goes through exactly what convert.py → transform.py → the
net would do to it, without writing a converted folder:

1. decode (a JPEG straight at the DCT scale convert.py would pick for the
   net's converted size), turned upright by its EXIF orientation, to RGB
   (`crop.load_for_crop`, convert.py's own decoder);
2. find the eye's box and crop + resize it to the converted size S with
   `retina.data.crop` (convert.py's own functions), then the preprocessing the
   net's training images had (`retina.data.preprocess`, recorded in its checkpoint);
3. the net sees the centred h × w window of the S × S image (S is
   round(w / 0.875): 128, 256, 512 for the 112, 224, 448-pixel nets), or
   with `n_iter` > 1 the same Halton augmentations as transform.py.

So the levels equal those of the converted-folder route for the same
photographs (tested).  A net's score is its output averaged over the
augmentations; `mean` averages the nets; `level` cuts the mean at the cut-offs of
`checkpoint.level_cuts`: a lone net's own on its centred window, else 0.5 … 3.5.

With a blend saved by blend.py --predict (`retina.blend.fitted.save`), the
features the blend was fitted on (each config's mean/std over its own TTA
iterations) are computed the same way, the two eyes of a patient are paired
by name ({patient}_{left|right}, an eye alone uses its own features), and the
blend's level per eye is reported.

`heatmap_dir` gets each net's heat map placed back over the *uncropped*
photograph: the map covers the net's window, which is mapped through the eye's
box to photograph pixels.  The map is any method of `retina.heatmaps.methods`,
computed as ram.py computes it: the regression activation map of a RAM net
(Σ_k w_k A_k over the last conv layer's maps), or Grad-CAM or LayerCAM of any
net, baseline nets included, at its last conv or an earlier one; a second net's
map can be fused in.
"""
import dataclasses
import functools
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from retina.core import atomic, paths
from retina.core.errors import UserError, first_few
from retina.core.metrics import to_levels
from retina.core.paths import IMAGE_EXTENSIONS, patient_and_eye
from retina.data import crop, preprocess
from retina.data.cache import converted_size
from retina.data.images import (BadImage, csv_safe, has_line_break, image_name, list_images,
                                unlisted_images)
from retina.features.files import mean_and_std
from retina.model import checkpoint, feature_stats, released
from retina.model import config as config_module
from retina.model.augment import (broadcast_params, centre_crop, centre_offsets, prepare_batch,
                                  tta_params)
from retina.model.nets import ram_exact

BATCH_SIZE = 8              # photographs decoded and scored together


# --- the nets ------------------------------------------------------------------------

@dataclasses.dataclass
class Grader:
    """One trained net (`checkpoint.LoadedNet`) and how predict.py feeds and reports it."""
    loaded: object          # checkpoint.LoadedNet
    crop_size: int          # S: the converted image side its window is cut from
    column: str = ''        # its score column in the output
    feature_stats: object = None  # feature_stats.FeatureStats of its training photographs
    thresholds: tuple = None  # its own cut-offs for the centred window (a released net's)

    @property
    def config(self):       # the config the weights were trained with
        return self.loaded.config

    @property
    def net(self):
        return self.loaded.net

    @property
    def weights(self):
        return self.loaded.weights

    @property
    def preprocessing(self):  # retina.data.preprocess method of its training images
        return self.loaded.preprocessing

    @property
    def constants(self):      # the pixel constants it was trained with
        return self.loaded.constants

    @property
    def input_size(self):
        return self.loaded.input_size

    @property
    def is_ram(self):
        return ram_exact(self.net)

    @property
    def fingerprint(self):
        return self.loaded.fingerprint


def load_grader(cnf, weights_from=None, device='cpu', crop_size=None):
    """A `Grader` for config `cnf` (name or path) with `weights_from` (default: its best-kappa
    weights, weights/CNF/weights.pt)."""
    config = config_module.load(cnf)
    weights = (released.weights_path(weights_from) if weights_from
               else paths.best_kappa_weights(config.name))
    loaded = checkpoint.load_net(config, weights, device)
    expected = converted_size(loaded.input_size)
    size = crop_size or expected
    if not max(loaded.input_size) <= size <= expected:  # as transform.py checks converted images
        raise UserError(f'--crop_size {size}: {config.name} sees a {max(loaded.input_size)}-px '
                        f'window of {expected}-px converted images; use a size from '
                        f'{max(loaded.input_size)} to {expected} (or leave --crop_size out)')
    state = loaded.state
    return Grader(loaded=loaded, crop_size=size,
                  feature_stats=feature_stats.FeatureStats.from_state(state.get('feature_stats')),
                  thresholds=tuple(state['thresholds']) if state.get('thresholds') else None)


def name_columns(graders):
    """Score columns named after the configs (score_c_512_5x5_32), numbered when one repeats."""
    counts = {}
    for grader in graders:
        counts[grader.config.name] = counts.get(grader.config.name, 0) + 1
    seen = {}
    for grader in graders:
        name = grader.config.name
        seen[name] = seen.get(name, 0) + 1
        grader.column = f'score_{name}' + (f'_{seen[name]}' if counts[name] > 1 else '')


# --- one photograph --------------------------------------------------------------------

@dataclasses.dataclass
class Photo:
    """A decoded photograph and its converted images, one per (crop size, preprocessing)."""
    path: Path
    name: str
    converted: dict                   # (crop_size, method) -> (S, S, 3) uint8
    boxes: dict                       # crop_size -> the eye's box in that decode
    images: dict                      # crop_size -> the decode (kept only for heat maps)
    problems: list = dataclasses.field(default_factory=list)  # gradability.reasons of the image
    already: str = ''   # the look it arrived with and how that was told, when it had one
    # (crop_size, method) -> the converted image of the photograph re-saved as a JPEG of
    # quality STABILITY_QUALITY (the stability check: `unstable`)
    resaved: dict = dataclasses.field(default_factory=dict)


def prepare_photo(path, needs, keep_images=False, stability=False):
    """A `Photo` with the converted image for each (crop_size, method) in `needs`.

    Each crop size decodes the file on its own (convert.py's JPEG draft scale
    depends on it), so every converted image is the one convert.py writes.
    """
    if has_line_break(path):  # kept by collect_photos to be named here, on one line
        raise BadImage(f'{str(path)!r}: the name holds a line break, which no names file or '
                       f'CSV row of names can carry; rename the file')
    if not Path(path).is_file():  # from a folder's listing: never open a pipe, a folder, ...
        raise BadImage(f'{path}: not a photograph file (a folder, a pipe, or a link to nothing '
                       f'or to itself); skipped')
    converted, boxes, images, problems, resaved = {}, {}, {}, None, {}
    already, told, look_problems = None, '', []
    for crop_size in sorted({s for s, _ in needs}):
        image = crop.load_for_crop(path, crop_size)  # EXIF orientation applied (images.py)
        box = crop.find_eye_box_fast(image)
        rgb = np.asarray(crop.crop_to_eye(image, crop_size, box))
        boxes[crop_size] = box
        if already is None:
            already, told = look_of(path, rgb)
        if problems is None:  # the image checks, on the first (smallest) conversion
            problems = crop.gradability_reasons(path, image, box, crop_size, rgb,
                                                enhanced=already != 'none')
        if keep_images:
            images[crop_size] = image
        resaved_rgb = np.asarray(crop.crop_to_eye(jpeg_resaved(image), crop_size, box)) \
            if stability and already == 'none' else None
        for method in sorted({m for s, m in needs if s == crop_size}):
            if already == 'none':
                converted[(crop_size, method)] = preprocess.apply(rgb, method)
                if resaved_rgb is not None:
                    resaved[(crop_size, method)] = preprocess.apply(resaved_rgb, method)
            else:  # converted with a look already: never given it twice
                converted[(crop_size, method)] = rgb
                if method != already:
                    look_problems.append(f'already enhanced ({already}, by {told}) unlike the '
                                         f"net's training photographs ({method}): grade the "
                                         f'raw photograph')
    return Photo(path=Path(path), name=image_name(path), converted=converted, boxes=boxes,
                 images=images, problems=(problems or []) + sorted(set(look_problems)),
                 already=f'{already}, by {told}' if already != 'none' else '', resaved=resaved)


STABILITY_QUALITY = 75   # a mild re-encoding: what a viewer, a mail client or a PACS does
UNSTABLE = 'unstable under re-encoding'


def jpeg_resaved(image, quality=STABILITY_QUALITY):
    """The decoded photograph (a PIL image) as it comes back from a JPEG of `quality`: the
    photograph re-saved as a viewer would, before it is cropped and resized.  (Re-encoding the
    small converted crop instead is far harsher than any re-save of the photograph: the look's
    contrast stretch then magnifies the blocks; the released eyepacs-256 moved the level of
    21% of eyepacs_raw's photographs by more than one that way, none when the photograph
    itself was re-saved at 75.)"""
    from io import BytesIO
    buffer = BytesIO()
    image.save(buffer, 'JPEG', quality=quality)
    return Image.open(buffer).convert('RGB')


def unstable(score, resaved_score, cuts):
    """Whether the level moves by more than one when the photograph is mildly re-encoded
    (`jpeg_resaved`): a grade that fragile is not given."""
    levels = to_levels([score, resaved_score], cuts)
    return abs(int(levels[0]) - int(levels[1])) > 1


def look_of(path, rgb):
    """(the preprocessing `rgb`, a photograph cropped to the eye, already has, how that was
    told): its folder's conversion.json when it has one (convert.py wrote the folder), else
    its statistics (`preprocess.looks_enhanced`), else ('none', '')."""
    try:
        record = _conversion_record(str(Path(path).parent))
    except UserError as error:
        raise BadImage(str(error)) from None
    if record is not None:
        return record['preprocessing'], preprocess.RECORD_NAME
    if preprocess.looks_enhanced(rgb):
        return 'local_contrast', 'its statistics'
    return 'none', ''


@functools.lru_cache(maxsize=64)
def _conversion_record(folder):
    return preprocess.read_record(folder)


# --- scoring ---------------------------------------------------------------------------

@dataclasses.dataclass
class NetOutput:
    """One net on a batch: score per photo and, where asked, TTA feature statistics and maps."""
    scores: np.ndarray
    features: dict = dataclasses.field(default_factory=dict)  # (n_iter, skip) -> (mean, std)
    maps: torch.Tensor = None
    map_predictions: torch.Tensor = None  # the net's output on the centred window the maps are of
    unlike: np.ndarray = None  # per photo: beyond the training photographs' feature distance
    resaved: np.ndarray = None  # per photo: the centred score of its mildly re-encoded copy


def _passes(grader, images, augmentations, precision='fp32'):
    """Outputs and features of `images` (N, 3, S, S) uint8 under each parameter set
    (None: the centred window); the net under bf16 autocast with `precision` 'bf16' (a
    blend's features, as transform.py computed them)."""
    outputs, features = [], []
    device = next(grader.net.parameters()).device
    with torch.no_grad():
        for params in augmentations:
            x = prepare_batch(images, grader.input_size,
                              broadcast_params(params, len(images), device) if params else None,
                              constants=grader.constants,
                              dtype=torch.bfloat16 if precision == 'bf16' else torch.float32)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
                out, feat = grader.net(x, return_features=True)
            outputs.append(out.float().squeeze(1).cpu().numpy())
            features.append(feat.double().cpu().numpy())
    return outputs, features


def heat_maps(grader, images, method, layer=None):
    """((N, h', w') maps of `method` (retina.heatmaps.methods.METHODS) at conv `layer` [default:
    the last] on the centred window, fp32, and the predictions (N,) they explain): the function
    ram.py draws with, on the same network input."""
    from retina.heatmaps import methods
    x = prepare_batch(images, grader.input_size, None,
                      constants=grader.constants)
    maps, predictions = methods.compute_maps(method, grader.net, x, layer=layer)
    return maps.cpu(), predictions.cpu()


def augmentation_list(grader, n_iter, skip=0, sequence='scrambled'):
    """transform.py's parameter sets: [None] (the centred window) for one iteration."""
    if n_iter == 1:
        return [None]
    return tta_params(n_iter, skip, grader.config.cnf['aug_params'], grader.config.cnf['sigma'],
                      sequence)


def score_batch(grader, photos, n_iter, feature_sets=(), map_method=None,
                feature_precision='fp32', map_layer=None):
    """`NetOutput` of `grader` for `photos`: the score averaged over `n_iter` augmentations,
    the mean/std features of each (n_iter, skip, sequence) in `feature_sets` (as
    transform.py saves them), the heat maps of `map_method` at `map_layer` on the centred window
    (`heat_maps`) if given."""
    device = next(grader.net.parameters()).device
    key = (grader.crop_size, grader.preprocessing)
    images = torch.from_numpy(np.stack([p.converted[key] for p in photos])).permute(0, 3, 1, 2)
    images = images.contiguous().to(device)
    result = NetOutput(scores=None)
    outputs, score_features = _passes(grader, images, augmentation_list(grader, n_iter))
    result.scores = np.mean(outputs, axis=0)
    if all(key in p.resaved for p in photos):
        copies = torch.from_numpy(np.stack([p.resaved[key] for p in photos])).permute(0, 3, 1, 2)
        result.resaved = _passes(grader, copies.contiguous().to(device), [None])[0][0]
    if grader.feature_stats is not None:  # on the centred window, as they were fitted
        centred = score_features[0] if n_iter == 1 else _passes(grader, images, [None])[1][0]
        stats = grader.feature_stats
        result.unlike = stats.distances(centred) > stats.threshold
    if map_method:
        result.maps, result.map_predictions = heat_maps(grader, images, map_method, map_layer)
    for tta in feature_sets:
        iterations, skip, sequence = tta
        same_passes = (iterations, skip) == (n_iter, 0) and (n_iter == 1 or sequence == 'scrambled')
        features = score_features if same_passes and feature_precision == 'fp32' else \
            _passes(grader, images, augmentation_list(grader, *tta),
                    precision=feature_precision)[1]
        stack = np.stack(features)
        mean, std = mean_and_std(stack.sum(axis=0), (stack ** 2).sum(axis=0), len(stack))
        result.features[tta] = (mean.astype(np.float32), std.astype(np.float32))
    return result


# --- heat maps over the photograph ---------------------------------------------------------

def window_in_photo(box, crop_size, input_size):
    """The net's window (left, top, right, bottom) in photograph pixels (floats).

    The converted image is the eye's box resized to crop_size²; the window is
    its centred h × w part (augment.centre_crop's offsets).
    """
    height, width = input_size
    top, left = centre_offsets((crop_size, crop_size), input_size)
    box_left, box_top, box_right, box_bottom = box
    sx, sy = (box_right - box_left) / crop_size, (box_bottom - box_top) / crop_size
    return (box_left + left * sx, box_top + top * sy,
            box_left + (left + width) * sx, box_top + (top + height) * sy)


def heat_map_over_photo(image, heat_map, box, crop_size, window, lines=(), legend=''):
    """The picture (`figures.render`, as ram.py draws) of the photograph (RGB, at its own
    resolution, shrunk only beyond figures.MAX_PHOTO_WIDTH) with `heat_map` (h', w', score
    units: `methods.in_score_units`) over the net's window: upsampled to the window
    (`methods.upsample`) and placed through the eye's box onto the photograph's pixels,
    coloured inside the eye only (found on the photograph), `lines` above and the colour bar
    with its `legend` beside.  `window` is the converted image's centred window (h, w, 3)."""
    from retina.heatmaps import figures, methods
    height, width = window.shape[:2]
    heat = methods.upsample(heat_map[None].float(), (height, width))[0]
    scale = min(1.0, figures.MAX_PHOTO_WIDTH / image.width)
    shown = image if scale == 1.0 else image.resize(
        (round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    left, top, right, bottom = (v * scale for v in window_in_photo(box, crop_size,
                                                                    (height, width)))
    # Pixel grid of the window, clipped to the photograph (a box may reach past its edge).
    x0, y0 = max(0, math.floor(left)), max(0, math.floor(top))
    x1, y1 = min(shown.width, math.ceil(right)), min(shown.height, math.ceil(bottom))
    placed = np.full((shown.height, shown.width), np.nan)
    if x1 > x0 and y1 > y0:
        full_h, full_w = max(1, round(bottom - top)), max(1, round(right - left))
        resized = F.interpolate(heat[None, None], size=(full_h, full_w), mode='bilinear',
                                align_corners=False)[0, 0].numpy()
        oy, ox = y0 - round(top), x0 - round(left)
        part = resized[max(oy, 0):max(oy, 0) + (y1 - y0), max(ox, 0):max(ox, 0) + (x1 - x0)]
        placed[y0:y0 + part.shape[0], x0:x0 + part.shape[1]] = part
    return figures.render(np.asarray(shown.convert('RGB')), placed, list(lines), legend,
                          outline=(left, top, right, bottom))


# --- the run -------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    """What `grade` found: one row per graded photograph, the messages of those that failed."""
    rows: list
    failed: list
    columns: list
    heat_maps: list = dataclasses.field(default_factory=list)
    model: str = ''         # what graded: released names or weights files (`model_identity`)
    model_sha256: str = ''  # their sha256s, in the same order
    notes: list = dataclasses.field(default_factory=list)  # what was done beside grading


def collect_photos(inputs, unread=None):
    """Image paths from files and folders, in the given order (a folder sorted); one per name.

    A folder's files of other image formats (.bmp, .webp, ...: `images.unlisted_images`) are
    added to `unread` when it is a list, for the caller to name.  An entry that cannot be a
    photograph (a name with a line break, a pipe, a dangling or looping link; given by name or
    in a folder) is kept, so that grading names that one as failed and goes on."""
    found = []
    for entry in inputs:
        entry = Path(entry)
        if entry.is_dir():
            found.extend(list_images(entry, keep_odd_names=True))
            if unread is not None:
                unread.extend(unlisted_images(entry))
        elif entry.is_file() or os.path.lexists(entry):
            found.append(entry)
        else:
            raise UserError(f'{entry}: no such file or folder; pass photographs or folders of '
                            f'them ({", ".join(IMAGE_EXTENSIONS)})')
    if not found:
        raise UserError('no photographs given; pass files or folders')
    seen = {}
    for path in found:  # rows, heat maps and the blend's eye pairs go by name
        if image_name(path) in seen and seen[image_name(path)] != path:
            raise UserError(f'{seen[image_name(path)]} and {path} are both image '
                            f'{image_name(path)}; grade them in separate runs')
        seen[image_name(path)] = path
    return list(dict.fromkeys(found))


def check_outputs(inputs, photos, output, heatmap_dir, weights=(), blend_file=None):
    """Refuse outputs that would overwrite an input (a photograph, the weights, the blend), a
    released model or anything in its folder (named by file or by short name, or graded by
    default), or a heat-map folder that is one of the folders being graded (a second run would
    grade the maps).  Paths are compared with `paths.resolved`: a link loop among the
    photographs is named when it is graded, not an error here."""
    if output != '-':
        released.check_not_released(output, '--output')
        target = paths.resolved(output)
        for source in [*photos, *weights, *([blend_file] if blend_file else [])]:
            if paths.resolved(source) == target:
                raise UserError(f'--output {output}: that is one of the inputs ({source}); '
                                f'write the results to a new file')
    if heatmap_dir:
        released.check_not_released(heatmap_dir, '--heatmap')
        maps = paths.resolved(heatmap_dir)
        graded = {paths.resolved(i) for i in inputs if Path(i).is_dir()}
        graded |= {paths.resolved(p).parent for p in photos}
        if maps in graded:
            raise UserError(f'--heatmap {heatmap_dir}: a folder being graded; the maps would '
                            f'be graded as photographs next time: pass another folder')


def _load_all(paths_, needs, keep_images, failed, bar, workers, stability=False):
    """Decode and crop a batch in threads (the decoders release the GIL); failures are named."""
    def one(path):
        try:
            return prepare_photo(path, needs, keep_images, stability)
        except BadImage as error:
            return str(error)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        loaded = list(pool.map(one, paths_))
    photos = []
    for item in loaded:
        if isinstance(item, str):
            failed.append(item)
            tqdm.write(f'failed: {item}', file=sys.stderr)
            bar.update(1)
        else:
            photos.append(item)
    return photos


def grade(graders, inputs, n_iter=1, blend=None, heatmap_dir=None, batch_size=BATCH_SIZE,
          progress=True, workers=None, grade_anyway=False, heatmap_method='ram',
          save_maps=False, heatmap_layer=None, heatmap_fuse=None, check_stability=False):
    """Grade the photographs of `inputs` (files and folders) with every grader; returns `Result`.

    `blend` is a `LoadedBlend` (its feature sets are computed too); `heatmap_dir`
    gets one PNG per photograph and net that makes maps of `heatmap_method`
    (retina.heatmaps.methods: 'ram' for RAM nets, 'gradcam' or 'layercam' for any, at conv
    `heatmap_layer` [default: the last]), and with
    `save_maps` the map itself beside it (.npy, the last conv's resolution).  `heatmap_fuse` (a
    `Grader`, not graded with) fuses its map into each net's as ram.py --fuse does
    (`methods.fuse`, on `methods.fusion_grid`), each net on its own converted image of the
    photograph (as ram.py --fuse_images).  Every row says whether the photograph is
    gradable and why not (`retina.data.gradability`); an ungradable one keeps its scores but gets
    no level, unless `grade_anyway`.  `check_stability`: each photograph is also re-saved as a
    JPEG of quality 75 and scored again; a level that moves by more than one is not given.
    """
    from retina.heatmaps import figures, methods
    unread = []
    photo_paths = collect_photos(inputs, unread)
    if unread:  # named, never passed over in silence; by name, such a file is decoded by PIL
        tqdm.write(f'note: {len(unread)} file(s) not graded: of image formats predict.py does '
                   f'not take from folders (it takes {", ".join(IMAGE_EXTENSIONS)}): '
                   f'{first_few(unread)}; save them as PNG or JPEG, or name each file',
                   file=sys.stderr)
    name_columns(graders)
    cuts = level_cuts(graders, n_iter)
    ram_graders = [g for g in graders if g.is_ram or heatmap_method != 'ram'] \
        if heatmap_dir else []
    if heatmap_dir and not ram_graders:
        raise UserError('--heatmap needs a RAM net (a *_ram config: its global-average-pool head '
                        'makes the map exact); none of the --cnf nets is one: use one, or '
                        '--method gradcam or layercam')
    for g in ram_graders:  # none without --heatmap
        methods.check_layer(heatmap_method, heatmap_layer, g.net, g.config.name)
    fuse = heatmap_fuse if ram_graders else None
    if fuse is not None and heatmap_method == 'ram' and not fuse.is_ram:
        raise UserError(f'--fuse {fuse.config.name}: not a RAM net, so it has no RAM to fuse; '
                        f'fuse a *_ram net or use --method gradcam or layercam')
    needs = {(g.crop_size, g.preprocessing) for g in graders + ([fuse] if fuse else [])}
    feature_sets = blend.feature_sets(graders) if blend else {}
    workers = workers or min(BATCH_SIZE, os.cpu_count() or 1)
    rows, failed, heat_maps, already = [], [], [], []
    per_photo_features = []
    bar = tqdm(total=len(photo_paths), desc='grade', unit='photo', file=sys.stderr,
               disable=not progress or len(photo_paths) < 2, dynamic_ncols=True)
    with bar:
        for start in range(0, len(photo_paths), batch_size):
            photos = _load_all(photo_paths[start:start + batch_size], needs, bool(ram_graders),
                               failed, bar, workers, stability=check_stability)
            if not photos:
                continue
            outputs = {id(g): score_batch(g, photos, n_iter, feature_sets.get(id(g), ()),
                                          map_method=heatmap_method if g in ram_graders
                                          else None, map_layer=heatmap_layer,
                                          feature_precision=blend.precision if blend else 'fp32')
                       for g in graders}
            fused_in = score_batch(fuse, photos, 1, map_method=heatmap_method).maps \
                if fuse is not None else None
            for i, photo in enumerate(photos):
                row = {'image': photo.name}
                if photo.already:
                    already.append(f'{photo.name} ({photo.already})')
                for g in graders:
                    row[g.column] = float(outputs[id(g)].scores[i])
                row['mean'] = float(np.mean([row[g.column] for g in graders]))
                row['level'] = int(to_levels([row['mean']], cuts)[0])
                problems = list(photo.problems)
                if any(outputs[id(g)].unlike is not None and outputs[id(g)].unlike[i]
                       for g in graders):
                    problems.append('unlike the training photos')
                if all(outputs[id(g)].resaved is not None for g in graders) and unstable(
                        row['mean'], float(np.mean([outputs[id(g)].resaved[i] for g in graders])),
                        cuts):
                    problems.append(UNSTABLE)
                row['gradable'] = 'no' if problems else 'yes'
                row['reasons'] = '; '.join(problems)
                rows.append(row)
                per_photo_features.append({(id(g), tta): (stats[0][i], stats[1][i])
                                           for g in graders
                                           for tta, stats in outputs[id(g)].features.items()})
                for g in ram_graders:
                    title = g.config.name + (f'+{fuse.config.name}' if fuse else '')
                    tag = methods.method_tag(heatmap_method, heatmap_layer, net=g.net)
                    path = paths.heat_map(heatmap_dir, photo.name, title, False, tag)
                    own = int(to_levels([row[g.column]], level_cuts([g], n_iter))[0])
                    graded = row['gradable'] == 'yes' or grade_anyway
                    net = figures.net_name(g.config.name, g.weights) + (
                        f' + {figures.net_name(fuse.config.name, fuse.weights)}' if fuse else '')
                    lines = figures.caption(photo.name, row[g.column], own if graded else None,
                                            row['gradable'], row['reasons'],
                                            net=f'{net}, {tag}' + (', fused' if fuse else ''))
                    converted = photo.converted[(g.crop_size, g.preprocessing)]
                    window = centre_crop(torch.from_numpy(converted).permute(2, 0, 1),
                                         g.input_size).to(torch.uint8).permute(1, 2, 0).numpy()
                    heat_map = outputs[id(g)].maps[i]
                    if fuse is not None:
                        heat_map = methods.fuse(heat_map[None], fused_in[i:i + 1])[0]
                    shown = methods.in_score_units(heatmap_method, heat_map[None],
                                                   outputs[id(g)].map_predictions[i:i + 1],
                                                   fused=fuse is not None)[0]
                    picture = heat_map_over_photo(photo.images[g.crop_size], shown,
                                                  photo.boxes[g.crop_size], g.crop_size,
                                                  window, lines,
                                                  figures.legend(heatmap_method, fuse is not None))
                    figures.save_picture(path, picture)
                    heat_maps.append(path)
                    if save_maps:
                        atomic.save_npy(path.with_suffix('.npy'), heat_map.numpy())
            bar.update(len(photos))
    columns = ['image', *[g.column for g in graders], 'mean', 'level']
    if blend and rows:
        if blend.per_patient:
            from retina.blend.reports import note_lone_eyes
            note_lone_eyes([r['image'] for r in rows], 'photographs',
                           lambda line: tqdm.write(line, file=sys.stderr))
        ungradable = {r['image'] for r in rows if r['gradable'] == 'no'}
        blended = blend.predict([r['image'] for r in rows], per_photo_features, graders,
                                without=ungradable if blend.per_patient else ())
        if blend.per_patient:
            alone = partners_of(ungradable, [r['image'] for r in rows])
            if alone:
                partner_note = (f'note: {len(alone)} eye(s) graded alone, their partner being '
                                f'ungradable (an ungradable eye never feeds the per-patient '
                                f'blend): {first_few(alone)}')
                tqdm.write(partner_note, file=sys.stderr)
        for row, score in zip(rows, blended):
            row['blend'] = float(score)
            row['level'] = int(to_levels([score], blend.thresholds)[0])
        columns = ['image', *[g.column for g in graders], 'mean', 'blend', 'level']
    if not grade_anyway:
        for row in rows:
            if row['gradable'] == 'no':
                row['level'] = None  # JSON null; an empty CSV cell
    notes = [partner_note] if blend and rows and blend.per_patient and alone else []
    if already:
        notes.append(f'note: {len(already)} photograph(s) arrived converted with a look '
                     f'already and were not given it again: {first_few(already)}')
        tqdm.write(notes[-1], file=sys.stderr)
    model, model_sha256 = model_identity(graders, blend)
    return Result(rows=rows, failed=failed, columns=[*columns, 'gradable', 'reasons'],
                  heat_maps=heat_maps, model=model, model_sha256=model_sha256,
                  notes=notes + ([f'note: {len(unread)} file(s) of other image formats not '
                                  f'graded: {first_few(unread)}'] if unread else []))


def partners_of(ungradable, names):
    """'10_right (partner 10_left)' for each gradable eye of `names` whose partner is among
    `ungradable`."""
    eyes = {patient_and_eye(name): name for name in names}
    out = []
    for name in names:
        patient, eye = patient_and_eye(name)
        partner = eyes.get((patient, {'left': 'right', 'right': 'left'}.get(eye)))
        if name not in ungradable and partner in ungradable:
            out.append(f'{name} (partner {partner})')
    return out


def model_identity(graders, blend=None):
    """('eyepacs-256', its sha256): what graded, for the outputs: each net's released name (by
    checksum) or weights file, then the blend's file, joined with '+', and their sha256s."""
    names, digests = [], []
    for grader in graders:
        name, digest = released.identify(grader.weights)
        names.append(name or str(grader.weights))
        digests.append(digest)
    if blend is not None:
        names.append(str(blend.path))
        digests.append(released.sha256_of(blend.path))
    return '+'.join(names), '+'.join(digests)


def level_cuts(graders, n_iter):
    """The cut-offs of the level column: a lone net's own (fitted on its validation photographs
    when it was released: `retina.publish.release`) for its centred window, else 0.5, 1.5, 2.5, 3.5
    (several nets averaged, or TTA, whose scores sit higher than the centred window's)."""
    return checkpoint.level_cuts([g.loaded for g in graders], n_iter)


def ungradable_note(result, grade_anyway=False):
    """One line naming the ungradable photographs and why, or '' when there are none."""
    from retina.core.errors import first_few
    bad = [f'{r["image"]} ({r["reasons"]})' for r in result.rows if r['gradable'] == 'no']
    if not bad:
        return ''
    what = 'graded anyway (--grade_anyway)' if grade_anyway else 'given no level'
    return (f'note: {len(bad)} of {len(result.rows)} photographs are ungradable, {what}: '
            f'{first_few(bad)}' + ('' if grade_anyway else '; --grade_anyway grades them'))


def format_csv(result):
    import csv
    import io
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    # The model on every row (two last columns), so a row copied elsewhere still says what
    # graded it, and any CSV reader parses the file (a comment line would not be)
    writer.writerow([*result.columns, 'model', 'model_sha256'])
    for row in result.rows:
        writer.writerow([f'{row[c]:.4f}' if isinstance(row[c], float) else csv_safe(row[c])
                         for c in result.columns] + [csv_safe(result.model), result.model_sha256])
    return buffer.getvalue()


def format_json(result, graders):
    nets = []
    for g in graders:
        name, digest = released.identify(g.weights)
        nets.append(dict(column=g.column, config=g.config.name, weights=str(g.weights),
                         model=name or str(g.weights), sha256=digest,
                         preprocessing=g.preprocessing, crop_size=g.crop_size))
    return json.dumps(dict(model=result.model, model_sha256=result.model_sha256, nets=nets,
                           images=result.rows, failed=result.failed, notes=result.notes),
                      indent=2) + '\n'


# --- a blend fitted by blend.py --------------------------------------------------------------

class LoadedBlend:
    """A blend saved by blend.py --predict, tied to the graders that compute its features."""

    def __init__(self, path):
        from retina.blend import fitted as fitted_blend
        self.path = Path(path)
        self.state = fitted_blend.load(path)
        self.thresholds = tuple(self.state['thresholds'])
        self.per_patient = self.state['per_patient']
        # The arithmetic transform.py computed the blend's features in (fp32 before it said)
        self.precision = ('bf16' if any(e.get('precision') == 'bf16'
                                        for e in fitted_blend.entries(self.state)) else 'fp32')
        self._grader_of = {}

    def nets(self):
        """(config name, weights path) of every net the blend's features came from."""
        from retina.blend import fitted as fitted_blend
        entries = fitted_blend.entries(self.state)
        return list(dict.fromkeys((e['cnf'], e['weights']) for e in entries))

    def feature_sets(self, graders):
        """{id(grader): [(n_iter, skip, sequence), ...]}: the TTA runs each grader must make for the
        blend; every feature file needs a grader of its config with the same weights."""
        from retina.blend import fitted as fitted_blend
        wanted = {}
        for index, entry in enumerate(fitted_blend.entries(self.state)):
            if entry['cnf'] is None:
                raise UserError(f'{self.path}: fitted on {entry["file"]}, which is not named '
                                f'like a transform.py feature file (CNF_train_mean_iter_N_skip_'
                                f'K.npy), so its features cannot be computed for new '
                                f'photographs; blend the files transform.py wrote')
            same_config = [g for g in graders if g.config.name == entry['cnf']]
            matching = [g for g in same_config if entry['fingerprint'] in (None, g.fingerprint)]
            if not matching:
                given = (f'the --weights_from given for {entry["cnf"]} are other weights'
                         if same_config else f'no --cnf {entry["cnf"]} was given')
                raise UserError(f'{self.path}: fitted on {entry["file"]}, features of '
                                f'{entry["cnf"]} with {entry["weights"] or "unrecorded weights"}, '
                                f'but {given}; pass --cnf {entry["cnf"]} --weights_from '
                                f'{entry["weights"] or "WEIGHTS"}')
            grader = matching[0]
            self._grader_of[index] = grader
            tta = fitted_blend.tta_of(entry)
            wanted.setdefault(id(grader), [])
            if tta not in wanted[id(grader)]:
                wanted[id(grader)].append(tta)
        return wanted

    def predict(self, names, per_photo_features, graders, without=()):
        """The blend's score per photograph (rows of `names`, features from `grade`); the
        photographs named in `without` never feed their partner eye's blend."""
        from retina.blend import fitted as fitted_blend
        entries = fitted_blend.entries(self.state)
        position = {id(entry): index for index, entry in enumerate(entries)}

        def features_of(entry):
            grader = self._grader_of[position[id(entry)]]
            key = (id(grader), fitted_blend.tta_of(entry))
            stat = 0 if entry['stat'] == 'mean' else 1
            return np.stack([photo[key][stat] for photo in per_photo_features])

        return fitted_blend.predict(self.state, features_of, names, without)
