"""Grade raw photographs in one command (predict.py): the run over folders, the heat maps over
the photographs, the outputs (CSV, JSON).

Each photograph goes through exactly what convert.py → transform.py → the net would do to it,
without writing a converted folder: `retina.grade.photos` decodes it, crops it to the eye and
gives it the look of the net's training images; `retina.grade.grader` scores it through
`retina.model.scoring` (the centred window of the net's input spec, or with `n_iter` > 1 the
same Halton augmentations as transform.py).  So the levels equal those of the converted-folder
route for the same photographs (tested).  A net's score is its output averaged over the
augmentations; `mean` averages the nets; `level` cuts the mean at the cut-offs of
`checkpoint.level_cuts`: a lone net's own on its centred window, else 0.5 … 3.5.

With a blend saved by blend.py --predict (`grader.LoadedBlend`), the features the blend was
fitted on (each config's mean/std over its own TTA iterations) are computed the same way, the
two eyes of a patient are paired by name ({patient}_{left|right}, an eye alone uses its own
features), and the blend's level per eye is reported.

`heatmap_dir` gets each net's heat map placed back over the *uncropped* photograph: the map
covers the net's window, which is mapped through the eye's box to photograph pixels.  The map
is any method of `retina.heatmaps.methods`, computed as ram.py computes it: the regression
activation map of a RAM net, or Grad-CAM or LayerCAM of any net, baseline nets included, at
its last conv or an earlier one; a second net's map can be fused in.
"""
import dataclasses
import json
import math
import os
import sys
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
from retina.data.images import collect_images, csv_safe, image_name
from retina.grade.grader import level_cuts, model_identity, name_columns, score_batch
from retina.grade.photos import UNSTABLE, load_photos, unstable
from retina.model import released
from retina.model.augment import centre_crop, centre_offsets

BATCH_SIZE = 8              # photographs decoded and scored together


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


def grade(graders, inputs, n_iter=1, blend=None, heatmap_dir=None, batch_size=BATCH_SIZE,
          progress=True, workers=None, grade_anyway=False, heatmap_method='ram',
          save_maps=False, heatmap_layer=None, heatmap_fuse=None, check_stability=False,
          heatmap_graders=None):
    """Grade the photographs of `inputs` (files and folders) with every grader; returns `Result`.

    `blend` is a `LoadedBlend` (its feature sets are computed too); `heatmap_dir`
    gets one PNG per photograph and net that makes maps of `heatmap_method`
    (retina.heatmaps.methods: 'ram' for RAM nets, 'gradcam' or 'layercam' for any, at conv
    `heatmap_layer` [default: the last]), and with
    `save_maps` the map itself beside it (.npy, the last conv's resolution).  `heatmap_fuse` (a
    `Grader`, not graded with) fuses its map into each net's as ram.py --fuse does
    (`methods.fuse`, on `methods.fusion_grid`), each net on its own converted image of the
    photograph (as ram.py --fuse_images).  `heatmap_graders` (some of `graders`): only they
    draw maps [default: every one that can].  Every row says whether the photograph is
    gradable and why not (`retina.data.gradability`); an ungradable one keeps its scores but gets
    no level, unless `grade_anyway`.  `check_stability`: each photograph is also re-saved as a
    JPEG of quality 75 and scored again; a level that moves by more than one is not given.
    """
    from retina.heatmaps import figures, methods
    unread = []
    photo_paths = collect_images(inputs, unread, keep_odd_names=True, what='photographs')
    if unread:  # named, never passed over in silence; by name, such a file is decoded by PIL
        tqdm.write(f'note: {len(unread)} file(s) not graded: of image formats predict.py does '
                   f'not take from folders (it takes {", ".join(IMAGE_EXTENSIONS)}): '
                   f'{first_few(unread)}; save them as PNG or JPEG, or name each file',
                   file=sys.stderr)
    name_columns(graders)
    cuts = level_cuts(graders, n_iter)
    ram_graders = [g for g in graders if (g.is_ram or heatmap_method != 'ram') and (
        heatmap_graders is None or any(g is h for h in heatmap_graders))] if heatmap_dir else []
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
    rows, failed, heat_maps, already, positions = [], [], [], [], []
    position = {path: i for i, path in enumerate(photo_paths)}
    ungradable = set()
    bar = tqdm(total=len(photo_paths), desc='grade', unit='photo', file=sys.stderr,
               disable=not progress or len(photo_paths) < 2, dynamic_ncols=True)
    with bar:
        for batch in patient_batches(photo_paths, batch_size):
            photos = load_photos(batch, needs, bool(ram_graders), failed, bar, workers,
                                 stability=check_stability)
            if not photos:
                continue
            outputs = {id(g): score_batch(g, photos, n_iter, feature_sets.get(id(g), ()),
                                          map_method=heatmap_method if g in ram_graders
                                          else None, map_layer=heatmap_layer,
                                          feature_precision=blend.precision if blend else 'fp32')
                       for g in graders}
            fused_in = score_batch(fuse, photos, 1, map_method=heatmap_method).maps \
                if fuse is not None else None
            batch_rows = []
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
                batch_rows.append(row)
            if blend:  # a patient's eyes share a batch (patient_batches): blended here, so
                # that each heat map's caption carries the level the photograph is given
                ungradable |= {r['image'] for r in batch_rows if r['gradable'] == 'no'}
                features = [{(id(g), tta): (stats[0][i], stats[1][i])
                             for g in graders for tta, stats in outputs[id(g)].features.items()}
                            for i in range(len(photos))]
                blended = blend.predict([r['image'] for r in batch_rows], features, graders,
                                        without=ungradable if blend.per_patient else ())
                for row, score in zip(batch_rows, blended):
                    row['blend'] = float(score)
                    row['level'] = int(to_levels([score], blend.thresholds)[0])
            rows += batch_rows
            positions += [position[photo.path] for photo in photos]
            for i, (photo, row) in enumerate(zip(photos, batch_rows)):
                for g in ram_graders:
                    title = g.config.name + (f'+{fuse.config.name}' if fuse else '')
                    tag = methods.method_tag(heatmap_method, heatmap_layer, net=g.net)
                    path = paths.heat_map(heatmap_dir, photo.name, title, False, tag)
                    graded = row['gradable'] == 'yes' or grade_anyway
                    net = figures.net_name(g.config.name, g.weights) + (
                        f' + {figures.net_name(fuse.config.name, fuse.weights)}' if fuse else '')
                    net += f', {tag}' + (', fused' if fuse else '')
                    if blend:  # the photograph's level and blended score; the net's own score
                        score, level, score_name = row['blend'], row['level'], 'blend score'
                        net += f'; its own score {row[g.column]:.2f}'
                    else:
                        score, score_name = row[g.column], 'score'
                        level = int(to_levels([score], level_cuts([g], n_iter))[0])
                    lines = figures.caption(photo.name, score, level if graded else None,
                                            row['gradable'], row['reasons'], net=net,
                                            score_name=score_name)
                    converted = photo.converted[(g.crop_size, g.preprocessing)]
                    window = centre_crop(torch.tensor(converted).permute(2, 0, 1),
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
    rows = [row for _, row in sorted(zip(positions, rows), key=lambda pair: pair[0])]
    columns = ['image', *[g.column for g in graders], 'mean', 'level']
    alone = []
    if blend and rows:
        if blend.per_patient:
            from retina.blend.reports import note_lone_eyes
            note_lone_eyes([r['image'] for r in rows], 'photographs',
                           lambda line: tqdm.write(line, file=sys.stderr))
            alone = partners_of(ungradable, [r['image'] for r in rows])
            if alone:
                partner_note = (f'note: {len(alone)} eye(s) graded alone, their partner being '
                                f'ungradable (an ungradable eye never feeds the per-patient '
                                f'blend): {first_few(alone)}')
                tqdm.write(partner_note, file=sys.stderr)
        columns = ['image', *[g.column for g in graders], 'mean', 'blend', 'level']
    if not grade_anyway:
        for row in rows:
            if row['gradable'] == 'no':
                row['level'] = None  # JSON null; an empty CSV cell
    notes = [partner_note] if alone else []
    if already:
        notes.append(f'note: {len(already)} photograph(s) arrived converted with a look '
                     f'already and were not given it again: {first_few(already)}')
        tqdm.write(notes[-1], file=sys.stderr)
    model, model_sha256 = model_identity(graders, blend)
    return Result(rows=rows, failed=failed, columns=[*columns, 'gradable', 'reasons'],
                  heat_maps=heat_maps, model=model, model_sha256=model_sha256,
                  notes=notes + ([f'note: {len(unread)} file(s) of other image formats not '
                                  f'graded: {first_few(unread)}'] if unread else []))


def patient_batches(photo_paths, batch_size):
    """`photo_paths` in batches of about `batch_size`, a patient's eyes ({patient}_left and
    _right) always in the same batch (the later eye moved up beside the first; one batch may
    then hold one more), so that a per-patient blend can be applied batch by batch."""
    by_patient = {}
    for path in photo_paths:
        by_patient.setdefault(patient_and_eye(image_name(path))[0], []).append(path)
    batch = []
    for group in by_patient.values():
        if batch and len(batch) + len(group) > batch_size:
            yield batch
            batch = []
        batch += group
    if batch:
        yield batch


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


