"""Regression activation maps: the map's mean is the prediction, hooks, scores, masks and the CLI."""
import csv
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image, ImageDraw
from scipy import ndimage

from conftest import REPO, run_script
from retina import checkpoint, config as config_module, crop, ram
from retina.augment import standardise
from retina.data import MEAN, STD
from retina.errors import UserError

CONFIGS = sorted(p.stem for p in (REPO / 'configs').glob('c_*.py'))
RAM_CONFIGS = [c for c in CONFIGS if c.endswith('_ram')]
BASELINE_CONFIGS = [c for c in CONFIGS if not c.endswith('_ram')]
CNF = 'c_128_5x5_32_ram'
SCORE_NAMES = ('ram_mass_in_lesions', 'pointing_game', 'deletion_top10_drop',
               'deletion_random10_drop', 'deletion_excess_drop', 'deletion_ratio')


@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    model = config_module.load(CNF).build_net().eval()
    with torch.no_grad():
        model.output.bias.fill_(0.7)  # a bias far from 0, so that map with and without it differ
    return model


def hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


# --- the map --------------------------------------------------------------------

@pytest.mark.parametrize('name', RAM_CONFIGS)
def test_map_mean_is_the_prediction(name):
    torch.manual_seed(1)
    model = config_module.load(name).build_net().eval()
    with torch.no_grad():
        model.output.bias.fill_(-0.4)
    x = torch.randn(2, 3, *model.input_size)
    maps, predictions = ram.regression_activation_map(model, x)
    evidence, same_predictions = ram.regression_activation_map(model, x, include_bias=False)
    with torch.no_grad():
        expected = model(x).squeeze(1)
    c, h, w = model.output_shapes[model.last_conv]
    assert maps.shape == (2, h, w)
    torch.testing.assert_close(predictions, expected)
    torch.testing.assert_close(same_predictions, expected)
    torch.testing.assert_close(maps.mean(dim=(1, 2)), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(evidence.mean(dim=(1, 2)), expected + 0.4, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps - evidence, torch.full_like(maps, -0.4))
    assert float(evidence.std()) > 0, 'the map should vary over the image'
    assert hook_count(model) == 0


def test_map_is_the_weighted_sum_of_the_last_conv_maps(net):
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with ram.capture_activations(net, net.last_conv) as captured:
        with torch.no_grad():
            net(x)
    activations = captured.activations
    assert activations.shape == (3, 128, 6, 6)
    weight, bias = net.output.weight.detach()[0], float(net.output.bias.detach()[0])
    expected = (weight[None, :, None, None] * activations).sum(1) + bias
    maps, _ = ram.regression_activation_map(net, x)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-5)


def test_hook_is_removed_even_when_the_block_raises(net):
    assert hook_count(net) == 0
    with pytest.raises(RuntimeError, match='inside'):
        with ram.capture_activations(net, net.last_conv):
            assert hook_count(net) == 1
            raise RuntimeError('inside the block')
    assert hook_count(net) == 0
    with ram.capture_activations(net, 'conv2') as captured:
        with torch.no_grad():
            net(torch.zeros(1, 3, 112, 112))
    assert captured.activations.shape == (1, 32, 56, 56)
    assert hook_count(net) == 0
    with pytest.raises(ValueError, match='no layer'):
        with ram.capture_activations(net, 'conv99'):
            pass
    assert hook_count(net) == 0


def test_baseline_net_is_refused():
    model = config_module.load('c_128_5x5_32').build_net()
    with pytest.raises(UserError, match=r'_ram config'):
        ram.regression_activation_map(model, torch.zeros(1, 3, *model.input_size))
    assert hook_count(model) == 0


@pytest.mark.parametrize('name', CONFIGS)
def test_only_ram_configs_are_loaded(tmp_path, name):
    config = config_module.load(name)
    if name in BASELINE_CONFIGS:
        with pytest.raises(UserError, match=f'use --cnf {name}_ram'):
            ram.load_ram_net(config, tmp_path / 'weights.pt', 'cpu')
    else:
        with pytest.raises(UserError, match='train first'):
            ram.load_ram_net(config, tmp_path / 'weights.pt', 'cpu')


def test_upsampled_map_covers_the_network_window(net):
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    maps, _ = ram.regression_activation_map(net, x)
    up = ram.upsample(maps, (112, 112))
    assert up.shape == (2, 112, 112)
    # Bilinear upsampling keeps the map's range and (nearly) its mean.
    assert float(up.max()) <= float(maps.max()) + 1e-5
    assert float(up.min()) >= float(maps.min()) - 1e-5
    torch.testing.assert_close(up.mean(dim=(1, 2)), maps.mean(dim=(1, 2)), rtol=0.05, atol=0.02)
    constant = ram.upsample(torch.full((1, 6, 6), 2.5), (112, 112))
    torch.testing.assert_close(constant, torch.full((1, 112, 112), 2.5))


# --- scores ---------------------------------------------------------------------

def gaussian(centre, size=112, sigma=3.0):
    y, x = np.mgrid[:size, :size]
    return np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * sigma ** 2))


def test_localisation_of_a_map_peaking_in_the_lesion():
    lesions = np.zeros((112, 112), dtype=bool)
    lesions[20:40, 60:80] = True
    inside = gaussian((30, 70)) - 0.2        # negative evidence elsewhere is not mass
    assert ram.points_at_lesion(inside, lesions, tolerance=0)
    assert ram.lesion_mass_share(inside, lesions) > 0.99
    outside = gaussian((90, 10))
    assert not ram.points_at_lesion(outside, lesions, tolerance=9)
    assert ram.lesion_mass_share(outside, lesions) < 0.01
    near = gaussian((45, 70))                # 6 px below the lesion's last row
    assert ram.points_at_lesion(near, lesions, tolerance=9)
    assert not ram.points_at_lesion(near, lesions, tolerance=2)
    assert not ram.points_at_lesion(inside, np.zeros_like(lesions), tolerance=9)
    assert np.isnan(ram.lesion_mass_share(-gaussian((30, 70)), lesions))
    assert ram.default_tolerance((112, 112), (6, 6)) == 9


def test_scores_summary_prints_one_figure_per_line():
    scores = ram.Scores(level_source='predicted levels', tolerance=9, mass=[1.0, 0.5, float('nan')],
                        hits=[True, False, False, True], mass_chance=[0.1] * 4, hit_chance=[0.3] * 4,
                        top_drops=[0.4, 0.2], random_drops=[0.1, 0.1])
    values = scores.summary()
    assert values['ram_mass_in_lesions'] == pytest.approx(0.75)
    assert values['pointing_game'] == pytest.approx(0.5)
    assert values['deletion_ratio'] == pytest.approx(3.0)
    assert values['deletion_excess_drop'] == pytest.approx(0.2)
    figures = [line for line in scores.lines() if not line.startswith('#')]
    assert [line.split(':')[0] for line in figures] == list(SCORE_NAMES)
    assert figures[-1] == 'deletion_ratio: 3.0000'
    scores.random_drops = [-0.1, -0.2]       # random blanking raised the prediction: no ratio
    assert np.isnan(scores.summary()['deletion_ratio'])
    assert scores.summary()['deletion_excess_drop'] == pytest.approx(0.45)
    assert any('deletion_ratio is nan' in line for line in scores.lines())


class MeanOfRed(nn.Module):
    """A stand-in net whose prediction is the mean of the first input channel."""

    def forward(self, x):
        return x[:, 0].mean(dim=(1, 2))[:, None]


def test_blanking_to_black_or_mean_and_deleting_the_evidence_drops_the_prediction():
    x = torch.zeros(2, 3, 20, 20)
    where = torch.zeros(2, 20, 20, dtype=torch.bool)
    where[:, :2] = True
    blanked = ram.blank(x, where, fill='black')
    black = torch.as_tensor(-MEAN / STD)
    torch.testing.assert_close(blanked[0, :, 0, 0], black)
    torch.testing.assert_close(blanked[:, :, 5:], x[:, :, 5:])
    torch.testing.assert_close(standardise(torch.zeros(1, 3, 1, 1))[0, :, 0, 0], black)
    torch.testing.assert_close(ram.blank(x + 1, where, fill='mean')[0, :, 0, 0], torch.zeros(3))
    with pytest.raises(ValueError, match='fill'):
        ram.blank(x, where, fill='grey')

    x[:, 0, :4, :10] = 5.0                    # 40 bright pixels = the top 10% of the map
    evidence = x[:, 0].clone()
    for fill, value in (('black', black[0].item()), ('mean', 0.0)):
        top, random = ram.deletion_drops(MeanOfRed(), x, evidence, fill=fill,
                                         generator=torch.Generator().manual_seed(0))
        expected_top = 40 * (5.0 - value) / 400
        np.testing.assert_allclose(top, [expected_top, expected_top], rtol=1e-5)
        assert (random < top / 2).all()


def test_random_deletion_control_has_the_grain_of_the_map():
    maps = torch.zeros(1, 6, 6)
    maps[0, 2, 2] = 1.0                       # cell 2 covers pixels 37..55
    top = ram.top_pixels(maps, (112, 112), 0.1)[0]
    assert int(top.sum()) == round(0.1 * 112 * 112)
    assert top[20:75, 20:75].sum() == top.sum(), 'the top pixels should form one blob at the hot cell'
    assert ndimage.label(top.numpy())[1] == 1
    random_maps = torch.rand(4, 6, 6, generator=torch.Generator().manual_seed(0))
    for mask in ram.top_pixels(random_maps, (112, 112), 0.1).numpy():  # one image at a time
        # about 4 cells' worth: a few blobs (2-12 over 800 random maps), not ~1,000 pixels
        assert ndimage.label(mask)[1] < 20


# --- masks ----------------------------------------------------------------------

def wide_photo_with_marker(path, mask_path):
    """A 300x200 'photo' with its eye off-centre and a blue marker where the mask says lesion."""
    photo = Image.new('RGB', (300, 200))
    draw = ImageDraw.Draw(photo)
    draw.ellipse((120, 5, 290, 195), fill=(200, 90, 40))
    draw.rectangle((240, 60, 260, 80), fill=(20, 20, 250))
    photo.save(path)
    mask = Image.new('L', (300, 200))
    ImageDraw.Draw(mask).rectangle((240, 60, 260, 80), fill=255)
    mask.save(mask_path)


def test_full_size_masks_are_cropped_like_their_photographs(tmp_path):
    for folder in ('photos', 'masks', 'converted'):
        (tmp_path / folder).mkdir()
    wide_photo_with_marker(tmp_path / 'photos' / '1_left.png', tmp_path / 'masks' / '1_left.png')
    crop.convert_one(tmp_path / 'photos' / '1_left.png', tmp_path / 'converted' / '1_left.png', 128)
    window, size = ram.load_window(tmp_path / 'converted' / '1_left.png', (112, 112))
    assert size == 128
    marker = (window[2] > 150) & (window[0] < 100)
    lesions = ram.MaskSource(tmp_path / 'masks', tmp_path / 'photos').lesions('1_left', 128, (112, 112))
    assert lesions.shape == (112, 112) and marker.sum() > 20
    iou = (lesions & marker.numpy()).sum() / (lesions | marker.numpy()).sum()
    assert iou > 0.7, f'mask and marker do not line up (IoU {iou:.2f})'
    assert ram.MaskSource(tmp_path / 'masks').lesions('2_left', 128, (112, 112)) is None
    with pytest.raises(UserError, match='--photos'):
        ram.MaskSource(tmp_path / 'masks').lesions('1_left', 128, (112, 112))


def test_masks_at_the_converted_size_are_used_as_they_are(tmp_path):
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[8:18, 100:110] = 255                # window rows 0..9, columns 92..101
    Image.fromarray(mask).save(tmp_path / 'a.png')
    lesions = ram.MaskSource(tmp_path).lesions('a', 128, (112, 112))
    assert lesions.sum() == 100 and lesions[0:10, 92:102].all()


def test_image_lists_refuse_missing_paths_and_clashing_names(tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    for folder in ('a', 'b'):
        Image.new('RGB', (128, 128)).save(tmp_path / folder / '1_left.png')
    with pytest.raises(UserError, match='share the name 1_left'):
        ram.collect_images([tmp_path / 'a', tmp_path / 'b'])
    with pytest.raises(UserError, match='no such image or folder'):
        ram.collect_images([tmp_path / 'nothing'])
    assert ram.collect_images([tmp_path / 'a', tmp_path / 'a' / '1_left.png']) == \
        [tmp_path / 'a' / '1_left.png']
    Image.new('RGB', (300, 200)).save(tmp_path / 'wide.png')
    with pytest.raises(UserError, match='not square'):
        ram.load_window(tmp_path / 'wide.png', (112, 112))


# --- the script -----------------------------------------------------------------

LEVELS_OF_TINY_SET = {'1_left': 0, '1_right': 1, '2_left': 2, '2_right': 3, '3_left': 4, '3_right': 2}


def tiny_data_set(root):
    """128-px 'converted' eyes with spots, their lesion masks at 128 px, labels and random weights."""
    images, masks = root / 'data' / 'test_tiny', root / 'masks'
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(0)
    for name, level in LEVELS_OF_TINY_SET.items():
        image = Image.new('RGB', (128, 128))
        mask = Image.new('L', (128, 128))
        draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        draw.ellipse((4, 4, 124, 124), fill=(190, 80, 40))
        for _ in range(3 * level):
            x, y = rng.integers(30, 98, size=2)
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(250, 240, 120))
            draw_mask.ellipse((x - 4, y - 4, x + 4, y + 4), fill=255)
        image.save(images / f'{name}.jpeg', quality=95)
        mask.save(masks / f'{name}.png')
    with open(root / 'labels.csv', 'w', newline='') as f:
        csv.writer(f).writerows([('image', 'level'), *LEVELS_OF_TINY_SET.items()])
    torch.manual_seed(0)
    config = config_module.load(CNF)
    model = config.build_net()
    with torch.no_grad():
        model.output.bias.fill_(1.5)         # predictions near 1.5: levels >= 1 get scored
    checkpoint.save(root / 'weights' / CNF / 'weights.pt', model=model, config=config, epoch=0)
    return images


def test_cli_writes_maps_figure_and_scores_and_names_bad_images(tmp_path):
    images = tiny_data_set(tmp_path)
    (images / '9_left.jpeg').write_bytes(b'not a jpeg')
    result = run_script('ram.py', '--cnf', CNF, '--masks', tmp_path / 'masks', '--labels',
                        tmp_path / 'labels.csv', '--batch_size', 4, '--no_progress',
                        cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr
    assert '9_left.jpeg' in result.stderr and 'Traceback' not in result.stderr
    out = tmp_path / 'data' / 'ram' / CNF
    for name in LEVELS_OF_TINY_SET:
        with Image.open(out / f'{name}_{CNF}.png') as image:
            assert image.format == 'PNG' and min(image.size) >= 300
    assert not (out / f'9_left_{CNF}.png').exists()
    with Image.open(out / f'{CNF}_by_level.png') as figure:
        assert figure.size[0] > figure.size[1]
    values = {}
    for name in SCORE_NAMES:
        match = re.search(rf'^{name}: (\S+)$', result.stdout, re.MULTILINE)
        assert match, f'{name} missing from:\n{result.stdout}'
        values[name] = float(match[1])
    assert 0 <= values['ram_mass_in_lesions'] <= 1
    assert 0 <= values['pointing_game'] <= 1
    assert np.isfinite(values['deletion_top10_drop'])
    assert '5 image(s) of level >= 1' in result.stdout


def test_cli_single_files_signed_and_output_dir(tmp_path):
    images = tiny_data_set(tmp_path)
    result = run_script('ram.py', '--cnf', CNF, '--images', images / '2_left.jpeg', '--images',
                        images / '3_left.jpeg', '--signed', '--limit', 1, '--output_dir', 'maps',
                        '--no_progress', cwd=tmp_path)
    assert (tmp_path / 'maps' / f'2_left_{CNF}_signed.png').is_file()
    assert not (tmp_path / 'maps' / f'3_left_{CNF}_signed.png').exists()
    assert (tmp_path / 'maps' / f'{CNF}_signed_by_level.png').is_file()
    assert 'ram_mass_in_lesions' not in result.stdout


@pytest.mark.parametrize('case, expected', [
    ('baseline', 'use --cnf c_128_5x5_32_ram'),
    ('no_weights', 'train first'),
    ('other_weights', 'do not fit config c_128_5x5_32_ram'),
])
def test_cli_errors_are_one_line(tmp_path, case, expected):
    if case == 'other_weights':
        other = config_module.load('c_128_4x4_32_ram')
        checkpoint.save(tmp_path / 'other.pt', model=other.build_net(), config=other, epoch=0)
    args = {'baseline': ['--cnf', 'c_128_5x5_32'],
            'no_weights': ['--cnf', CNF],
            'other_weights': ['--cnf', CNF, '--weights_from', 'other.pt']}[case]
    result = run_script('ram.py', *args, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
