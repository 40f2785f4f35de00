"""predict.py on raw photographs, the fitted blend it applies, the ONNX export, the pictures.

The reference for predict.py is the converted-folder route: convert.py's
function on the same photographs, then the net on the centred window
(transform.py and blend.py for the blend).  Nets are untrained (random
weights): parity needs the same weights on both routes, not good ones.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SHARED_DATA, one_line_error, run_script
from retina.core.errors import UserError
from retina.model import checkpoint
from retina.model import config as config_module

RAM = 'c_128_5x5_32_ram'
BASELINE = 'c_128_4x4_32'


def quick_init(tensor, gain=1.0):
    """A scaled Gaussian in place of the orthogonal initialisation, whose QR decompositions take
    seconds for a 512-px net: parity tests need the same weights on both routes, not these."""
    with torch.no_grad():
        return tensor.normal_(0, gain / tensor[0].numel() ** 0.5)


def save_untrained(workdir, name, seed=0, **extra):
    """weights/NAME/weights.pt with random weights (`extra` goes into the checkpoint)."""
    config = config_module.load(name)
    torch.manual_seed(seed)
    path = workdir / 'weights' / name / 'weights.pt'
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.init, 'orthogonal_', quick_init)
        checkpoint.save(path, config.build_net(), config, epoch=0, **extra)
    return path


def converted_route_scores(workdir, photos, name, weights, crop_size=128, enhance='none',
                           extension='tiff'):
    """{image: score}: convert.py's function into a folder (lossless tiff unless `extension`
    says), then the net on the centred window, as train.py's predict and transform.py see it."""
    from retina.data.conversion import convert_folder
    from retina.model.augment import prepare_batch
    from retina.model.checkpoint import load_net
    folder = workdir / f'converted_{name}_{extension}'
    convert_folder(photos, folder, crop_size, extension, n_proc=1, progress=False,
                   preprocessing=enhance)
    loaded = load_net(config_module.load(name), weights, 'cpu')
    net = loaded.net
    scores = {}
    for path in sorted(folder.glob(f'*.{extension}')):
        image = torch.from_numpy(np.array(Image.open(path).convert('RGB'))).permute(2, 0, 1)
        with torch.no_grad():
            scores[path.stem] = float(net(prepare_batch(image[None], net.input_size,
                                                        constants=loaded.constants)))
    return scores


@pytest.fixture
def photos(synthetic_source, tmp_path):
    """Four raw test photographs, a lossless upright copy of one and the same copy stored
    rotated with an EXIF orientation tag that turns it upright."""
    folder = tmp_path / 'photos'
    folder.mkdir()
    for path in sorted((synthetic_source / 'test').glob('*.jpeg'))[:4]:
        shutil.copy(path, folder / path.name)
    upright = Image.open(sorted(folder.glob('*.jpeg'))[0]).convert('RGB')
    upright.save(tmp_path / 'upright.png')
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / 'rotated.png', exif=exif)
    return folder


def test_predict_grades_raw_photos_as_the_converted_route(photos, tmp_path):
    work = tmp_path
    weights = save_untrained(work, RAM)
    reference = converted_route_scores(work, photos, RAM, weights)
    (photos / 'broken.jpeg').write_bytes(b'not a photograph')
    result = run_script('predict.py', photos, work / 'upright.png', work / 'rotated.png',
                        '--cnf', RAM, '--weights_from', weights, '--json', '--output',
                        work / 'out.json', '--heatmap', work / 'maps', cwd=work, check=False)
    assert result.returncode == 1
    assert 'broken.jpeg' in result.stderr and '1 of 7 photographs' in result.stderr
    assert 'Traceback' not in result.stderr
    rows = {row['image']: row for row in json.loads((work / 'out.json').read_text())['images']}
    assert set(rows) == set(reference) | {'upright', 'rotated'}
    for name, score in reference.items():
        assert abs(rows[name][f'score_{RAM}'] - score) < 1e-4, name
        assert rows[name]['level'] == int(np.digitize(np.clip(score, 0, 4), [.5, 1.5, 2.5, 3.5]))
    # EXIF orientation applied: the rotated file is graded as the upright one.
    assert abs(rows['rotated']['mean'] - rows['upright']['mean']) < 1e-5
    # One heat map per photograph over the whole, uncropped photograph (at its own size, with
    # the caption above it and the colour bar beside it: figures.render)
    from retina.heatmaps import figures
    for name in rows:
        with Image.open(work / 'maps' / f'{name}_ram_{RAM}.png') as picture:
            left, top, right, bottom = figures.photo_box(picture)
            assert (right - left, bottom - top) == (300, 200)


@pytest.mark.skipif(not (SHARED_DATA / 'eyepacs_raw').is_dir(), reason='needs ../shared/data')
def test_predict_matches_the_converted_route_on_real_photographs(tmp_path):
    """Raw EyePACS photographs (1536 px wide) and a 512-px net: the same scores as
    convert.py at 512 px, then the net on the 448-px window."""
    from retina.grade.grader import load_grader
    from retina.grade.predict import grade
    name = 'c_512_5x5_32_ram'
    photos = tmp_path / 'raw'
    photos.mkdir()
    for path in sorted((SHARED_DATA / 'eyepacs_raw' / 'train').glob('*.jpeg'))[:3]:
        shutil.copy(path, photos / path.name)
    weights = save_untrained(tmp_path, name)
    reference = converted_route_scores(tmp_path, photos, name, weights, crop_size=512)
    result = grade([load_grader(name, weights, 'cpu')], [photos], progress=False)
    assert [row['image'] for row in result.rows] == sorted(reference)
    for row in result.rows:
        assert abs(row[f'score_{name}'] - reference[row['image']]) < 1e-4


def test_predict_applies_the_preprocessing_the_net_was_trained_with(photos, tmp_path):
    """A net trained on convert.py --enhance local_contrast images (recorded in its
    checkpoint) grades raw photographs enhanced the same way, in memory."""
    from retina.grade.grader import load_grader
    from retina.grade.predict import grade
    weights = save_untrained(tmp_path, RAM, preprocessing='local_contrast')
    reference = converted_route_scores(tmp_path, photos, RAM, weights, enhance='local_contrast')
    grader = load_grader(RAM, weights, 'cpu')
    assert grader.preprocessing == 'local_contrast'
    rows = grade([grader], [photos], progress=False).rows
    for row in rows:
        assert abs(row[f'score_{RAM}'] - reference[row['image']]) < 1e-4
    # The enhancement matters: without it the scores move.
    import dataclasses
    plain_grader = dataclasses.replace(
        grader, loaded=dataclasses.replace(grader.loaded, spec=dataclasses.replace(
            grader.loaded.spec, preprocessing='none')))
    plain = grade([plain_grader], [photos], progress=False).rows
    assert max(abs(a[f'score_{RAM}'] - b[f'score_{RAM}']) for a, b in zip(rows, plain)) > 1e-3


def test_a_net_trained_on_jpeg_conversions_grades_raw_photos_as_their_stored_jpegs(photos,
                                                                                   tmp_path):
    """A net trained on convert.py --extension jpeg images (the checkpoint records 'jpeg97')
    sees each raw photograph as that JPEG reads back, so predict.py's score is the score of the
    stored file transform.py and blend.py use; without the round trip the scores move."""
    import dataclasses

    from retina.grade.grader import load_grader
    from retina.grade.predict import grade
    weights = save_untrained(tmp_path, RAM, preprocessing='local_contrast', encoding='jpeg97')
    reference = converted_route_scores(tmp_path, photos, RAM, weights, enhance='local_contrast',
                                       extension='jpeg')
    grader = load_grader(RAM, weights, 'cpu')
    assert grader.spec.encoding == 'jpeg97'
    rows = grade([grader], [photos], progress=False).rows
    assert {row['image'] for row in rows} == set(reference)
    for row in rows:
        assert abs(row[f'score_{RAM}'] - reference[row['image']]) < 1e-4, row['image']
    lossless = dataclasses.replace(grader, loaded=dataclasses.replace(
        grader.loaded, spec=dataclasses.replace(grader.loaded.spec, encoding='none')))
    unstored = grade([lossless], [photos], progress=False).rows
    assert max(abs(a[f'score_{RAM}'] - b[f'score_{RAM}']) for a, b in zip(rows, unstored)) > 1e-4


def test_heat_map_lies_over_the_eye_in_the_photograph():
    from retina.grade.predict import heat_map_over_photo, window_in_photo
    from retina.heatmaps import figures
    # A 400 x 200 photo whose eye box is the square (100, 0, 300, 200), converted to 128 px;
    # the 112-px window is 8 converted px (12.5 photo px) inside the box on each side.
    window = window_in_photo((100, 0, 300, 200), 128, (112, 112))
    assert np.allclose(window, (112.5, 12.5, 287.5, 187.5))
    photo = Image.new('RGB', (400, 200), (0, 0, 0))
    ram = torch.zeros(6, 6)
    ram[0, 0] = 4.0  # evidence in the window's top-left cell only
    window = np.full((112, 112, 3), 120, np.uint8)  # all fundus
    picture = heat_map_over_photo(photo, ram, (100, 0, 300, 200), 128, window, ['x'], 'RAM')
    left, top, right, bottom = figures.photo_box(picture)
    assert (right - left, bottom - top) == (400, 200)   # the photograph at its own resolution
    drawn = np.asarray(picture)[top:bottom, left:right]
    interior = drawn[16:184, 116:284].astype(int).sum(axis=2)  # inside the window's outline
    assert interior[:20, :20].min() > 0          # the top-left cell is coloured ...
    assert interior[60:, :].max() == 0 and interior[:, 60:].max() == 0  # ... and only it
    assert drawn[:, :110].max() == 0 and drawn[:, 290:].max() == 0  # nothing outside the window


def test_no_colour_outside_the_eye_of_a_raw_photograph():
    """The eye off-centre in a wide photograph, a map strong everywhere: the surround, the
    box's corners and the window's corners beyond the eye's rim, keeps its own pixels."""
    from PIL import ImageDraw
    from scipy import ndimage

    from retina.grade.predict import heat_map_over_photo
    from retina.heatmaps import figures
    photo = Image.new('RGB', (600, 400), (0, 0, 0))
    ImageDraw.Draw(photo).ellipse((200, 0, 600, 400), fill=(190, 100, 50))
    window = np.full((112, 112, 3), 120, np.uint8)
    picture = heat_map_over_photo(photo, torch.full((6, 6), 4.0), (200, 0, 600, 400), 128, window,
                                  ['x'], 'RAM')
    left, top, right, bottom = figures.photo_box(picture)
    drawn = np.asarray(picture)[top:bottom, left:right].astype(int)
    eye = np.asarray(photo).max(axis=2) > 0
    outside = ~ndimage.binary_dilation(eye, iterations=2)
    outline = np.zeros_like(eye)
    outline[:, 220:227] = outline[:, 573:580] = outline[20:27, :] = outline[373:380, :] = True
    assert (drawn[outside & ~outline] == 0).all(), 'colour outside the eye'
    assert (np.abs(drawn - np.asarray(photo)).max(axis=2)[ndimage.binary_erosion(eye, iterations=30)]
            > 20).all()


@pytest.mark.parametrize('method, layer, grid', [('ram', None, 6), ('gradcam', None, 6),
                                                ('layercam', 'conv5', 14)])
def test_ram_py_and_predict_py_draw_the_same_map_of_a_photograph(photos, tmp_path, method, layer,
                                                                  grid):
    """One renderer: the map predict.py draws over a raw photograph is the map ram.py draws
    over convert.py's image of it (saved by both with --save_maps), for each method and at an
    earlier layer, drawn by `figures.render` on the one scale with the same legend; and the
    ONNX export's `ram` output is that map too."""
    from retina.heatmaps import figures
    work = tmp_path
    weights = save_untrained(work, RAM)
    from retina.data.conversion import convert_folder
    convert_folder(photos, work / 'converted', 128, 'tiff', n_proc=1, progress=False)
    at_layer = ['--layer', layer] if layer else []
    run_script('ram.py', '--cnf', RAM, '--weights_from', weights, '--method', method, *at_layer,
               '--images', work / 'converted', '--output_dir', work / 'ram_maps', '--save_maps',
               '--no_progress', cwd=work)
    run_script('predict.py', photos, '--cnf', RAM, '--weights_from', weights, '--heatmap',
               work / 'predict_maps', '--method', method, *at_layer, '--save_maps', '--output',
               work / 'grades.csv', cwd=work)
    names = sorted(p.stem for p in photos.glob('*.jpeg'))
    tag = method + (f'-{layer}' if layer else '')
    for name in names:
        drawn_by_ram = np.load(work / 'ram_maps' / f'{name}_{tag}_{RAM}.npy')
        drawn_by_predict = np.load(work / 'predict_maps' / f'{name}_{tag}_{RAM}.npy')
        assert drawn_by_ram.shape == drawn_by_predict.shape == (grid, grid)
        np.testing.assert_allclose(drawn_by_predict, drawn_by_ram, rtol=1e-4, atol=1e-5)
        assert np.abs(drawn_by_ram).max() > 0
        # One renderer: the same scale and legend on both pictures, the
        # photograph at its own size (predict.py) or the window at 1024 px (ram.py).
        with Image.open(work / 'ram_maps' / f'{name}_{tag}_{RAM}.png') as by_ram, \
                Image.open(work / 'predict_maps' / f'{name}_{tag}_{RAM}.png') as by_predict, \
                Image.open(photos / f'{name}.jpeg') as photo:
            for key in ('retina.scale', 'retina.legend'):
                assert by_ram.text[key] == by_predict.text[key], key
            assert by_ram.text['retina.scale'] == '0..4'
            left, top, right, bottom = figures.photo_box(by_ram)
            assert right - left == bottom - top == figures.PICTURE_SIZE
            left, top, right, bottom = figures.photo_box(by_predict)
            assert (right - left, bottom - top) == photo.size
    if method == 'ram':  # the ONNX graph computes it with the same function
        from retina.grade.grader import load_grader
        from retina.publish.export import ExportedNet
        grader = load_grader(RAM, weights, 'cpu')
        image = np.array(Image.open(work / 'converted' / f'{names[0]}.tiff').convert('RGB'))
        with torch.no_grad():
            _, ram = ExportedNet(grader.net, grader.spec, True, 128)(
                torch.from_numpy(image)[None])
        np.testing.assert_allclose(
            ram[0].numpy(), np.load(work / 'ram_maps' / f'{names[0]}_ram_{RAM}.npy'),
            rtol=1e-4, atol=1e-5)


def test_predict_fuses_two_nets_as_ram_py_does(photos, tmp_path):
    """predict.py --fuse (a 256-px net and the 53x53 fine net, each on its own conversion of the
    raw photograph) gives ram.py --fuse --fuse_images's map of convert.py's images, on the fine
    grid; both pictures on the one scale."""
    from retina.data.conversion import convert_folder
    big, fine = 'c_256_5x5_32_ram', 'c_128_5x5_32_ram_fine'
    big_weights, fine_weights = save_untrained(tmp_path, big), save_untrained(tmp_path, fine, seed=1)
    for size in (256, 128):
        convert_folder(photos, tmp_path / f'converted_{size}', size, 'tiff', n_proc=1, progress=False)
    run_script('ram.py', '--cnf', big, '--weights_from', big_weights, '--fuse', fine,
               '--fuse_weights', fine_weights, '--fuse_images', tmp_path / 'converted_128',
               '--images', tmp_path / 'converted_256', '--output_dir', tmp_path / 'ram_maps',
               '--save_maps', '--no_progress', cwd=tmp_path)
    run_script('predict.py', photos, '--weights_from', big_weights, '--heatmap',
               tmp_path / 'predict_maps', '--fuse', fine, '--fuse_weights', fine_weights,
               '--save_maps', '--output', tmp_path / 'grades.csv', '--no_progress', cwd=tmp_path)
    names = sorted(p.stem for p in photos.glob('*.jpeg'))
    for name in names:
        stem = f'{name}_ram_{big}+{fine}'
        by_ram = np.load(tmp_path / 'ram_maps' / f'{stem}.npy')
        by_predict = np.load(tmp_path / 'predict_maps' / f'{stem}.npy')
        assert by_ram.shape == by_predict.shape == (53, 53)
        np.testing.assert_allclose(by_predict, by_ram, rtol=1e-4, atol=1e-5)
        assert 0 <= by_ram.min() and by_ram.max() <= 2 and by_ram.max() > 1   # two [0, 1] maps
        with Image.open(tmp_path / 'ram_maps' / f'{stem}.png') as a, \
                Image.open(tmp_path / 'predict_maps' / f'{stem}.png') as b:
            assert a.text['retina.legend'] == b.text['retina.legend']
            assert 'sum of two nets' in b.text['retina.legend']
    refused = run_script('predict.py', photos, '--fuse', fine, cwd=tmp_path, check=False)
    assert refused.returncode != 0 and 'add --heatmap' in refused.stderr


def test_a_released_model_draws_its_measured_best_map_by_default(photos, tmp_path):
    """predict.py --heatmap with eyepacs-256 and no --method draws the map bench/
    heatmap_default.md chose for it (and says so); --method ram draws its RAM alone."""
    from retina.heatmaps import RELEASED_DEFAULT_MAPS
    from retina.model import released
    chosen = RELEASED_DEFAULT_MAPS['eyepacs-256']
    models = released.index()['models']
    title = models['eyepacs-256']['config'] + (f'+{models[chosen["fuse"]]["config"]}'
                                               if chosen['fuse'] else '')
    tag = chosen['method'] + (f'-{chosen["layer"]}' if chosen['layer'] else '')
    result = run_script('predict.py', photos, '--weights_from', 'eyepacs-256', '--heatmap',
                        tmp_path / 'maps', '--output', tmp_path / 'g.csv', '--no_progress',
                        cwd=tmp_path)
    assert 'bench/heatmap_default.md' in result.stderr
    assert len(list((tmp_path / 'maps').glob(f'*_{tag}_{title}.png'))) == 4
    run_script('predict.py', photos, '--weights_from', 'eyepacs-256', '--heatmap',
               tmp_path / 'ram_maps', '--method', 'ram', '--output', tmp_path / 'g.csv',
               '--no_progress', cwd=tmp_path)
    assert len(list((tmp_path / 'ram_maps').glob('*_ram_c_256_5x5_32_ram.png'))) == 4


def test_the_default_chain_draws_its_fast_nets_measured_map_captioned_with_the_chains_level(
        photos, tmp_path):
    """predict.py --heatmap with the released default chain draws one map a photograph: its
    fast net's measured best (RELEASED_DEFAULT_MAPS), captioned with the level and blended
    score the grades give; --method ram draws each net's RAM."""
    from retina.heatmaps import RELEASED_DEFAULT_MAPS
    from retina.model import released
    index = released.index()
    chain = index['models'][index['default']]
    fast = chain['fast']
    chosen = RELEASED_DEFAULT_MAPS[fast]
    title = index['models'][fast]['config'] + (
        f'+{index["models"][chosen["fuse"]]["config"]}' if chosen['fuse'] else '')
    result = run_script('predict.py', photos, '--heatmap', tmp_path / 'maps', '--json',
                        '--no_progress', cwd=tmp_path)
    assert f'its fast net {fast}' in result.stderr
    maps = sorted((tmp_path / 'maps').glob('*.png'))
    assert [p.name for p in maps] == sorted(f'{p.stem}_{chosen["method"]}_{title}.png'
                                            for p in photos.glob('*.jpeg'))
    for row in json.loads(result.stdout)['images']:
        with Image.open(tmp_path / 'maps' / f'{row["image"]}_{chosen["method"]}_{title}.png') as m:
            first = m.text['retina.caption'].splitlines()[0]
        level = f'level {row["level"]}' if row['level'] is not None else 'no level'
        assert first == f'{row["image"]}: {level} (blend score {row["blend"]:.2f})'
    run_script('predict.py', photos, '--heatmap', tmp_path / 'ram_maps', '--method', 'ram',
               '--output', tmp_path / 'g.csv', '--no_progress', cwd=tmp_path)
    drawn = {p.name.split('_ram_', 1)[1] for p in (tmp_path / 'ram_maps').glob('*.png')}
    assert drawn == {f'{index["models"][n]["config"]}.png' for n in chain['nets']}


def test_patient_batches_keep_a_patients_eyes_together():
    from retina.grade.predict import patient_batches
    names = ['1_left', '2_left', '3_left', '1_right', '4_left', '2_right', 'x', '5_left']
    batches = list(patient_batches([f'/p/{n}.jpeg' for n in names], 3))
    assert [p for b in batches for p in b] == [f'/p/{n}.jpeg' for n in (
        '1_left', '1_right', '2_left', '2_right', '3_left', '4_left', 'x', '5_left')]
    assert batches[0] == ['/p/1_left.jpeg', '/p/1_right.jpeg']  # 2_* would make four
    assert all(len(b) <= 3 for b in batches) and sum(map(len, batches)) == len(names)


def test_predict_heatmap_of_a_baseline_net_needs_a_gradient_method(photos, tmp_path):
    weights = save_untrained(tmp_path, BASELINE)
    refused = run_script('predict.py', photos, '--cnf', BASELINE, '--weights_from', weights,
                         '--heatmap', tmp_path / 'maps', cwd=tmp_path, check=False)
    assert refused.returncode != 0 and '--method gradcam or layercam' in refused.stderr
    run_script('predict.py', photos, '--cnf', BASELINE, '--weights_from', weights, '--heatmap',
               tmp_path / 'maps', '--method', 'layercam', '--output', tmp_path / 'g.csv',
               cwd=tmp_path)
    assert len(list((tmp_path / 'maps').glob(f'*_layercam_{BASELINE}.png'))) == 4


def test_blend_saved_by_blend_py_gives_predict_the_submission_levels(workdir, synthetic_source):
    """transform.py's and blend.py's functions (--predict --scores --per_patient) on converted
    images; predict.py --blend on the raw test photos gives the submission's scores and levels.
    The features use the original's TTA sequence (not the default): predict.py must follow
    the sequence recorded beside them."""
    from retina.blend.blending import run_blend
    from retina.data.conversion import convert_folder
    from retina.features.extract import extract_features
    from retina.model.checkpoint import load_net
    weights = save_untrained(workdir, RAM)
    data = workdir / 'data'
    convert_folder(synthetic_source / 'test', data / 'test_lossless', 128, 'tiff', n_proc=1,
                   progress=False)
    config, files = config_module.load(RAM), []
    loaded = load_net(config, weights, 'cpu')
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)  # the pipeline's relative data/ and weights/ paths
        for split, folder in (('train', data / 'train_tiny'), ('test', data / 'test_lossless')):
            made = extract_features(config, loaded, folder, split, n_iter=2, progress=False,
                                    echo=lambda *a: None, weights=str(weights.relative_to(workdir)),
                                    sequence='halton')
            files += [made['mean'], made['std']] if split == 'train' else []
        result = run_blend({'features': files}, labels_file=data / 'trainLabels.csv',
                           per_patient=True, predict=True, test_dir=data / 'test_lossless',
                           optimize_thresholds=True, output=data / 'sub.csv', scores=True,
                           echo=lambda *a: None)
    assert result.submission.fitted_blend == data / 'sub_blend.pt'
    assert (data / 'blend' / 'features_confusion.png').is_file()
    lines = (data / 'sub.csv').read_text().split()
    assert lines[0] == 'image,level,score'
    submission = {name: (int(level), float(score))
                  for name, level, score in (line.split(',') for line in lines[1:])}
    assert len(set(level for level, _ in submission.values())) > 1  # not a trivial match

    import predict as predict_script  # in this process: the script's own run is tested above
    out = invoke(predict_script, [synthetic_source / 'test', '--blend', 'data/sub_blend.pt',
                                  '--per_patient', '--json', '--no_progress'], workdir)
    assert out.exit_code == 0, out.output
    rows = {row['image']: row for row in json.loads(out.stdout)['images']}
    assert set(rows) == set(submission)
    for name, (level, score) in submission.items():
        assert abs(rows[name]['blend'] - score) < 2e-4, name
        assert rows[name]['level'] == level, name

    # An ungradable eye (a black frame) never feeds its partner's blend: the partner is graded
    # as if alone, with a note (issue 29, row 3)
    import shutil
    from PIL import Image
    pair = sorted(n for n in submission if n.endswith('_left') and n[:-5] + '_right' in submission)[0]
    partner = pair[:-5] + '_right'
    source = next((synthetic_source / 'test').glob(f'{partner}.*'))
    for folder, with_black in (('with_black', True), ('alone', False)):
        (workdir / folder).mkdir()
        shutil.copy(source, workdir / folder / source.name)
        if with_black:
            Image.new('RGB', (300, 200)).save(workdir / folder / f'{pair}.png')
    graded = {}
    for folder in ('with_black', 'alone'):
        result = run_script('predict.py', folder, '--blend', 'data/sub_blend.pt', '--per_patient',
                            '--json', '--no_progress', cwd=workdir)
        graded[folder] = {r['image']: r for r in json.loads(result.stdout)['images']}
        if folder == 'with_black':
            assert graded[folder][pair]['gradable'] == 'no'
            assert 'graded alone, their partner being ungradable' in result.stderr
            assert f'{partner} (partner {pair})' in result.stderr
    # the same blend as alone: a black partner's features would move it by far more than
    # the float32 rounding of a batch of two photographs against a batch of one (~4e-6)
    assert abs(graded['with_black'][partner]['blend'] - graded['alone'][partner]['blend']) < 1e-4
    assert graded['with_black'][partner]['level'] == graded['alone'][partner]['level']

    from retina.grade.grader import LoadedBlend, load_grader
    loaded = LoadedBlend(data / 'sub_blend.pt')
    assert loaded.nets() == [(RAM, str(weights.relative_to(workdir)))]
    other = save_untrained(workdir, RAM, seed=1).rename(workdir / 'other.pt')
    with pytest.raises(UserError, match='other weights'):
        loaded.feature_sets([load_grader(RAM, other)])


def invoke(script_module, args, cwd):
    """Run a click script in this process (for quick checks of refusals); returns the result."""
    from click.testing import CliRunner
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        return CliRunner().invoke(script_module.main, [str(a) for a in args])


def test_predict_refuses_bad_options_in_one_line(tmp_path, photos):
    import predict as predict_script
    weights = save_untrained(tmp_path, RAM)
    for args, message in (
            # (with nets named: a released chain default is itself fitted per patient)
            ([photos, '--per_patient', '--cnf', RAM, '--weights_from', weights], '--blend'),
            ([photos, '--fast', '--cnf', RAM, '--weights_from', weights],
             'not go with --cnf, --weights_from or --blend'),
            ([photos, '--cnf', RAM, '--cnf', RAM, '--weights_from', weights],
             'one --weights_from per --cnf'),
            ([tmp_path / 'nowhere'], 'no such file or folder'),
            ([photos, '--cnf', RAM, '--weights_from', weights, '--heatmap', tmp_path / 'm',
              '--cnf', BASELINE, '--weights_from', save_untrained(tmp_path, BASELINE),
              '--blend', tmp_path / 'missing.pt'], 'no such blend file'),
            ([photos, '--cnf', RAM, '--weights_from', weights, '--layer', 'conv5'], 'add --heatmap'),
            ([photos, '--cnf', RAM, '--weights_from', weights, '--heatmap', tmp_path / 'm',
              '--layer', 'conv5'], '--layer is for --method gradcam or layercam'),
            ([photos, '--cnf', RAM, '--weights_from', weights, '--heatmap', tmp_path / 'm',
              '--method', 'layercam', '--layer', 'conv99'], 'no such conv layer; use one of')):
        result = invoke(predict_script, args, tmp_path)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_onnx_export_matches_torch(synthetic_source, tmp_path):
    """The CLI on a RAM net (score and map), the module on a baseline net (RMS pool, maxout);
    compared on real photographs where they are present."""
    pytest.importorskip('onnxruntime')
    import onnx

    from retina.grade.grader import load_grader
    from retina.publish import export
    real = SHARED_DATA / 'eyepacs_raw' / 'train'
    sources = sorted(real.glob('*.jpeg'))[:3] if real.is_dir() else [synthetic_source / 'test']
    weights = save_untrained(tmp_path, RAM)
    result = subprocess.run([sys.executable, '-m', 'retina.export', '--cnf', RAM,
                             '--weights_from', str(weights), '--output', 'net.onnx',
                             *[a for s in sources for a in ('--check_images', str(s))]],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert result.returncode == 0, result.stderr
    assert 'N×128×128×3' in result.stdout
    printed = result.stdout.split('|difference|')[1]
    differences = dict(re.findall(r'(score|ram) ([0-9.e+-]+)', printed))
    assert set(differences) == {'score', 'ram'}
    assert max(float(v) for v in differences.values()) < 1e-4, result.stdout
    model = onnx.load(tmp_path / 'net.onnx')
    assert [i.name for i in model.graph.input] == ['image']
    assert [o.name for o in model.graph.output] == ['score', 'ram']

    grader = load_grader(BASELINE, save_untrained(tmp_path, BASELINE), 'cpu')
    wrapped = export.export(grader, tmp_path / 'baseline.onnx')
    images, _ = export.check_images(grader, sources, limit=3)
    differences = export.check(wrapped, tmp_path / 'baseline.onnx', images)
    assert set(differences) == {'score'} and differences['score'] < 1e-4


def test_pictures_curves_and_confusion_matrix(tmp_path):
    from retina.core import plots
    rows = [dict(epoch=str(e), train_loss=str(1 / e), valid_loss='nan' if e == 1 else str(2 / e),
                 valid_kappa=str(e / 10), lr='0.003') for e in range(1, 6)]
    plots.training_curves(rows, tmp_path / 'curves.png', 'c')
    plots.confusion_matrix(np.diag([5, 1, 2, 0, 1]), tmp_path / 'confusion.png', 'run')
    for name in ('curves.png', 'confusion.png'):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == 'PNG' and picture.width > 300


def test_few_validation_images_carry_a_warning():
    from retina.core.metrics import few_images_warning
    assert 'only 8 validation images' in few_images_warning(8)
    assert few_images_warning(20) == ''


def test_export_help_explains_every_option():
    from click.testing import CliRunner

    from retina.publish import export
    result = CliRunner().invoke(export.main, ['--help'])
    assert result.exit_code == 0 and 'N×S×S×3' in result.output
    blocks = re.split(r'\n(?=  \S)', result.output.split('Options:')[1].strip('\n'))
    assert len(blocks) >= 7
    for block in blocks:
        assert len(block.split()) >= 4, f'option without help: {block!r}'


def test_a_blend_of_files_not_named_by_transform_py_is_refused_by_predict(tmp_path):
    from retina.blend import fitted as fitted_blend
    from retina.grade.grader import LoadedBlend
    entry = fitted_blend.describe_file(tmp_path / 'my_features.npy')
    assert entry['cnf'] is None  # blend.py still saves it
    run = dict(name='run', files=[entry], mean=torch.zeros(3), scale=torch.ones(3), nets=[],
               n_inputs=3)
    fitted_blend.save(tmp_path / 'b.pt', [run], per_patient=False, thresholds=(.5, 1.5, 2.5, 3.5))
    with pytest.raises(UserError, match='my_features.npy, which is not named like'):
        LoadedBlend(tmp_path / 'b.pt').feature_sets([])
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    with pytest.raises(UserError, match='not a readable blend file'):
        LoadedBlend(tmp_path / 'junk.pt')
    # A blend is read as safely as a checkpoint: compressed entries (which torch.save never
    # writes, and which could inflate to gigabytes) are refused before anything is read.
    import zipfile
    with zipfile.ZipFile(tmp_path / 'b.pt') as source, \
            zipfile.ZipFile(tmp_path / 'packed.pt', 'w', zipfile.ZIP_DEFLATED) as packed:
        for info in source.infolist():
            packed.writestr(info.filename, source.read(info.filename))
    with pytest.raises(UserError, match=r'packed.pt: refused to load: .* is compressed.*_blend'):
        LoadedBlend(tmp_path / 'packed.pt')


def test_predict_never_writes_over_its_inputs_nor_maps_into_a_graded_folder(tmp_path, photos):
    import predict as predict_script
    weights = save_untrained(tmp_path, RAM)
    photo = sorted(photos.glob('*.jpeg'))[0]
    before = {p: p.read_bytes() for p in (photo, weights)}
    for args, message in (
            ([photos, '--cnf', RAM, '--weights_from', weights, '--output', photo],
             'one of the inputs'),
            ([photo, '--cnf', RAM, '--weights_from', weights, '--output', weights],
             'one of the inputs'),
            ([photos, '--cnf', RAM, '--weights_from', weights, '--heatmap', photos],
             'a folder being graded'),
            ([photo, '--cnf', RAM, '--weights_from', weights, '--heatmap', photos / '.'],
             'a folder being graded')):
        result = invoke(predict_script, args, tmp_path)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # An --n_iter past transform.py's cap is refused by the option itself (click's usage error).
    result = invoke(predict_script, [photo, '--cnf', RAM, '--weights_from', weights,
                                     '--n_iter', 10 ** 30], tmp_path)
    assert result.exit_code == 2 and "'--n_iter'" in result.stderr and '10000' in result.stderr
    assert all(p.read_bytes() == content for p, content in before.items())
    assert list(photos.glob('*.png')) == []


def test_names_that_a_spreadsheet_would_run_as_formulas_are_escaped(tmp_path, photos):
    from retina.blend.submission import write_submission
    weights = save_untrained(tmp_path, RAM)
    source = sorted(photos.glob('*.jpeg'))[0]
    folder = tmp_path / 'odd'
    folder.mkdir()
    for name in ('=HYPERLINK("x")_left', '+1_left', '-2_right', '@sum_left', 'plain_left'):
        shutil.copy(source, folder / f'{name}.jpeg')
    out = tmp_path / 'grades.csv'
    run_script('predict.py', folder, '--cnf', RAM, '--weights_from', weights, '--output', out,
               '--no_progress', cwd=tmp_path)
    import csv
    cells = [row[0] for row in csv.reader(open(out))][1:]
    assert sorted(cells) == sorted(["'+1_left", "'-2_right", '\'=HYPERLINK("x")_left',
                                    "'@sum_left", 'plain_left'])
    scores = [row[1] for row in csv.reader(open(out))][1:]
    assert all(float(s) == float(s) for s in scores)  # numbers stay numbers, negative ones too
    written = write_submission(tmp_path / 'sub.csv', ['=1_left', '2_left'], [0, 1])
    assert written.read_text().splitlines()[1:] == ["'=1_left,0", '2_left,1']


def test_odd_entries_of_a_folder_are_named_and_the_rest_graded(tmp_path, photos):
    weights = save_untrained(tmp_path, RAM)
    (photos / 'gone_left.jpeg').symlink_to(tmp_path / 'nowhere.jpeg')
    (photos / 'loop_left.jpeg').symlink_to(photos / 'loop_left.jpeg')
    os.mkfifo(photos / 'pipe_left.jpeg')
    (photos / 'folder_left.jpg').mkdir()
    result = run_script('predict.py', photos, '--cnf', RAM, '--weights_from', weights,
                        '--no_progress', cwd=tmp_path, check=False, timeout=120)
    assert result.returncode == 1, result.stderr
    graded = [line.split(',')[0] for line in result.stdout.strip().splitlines()[1:]]
    assert len(graded) == 4 and not any(n.startswith(('gone', 'loop', 'pipe', 'folder'))
                                        for n in graded)
    for name in ('gone_left.jpeg', 'loop_left.jpeg', 'pipe_left.jpeg', 'folder_left.jpg'):
        assert f'{name}: not a photograph file' in result.stderr, result.stderr
    assert '4 of 8 photographs could not be graded' in result.stderr
    assert 'Traceback' not in result.stderr


def test_onnx_records_the_look_it_needs_and_checks_its_images_before_writing(tmp_path):
    pytest.importorskip('onnxruntime')
    import onnx
    weights = save_untrained(tmp_path, RAM, preprocessing='local_contrast')
    empty = tmp_path / 'empty'
    empty.mkdir()
    result = subprocess.run([sys.executable, '-m', 'retina.export', '--cnf', RAM,
                             '--weights_from', str(weights), '--output', 'net.onnx',
                             '--check_images', str(empty)], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert result.returncode == 2 and 'no images found' in result.stderr, result.stderr
    assert not (tmp_path / 'net.onnx').exists()
    result = subprocess.run([sys.executable, '-m', 'retina.export', '--cnf', RAM,
                             '--weights_from', str(weights), '--output', 'net.onnx'],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert result.returncode == 0, result.stderr
    meta = {p.key: p.value for p in onnx.load(tmp_path / 'net.onnx').metadata_props}
    assert meta['retina.preprocessing'] == 'local_contrast' and meta['retina.crop_size'] == '128'
    assert meta['retina.window'] == '112x112' and meta['retina.config'] == RAM
    assert [float(v) for v in meta['retina.mean'].split(',')] == pytest.approx(
        [108.64628601, 75.86886597, 54.34005737], rel=1e-5)


def test_a_link_loop_is_named_and_the_rest_graded_with_output_and_heatmap(tmp_path, photos):
    weights = save_untrained(tmp_path, RAM)
    (photos / 'a_left.jpeg').symlink_to(photos / 'b_left.jpeg')
    (photos / 'b_left.jpeg').symlink_to(photos / 'a_left.jpeg')
    result = run_script('predict.py', photos, '--cnf', RAM, '--weights_from', weights,
                        '--output', tmp_path / 'grades.csv', '--heatmap', tmp_path / 'maps',
                        '--no_progress', cwd=tmp_path, check=False, timeout=120)
    assert result.returncode == 1 and 'unexpected' not in result.stderr, result.stderr
    for name in ('a_left.jpeg', 'b_left.jpeg'):
        assert f'{name}: not a photograph file' in result.stderr, result.stderr
    assert '2 of 6 photographs could not be graded' in result.stderr
    assert len((tmp_path / 'grades.csv').read_text().splitlines()) == 5
    assert len(list((tmp_path / 'maps').glob('*.png'))) == 4


def test_a_bad_name_in_a_folder_or_an_unreadable_file_by_name_fails_alone(tmp_path, photos):
    weights = save_untrained(tmp_path, RAM)
    shutil.copy(sorted(photos.glob('*.jpeg'))[0], photos / 'two\nlines_left.jpeg')
    (tmp_path / 'gone_left.jpeg').symlink_to(tmp_path / 'nowhere.jpeg')
    os.mkfifo(tmp_path / 'pipe_left.jpeg')
    result = run_script('predict.py', photos, tmp_path / 'gone_left.jpeg',
                        tmp_path / 'pipe_left.jpeg', tmp_path / 'upright.png', '--cnf', RAM,
                        '--weights_from', weights, '--no_progress', cwd=tmp_path, check=False,
                        timeout=120)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    graded = [line.split(',')[0] for line in result.stdout.strip().splitlines()[1:]]
    assert len(graded) == 5 and 'upright' in graded, result.stdout
    assert "'" + str(photos / 'two\\nlines_left.jpeg') + "': the name holds a line break" \
        in result.stderr, result.stderr
    for name in ('gone_left.jpeg', 'pipe_left.jpeg'):
        assert f'{name}: not a photograph file' in result.stderr
    assert '3 of 8 photographs could not be graded' in result.stderr
    # A typing error is still refused before any net is loaded.
    missing = run_script('predict.py', tmp_path / 'typo.jpeg', '--cnf', RAM, '--weights_from',
                         weights, cwd=tmp_path, check=False)
    assert missing.returncode == 2 and 'no such file or folder' in missing.stderr


def test_other_image_formats_in_a_folder_are_named_not_passed_over(tmp_path, photos):
    weights = save_untrained(tmp_path, RAM)
    source = Image.open(sorted(photos.glob('*.jpeg'))[0])
    for ending in ('bmp', 'webp', 'gif'):
        source.save(photos / f'other_left.{ending}' if ending == 'bmp' else
                    photos / f'{ending}_left.{ending}')
    result = run_script('predict.py', photos, '--cnf', RAM, '--weights_from', weights,
                        '--no_progress', cwd=tmp_path)
    notes = [line for line in result.stderr.splitlines() if 'not graded' in line]
    assert len(notes) == 1, result.stderr
    for name in ('other_left.bmp', 'webp_left.webp', 'gif_left.gif'):
        assert name in notes[0]
    assert len(result.stdout.strip().splitlines()) == 5
    # Named by itself, such a file is decoded (PIL reads it) and graded.
    alone = run_script('predict.py', photos / 'other_left.bmp', '--cnf', RAM, '--weights_from',
                       weights, '--no_progress', cwd=tmp_path)
    assert alone.stdout.splitlines()[1].startswith('other_left,')
    only = tmp_path / 'only_bmp'
    only.mkdir()
    shutil.copy(photos / 'other_left.bmp', only)
    one_line_error(run_script('predict.py', only, '--cnf', RAM, '--weights_from', weights,
                              cwd=tmp_path, check=False), 'no images found', 'other_left.bmp')


def test_photographs_converted_with_the_look_already_are_not_given_it_twice(tmp_path, photos):
    import csv
    import io

    from retina.data import crop
    from retina.data.conversion import convert_folder
    from retina.grade.photos import prepare_photo
    weights = save_untrained(tmp_path, RAM, preprocessing='local_contrast')
    converted = tmp_path / 'converted'
    convert_folder(photos, converted, 128, 'png', n_proc=1, progress=False,
                   preprocessing='local_contrast')
    bare = tmp_path / 'bare'  # the same images without their conversion.json
    bare.mkdir()
    for path in converted.glob('*.png'):
        shutil.copy(path, bare)
    outputs = {}
    for folder, told in ((converted, 'conversion.json'), (bare, 'its statistics')):
        result = run_script('predict.py', folder, '--cnf', RAM, '--weights_from', weights,
                            '--grade_anyway', '--no_progress', cwd=tmp_path)
        notes = [line for line in result.stderr.splitlines() if 'not given it again' in line]
        assert len(notes) == 1 and f'local_contrast, by {told}' in notes[0], result.stderr
        outputs[folder] = result.stdout
    assert outputs[converted] == outputs[bare]
    # What the net sees is the converted image cropped again, not enhanced a second time.
    path = sorted(converted.glob('*.png'))[0]
    photo = prepare_photo(path, {(128, 'local_contrast')})
    image = crop.load_for_crop(path, 128)
    again = np.asarray(crop.crop_to_eye(image, 128, crop.find_eye_box_fast(image)))
    assert np.array_equal(photo.converted[(128, 'local_contrast')], again)
    # A net trained on plain photographs cannot grade them: each is ungradable, and says why.
    plain = save_untrained(tmp_path / 'plain', RAM)
    rows = list(csv.DictReader(io.StringIO(run_script(
        'predict.py', converted, '--cnf', RAM, '--weights_from', plain, '--no_progress',
        cwd=tmp_path).stdout)))
    assert all(r['gradable'] == 'no' and 'already enhanced (local_contrast' in r['reasons']
               and r['level'] == '' for r in rows)
    # Raw photographs are still given the look (no note).
    raw = run_script('predict.py', photos, '--cnf', RAM, '--weights_from', weights,
                     '--no_progress', cwd=tmp_path)
    assert 'not given it again' not in raw.stderr


def test_json_gives_null_for_no_level_and_both_outputs_name_the_model(tmp_path, photos):
    import csv
    import io
    from retina.model import released
    weights = save_untrained(tmp_path, RAM)
    Image.new('RGB', (300, 200)).save(photos / 'black_left.png')
    digest = released.sha256_of(weights)
    graded = json.loads(run_script('predict.py', photos, '--cnf', RAM, '--weights_from', weights,
                                   '--json', '--no_progress', cwd=tmp_path).stdout)
    rows = {r['image']: r for r in graded['images']}
    assert rows['black_left']['gradable'] == 'no' and rows['black_left']['level'] is None
    assert graded['model'] == str(weights) and graded['model_sha256'] == digest
    assert graded['nets'][0]['sha256'] == digest
    table = list(csv.DictReader(io.StringIO(run_script(
        'predict.py', photos, '--cnf', RAM, '--weights_from', weights, '--no_progress',
        cwd=tmp_path).stdout)))
    assert {r['model'] for r in table} == {str(weights)}
    assert {r['model_sha256'] for r in table} == {digest}
    assert [r['level'] for r in table if r['image'] == 'black_left'] == ['']


def test_a_photograph_is_checked_at_every_size_its_nets_see(photos, monkeypatch):
    """A chain's 128-px view can hide what its 256-px view shows (the blocks of a heavily
    compressed photograph): a problem found at any conversion makes the photograph ungradable."""
    from retina.grade import photos as photos_module
    monkeypatch.setattr(photos_module.crop, 'gradability_reasons',
                        lambda path, image, box, crop_size, rgb, enhanced=False:
                        ['heavily compressed'] if crop_size == 256 else [])
    photo = sorted(photos.glob('*.jpeg'))[0]
    assert photos_module.prepare_photo(photo, [(128, 'none')]).problems == []
    both = photos_module.prepare_photo(photo, [(128, 'none'), (256, 'none')])
    assert both.problems == ['heavily compressed']
