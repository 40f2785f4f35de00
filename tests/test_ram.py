"""Heat maps: the methods against their definitions, hooks, honest scores, masks, drawing and the CLI."""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image, ImageDraw
from scipy import ndimage

from conftest import REPO, run_script
from retina.core.errors import UserError
from retina.data import crop
from retina.data.images import collect_images
from retina.data.labels import MEAN, STD
from retina.heatmaps import figures, methods, ram, scores
from retina.model import checkpoint, nets
from retina.model import config as config_module
from retina.model.augment import KAGGLE, standardise

CONFIGS = sorted(p.stem for p in (REPO / 'configs').glob('c_*.py'))
RAM_CONFIGS = [c for c in CONFIGS if nets.is_ram_net(config_module.load(c).layers)]
BASELINE_CONFIGS = [c for c in CONFIGS if c not in RAM_CONFIGS]
CNF = CONFIG = 'c_128_5x5_32_ram'
LOCALISATION_NAMES = scores.SCORE_NAMES
DELETION_NAMES = scores.DELETION_NAMES


@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    model = config_module.load(CNF).build_net().eval()
    with torch.no_grad():
        model.output.bias.fill_(0.7)  # a bias far from 0, so that map with and without it differ
    return model


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


# --- the methods ------------------------------------------------------------------

@pytest.mark.parametrize('name', [c for c in RAM_CONFIGS if c != 'c_256_5x5_32_ram_fine'])  # 55x55x256: slow
def test_map_mean_is_the_prediction_with_the_bias(name):
    torch.manual_seed(1)
    model = config_module.load(name).build_net().eval()
    with torch.no_grad():
        model.output.bias.fill_(-0.4)
    x = torch.randn(2, 3, *model.input_size)
    maps, predictions = methods.regression_activation_map(model, x, include_bias=True)
    evidence, same_predictions = methods.regression_activation_map(model, x)   # default: no bias
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
    with methods.capture_activations(net, net.last_conv) as captured:
        with torch.no_grad():
            net(x)
    activations = captured.activations
    assert activations.shape == (3, 128, 6, 6)
    weight = net.output.weight.detach()[0]
    expected = (weight[None, :, None, None] * activations).sum(1)
    maps, _ = methods.regression_activation_map(net, x)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-5)


def tiny_ram_net():
    """A 2x2-input RAM net: one 1x1 conv whose two maps are channel 0 and its leaky negative."""
    model = nets.Net([('conv', dict(name='conv1', filters=2, size=1, stride=1, pad=0)),
                      ('gap', dict(name='gap')), ('output', dict(name='output', units=1))], (2, 2))
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.conv1.weight[0, 0] = 1.0
        model.conv1.weight[1, 0] = -1.0
        model.conv1.bias.zero_()
        model.output.weight.copy_(torch.tensor([[2.0, 3.0]]))
        model.output.bias.fill_(0.5)
    return model.eval()


def test_ram_against_a_hand_computed_map():
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    leak = nets.LEAKINESS
    # A_0 = x, A_1 = leaky(-x) = -leak x; map = 2 A_0 + 3 A_1 = (2 - 3 leak) x.
    expected = (2 - 3 * leak) * torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    maps, predictions = methods.regression_activation_map(tiny_ram_net(), x)
    torch.testing.assert_close(maps[0], expected)
    torch.testing.assert_close(predictions, torch.tensor([0.5 + 2.5 * (2 - 3 * leak)]))
    with_bias, _ = methods.regression_activation_map(tiny_ram_net(), x, include_bias=True)
    torch.testing.assert_close(with_bias[0], expected + 0.5)


class LinearInActivations(nn.Module):
    """prediction = sum_kxy V[k, x, y] A[k, x, y] with A = (x, -x): the gradient at A is V."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        self.register_buffer('v', torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [2.0, 0.0]]]))

    def forward(self, x):
        return (self.conv(x) * self.v).sum(dim=(1, 2, 3))[:, None]


def test_gradcam_and_layercam_against_hand_computed_maps():
    model = LinearInActivations()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    # Grad-CAM: alpha = mean V_k = (0.5, 0.25); 0.5 x + 0.25 (-x) = 0.25 x, all positive.
    gradcam, predictions = methods.grad_cam(model, x, 'conv')
    torch.testing.assert_close(gradcam[0], torch.tensor([[0.25, 0.5], [0.75, 1.0]]))
    torch.testing.assert_close(predictions, torch.tensor([1.0]))    # 1 + 4 + 2 - 6
    # LayerCAM: ReLU(V_0) A_0 + ReLU(V_1) A_1 = [[1, 0], [0, 4]] + [[0, 0], [-6, 0]], then ReLU.
    layercam, _ = methods.layer_cam(model, x, 'conv')
    torch.testing.assert_close(layercam[0], torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    assert hook_count(model) == 0
    assert set(methods.METHODS) == set(ram.METHODS) == {'ram', 'gradcam', 'layercam'}


def test_gradcam_at_the_last_conv_of_a_ram_net_is_the_rectified_ram_over_its_area(net):
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    evidence, predictions = methods.regression_activation_map(net, x)
    gradcam, same = methods.grad_cam(net, x)
    h, w = evidence.shape[-2:]
    torch.testing.assert_close(gradcam, torch.relu(evidence) / (h * w), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(same, predictions)
    assert float(gradcam.max()) > 0 and float((gradcam == 0).float().mean()) > 0, \
        'the test needs maps with both signs'
    layercam, _ = methods.layer_cam(net, x)       # ReLU(w_k) / (h w) per channel
    activations = None
    with methods.capture_activations(net, net.last_conv) as captured:
        with torch.no_grad():
            net(x)
        activations = captured.activations
    expected = torch.relu((torch.relu(net.output.weight.detach()[0])[None, :, None, None]
                           * activations).sum(1)) / (h * w)
    torch.testing.assert_close(layercam, expected, rtol=1e-4, atol=1e-6)
    assert hook_count(net) == 0


def test_gradient_methods_work_on_baseline_nets_at_any_conv_layer():
    model = config_module.load('c_128_5x5_32').build_net()
    x = torch.randn(2, 3, *model.input_size, generator=torch.Generator().manual_seed(4))
    for method in ('gradcam', 'layercam'):
        maps, predictions = methods.compute_maps(method, model, x, layer='conv5')
        assert maps.shape == (2, *model.output_shapes['conv5'][1:])
        with torch.no_grad():
            torch.testing.assert_close(predictions, model.eval()(x)[:, 0])   # maps come in eval mode
        model.train()
        assert (maps >= 0).all()
    assert model.training, 'the method should leave the net in the mode it found it'
    with pytest.raises(UserError, match='not a layer with a spatial map'):
        methods.grad_cam(model, x, 'output')
    with pytest.raises(UserError, match='only at the last conv'):
        methods.regression_activation_map(config_module.load(CNF).build_net(), x, layer='conv5')
    assert hook_count(model) == 0
    assert methods.conv_layers(model)[-1] == model.last_conv


def test_hook_is_removed_even_when_the_block_raises(net):
    assert hook_count(net) == 0
    with pytest.raises(RuntimeError, match='inside'):
        with methods.capture_activations(net, net.last_conv):
            assert hook_count(net) == 1
            raise RuntimeError('inside the block')
    assert hook_count(net) == 0
    with methods.capture_activations(net, 'conv2') as captured:
        with torch.no_grad():
            net(torch.zeros(1, 3, 112, 112))
    assert captured.activations.shape == (1, 32, 56, 56)
    assert hook_count(net) == 0
    with pytest.raises(ValueError, match='no layer'):
        with methods.capture_activations(net, 'conv99'):
            pass
    assert hook_count(net) == 0


def test_baseline_net_is_refused_by_the_ram():
    model = config_module.load('c_128_5x5_32').build_net()
    with pytest.raises(UserError, match=r'_ram config.*--method gradcam'):
        methods.regression_activation_map(model, torch.zeros(1, 3, *model.input_size))
    assert hook_count(model) == 0


@pytest.mark.parametrize('name', CONFIGS)
def test_only_ram_configs_are_loaded_for_the_ram(tmp_path, name):
    config = config_module.load(name)
    if name in BASELINE_CONFIGS:
        with pytest.raises(UserError, match=f'use --cnf {name}_ram'):
            ram.net_for_method(config, tmp_path / 'weights.pt', 'cpu')
    else:
        with pytest.raises(UserError, match='train first'):
            ram.net_for_method(config, tmp_path / 'weights.pt', 'cpu')
    with pytest.raises(UserError, match='train first'):     # any net has a Grad-CAM
        ram.net_for_method(config, tmp_path / 'weights.pt', 'cpu', method='gradcam')


def test_upsampled_map_covers_the_network_window(net):
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    maps, _ = methods.regression_activation_map(net, x)
    up = methods.upsample(maps, (112, 112))
    assert up.shape == (2, 112, 112)
    # Bicubic upsampling, clamped: the map's range, (nearly) its mean, and smooth (no 6x6 blocks).
    assert float(up.max()) <= float(maps.max()) + 1e-5
    assert float(up.min()) >= float(maps.min()) - 1e-5
    torch.testing.assert_close(up.mean(dim=(1, 2)), maps.mean(dim=(1, 2)), rtol=0.05, atol=0.02)
    steps = up.diff(dim=-1).abs()
    assert float(steps.max()) < 0.2 * float(maps.diff(dim=-1).abs().max())
    constant = methods.upsample(torch.full((1, 6, 6), 2.5), (112, 112))
    torch.testing.assert_close(constant, torch.full((1, 112, 112), 2.5))


def test_fusion_of_two_toy_maps():
    a = torch.tensor([[[0.0, 2.0], [4.0, 8.0]]])                          # 2x2: min-max -> /8
    b = torch.tensor([[[1.0, 1.0, 9.0], [3.0, 5.0, 9.0], [9.0, 9.0, 9.0]]])   # 3x3: last row/col dropped
    fused = methods.fuse(a, b)
    expected = torch.tensor([[0.0, 0.25], [0.5, 1.0]]) + torch.tensor([[0.0, 0.0], [0.5, 1.0]])
    torch.testing.assert_close(fused[0], expected)
    torch.testing.assert_close(methods.fuse(b, a), fused)
    four = torch.arange(16.0).view(1, 4, 4)           # two cells more: resampled by area
    torch.testing.assert_close(methods.to_grid(four, (2, 2))[0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    torch.testing.assert_close(methods.fuse(torch.ones(1, 2, 2), a)[0], a[0] / 8)   # constant -> 0
    # A fine net's map with a coarse one: fused on the fine grid, the coarse map upsampled.
    fine = torch.rand(1, 11, 11)
    fused = methods.fuse(a, fine)
    assert fused.shape == (1, 11, 11)
    torch.testing.assert_close(fused, methods.min_max(methods.upsample(a, (11, 11))) + methods.min_max(fine))
    assert methods.fusion_grid((53, 53), (55, 55)) == (53, 53)
    assert methods.fusion_grid((55, 55), (6, 6)) == (55, 55)


# --- scores ---------------------------------------------------------------------

def gaussian(centre, size=112, sigma=3.0):
    y, x = np.mgrid[:size, :size]
    return np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * sigma ** 2))


def test_localisation_of_a_map_peaking_in_the_lesion():
    lesions = np.zeros((112, 112), dtype=bool)
    lesions[20:40, 60:80] = True
    inside = gaussian((30, 70)) - 0.2        # negative evidence elsewhere is not mass
    assert scores.points_at_lesion(inside, lesions, tolerance=0)
    assert scores.lesion_mass_share(inside, lesions) > 0.99
    outside = gaussian((90, 10))
    assert not scores.points_at_lesion(outside, lesions, tolerance=9)
    assert scores.lesion_mass_share(outside, lesions) < 0.01
    near = gaussian((45, 70))                # 6 px below the lesion's last row
    assert scores.points_at_lesion(near, lesions, tolerance=9)
    assert not scores.points_at_lesion(near, lesions, tolerance=2)
    assert not scores.points_at_lesion(inside, np.zeros_like(lesions), tolerance=9)
    assert np.isnan(scores.lesion_mass_share(-gaussian((30, 70)), lesions))
    assert scores.score_map(-gaussian((30, 70)), lesions, None, 9)['mass_in_lesions'] == 0.0
    assert scores.default_tolerance((112, 112), (6, 6)) == 9
    # Only the fundus counts: a maximum in the surround is not where the map points.
    fundus = np.zeros_like(lesions)
    fundus[10:100, 10:100] = True
    surround_peak = gaussian((30, 70)) + 5 * gaussian((2, 2), sigma=1)
    assert not scores.points_at_lesion(surround_peak, lesions, 0)
    assert scores.points_at_lesion(surround_peak, lesions, 0, fundus)


def test_auroc_of_the_mask_and_of_the_grid_oracle_is_one():
    lesions = np.zeros((112, 112), dtype=bool)
    lesions[28:56] = True                     # one row of cells of a 4x4 grid
    assert scores.auroc(lesions.astype(float), lesions) == 1.0
    assert scores.auroc(-lesions.astype(float), lesions) == 0.0
    oracle = scores.grid_oracle(lesions.astype(np.float32), (4, 4), (112, 112)).numpy()
    assert oracle.shape == (112, 112)
    assert scores.auroc(oracle, lesions) == 1.0
    # Outside the fundus nothing counts, however the map looks there.
    fundus = np.zeros_like(lesions)
    fundus[:, 20:90] = True
    noisy = lesions + np.where(fundus, 0.0, 5.0)
    assert scores.auroc(noisy, lesions) < 0.9
    assert scores.auroc(noisy, lesions, fundus) == 1.0
    assert np.isnan(scores.auroc(oracle, np.zeros_like(lesions)))      # no lesion: undefined
    # A coarse lesion (one 2-D cell) on the oracle still beats chance by far.
    cell = np.zeros((112, 112), dtype=bool)
    cell[30:50, 60:80] = True
    assert scores.auroc(scores.grid_oracle(cell.astype(np.float32), (4, 4), (112, 112)).numpy(), cell) > 0.9


def test_blind_map_is_the_mean_of_the_other_images_only():
    maps = torch.stack([torch.full((2, 2), 1.0), torch.tensor([[0.0, 2.0], [0.0, 0.0]]),
                        torch.tensor([[0.0, 0.0], [-4.0, 0.0]])])
    blind = scores.blind_maps(maps)
    # each divided by its peak |value| (1, 2, 4), then the mean of the two others
    torch.testing.assert_close(blind[0], torch.tensor([[0.0, 0.5], [-0.5, 0.0]]))
    torch.testing.assert_close(blind[1], torch.tensor([[0.5, 0.5], [0.0, 0.5]]))
    torch.testing.assert_close(blind[2], torch.tensor([[0.5, 1.0], [0.5, 0.5]]))
    changed = maps.clone()
    changed[1] = torch.tensor([[9.0, -3.0], [0.0, 1.0]])      # image 1 changes: its own blind map does not
    torch.testing.assert_close(scores.blind_maps(changed)[1], blind[1])
    assert torch.isnan(scores.blind_maps(maps[:1])).all()


def test_bootstrap_interval_brackets_the_mean():
    names = ['1_left', '1_right', '2_left', 'IDRiD_03', '4_left']
    mean, low, high = scores.bootstrap_interval(names, [0.1, 0.2, 0.3, 0.2, float('nan')])
    assert mean == pytest.approx(0.2) and low < mean < high and 0.1 <= low and high <= 0.3
    assert scores.bootstrap_interval(names, [0.2] * 5)[1:] == (pytest.approx(0.2),
                                                               pytest.approx(0.2))
    # Patients are drawn whole: two eyes that always go together give only the draws of
    # patients, never a mean from one eye without the other.
    pair = scores.bootstrap_interval(['7_left', '7_right', '8_left', '8_right'], [0, 1, 0, 1])
    assert pair == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5))


def record(name, kind, level, map_auroc, blind_auroc, hit):
    values = {v: dict(auroc=a, pointing_exact=float(hit), pointing_game=1.0, mass_in_lesions=0.5)
              for v, a in (('map', map_auroc), ('blind', blind_auroc), ('oracle', 0.9))}
    return scores.Record(name=name, kind=kind, level=level, values=values)


def test_scores_summary_prints_map_blind_and_oracle_per_kind_and_level():
    summary = scores.Scores(level_source='labels', tolerance=1, grid=(53, 53), kinds=('exudate', 'red'),
                            records=[record('a', 'exudate', 1, 0.8, 0.6, True),
                                     record('b', 'exudate', 2, 0.6, 0.6, False),
                                     record('a', 'red', 1, 0.5, 0.7, False)],
                            top_drops=[0.4, 0.2], random_drops=[0.1, 0.1])
    lines = summary.lines()
    assert 'auroc[exudate]: 0.7000  0.6000  0.9000' in lines
    assert 'pointing_exact[exudate]: 0.5000  0.5000  0.5000' in lines
    assert 'auroc[red]: 0.5000  0.7000  0.9000' in lines
    assert any(line.startswith('# exudate level 2 (1 image(s)): auroc 0.600/0.600/0.900') for line in lines)
    assert 'deletion_ratio: 3.0000' in lines
    data = summary.as_dict()
    assert data['kinds']['exudate']['n'] == 2
    assert data['kinds']['exudate']['auroc_minus_blind']['mean'] == pytest.approx(0.1)
    assert data['kinds']['red']['levels']['1']['scores']['auroc']['blind'] == pytest.approx(0.7)
    json.dumps(data)
    summary.random_drops = [-0.1, -0.2]       # random blanking raised the prediction: no ratio
    assert np.isnan(summary.deletion()['deletion_ratio'])
    assert summary.deletion()['deletion_excess_drop'] == pytest.approx(0.45)
    assert any('deletion_ratio is nan' in line for line in summary.lines())
    summary.top_drops = []
    assert any('deletion: not measured' in line for line in summary.lines())


class MeanOfRed(nn.Module):
    """A stand-in net whose prediction is the mean of the first input channel."""

    def forward(self, x):
        return x[:, 0].mean(dim=(1, 2))[:, None]


def test_blanking_to_black_or_mean_and_deleting_the_evidence_drops_the_prediction():
    x = torch.zeros(2, 3, 20, 20)
    where = torch.zeros(2, 20, 20, dtype=torch.bool)
    where[:, :2] = True
    blanked = scores.blank(x, where, fill='black', constants=KAGGLE)
    black = torch.as_tensor(-MEAN / STD)
    torch.testing.assert_close(blanked[0, :, 0, 0], black)
    torch.testing.assert_close(blanked[:, :, 5:], x[:, :, 5:])
    torch.testing.assert_close(standardise(torch.zeros(1, 3, 1, 1), KAGGLE)[0, :, 0, 0], black)
    torch.testing.assert_close(scores.blank(x + 1, where, fill='mean', constants=KAGGLE)[0, :, 0, 0],
                               torch.zeros(3))
    with pytest.raises(ValueError, match='fill'):
        scores.blank(x, where, fill='grey', constants=KAGGLE)

    x[:, 0, :4, :10] = 5.0                    # 40 bright pixels = the top 10% of the map
    evidence = x[:, 0].clone()
    for fill, value in (('black', black[0].item()), ('mean', 0.0)):
        top, random = scores.deletion_drops(MeanOfRed(), x, evidence, fill=fill,
                                            generator=torch.Generator().manual_seed(0),
                                            constants=KAGGLE)
        expected_top = 40 * (5.0 - value) / 400
        np.testing.assert_allclose(top, [expected_top, expected_top], rtol=1e-5)
        assert (random < top / 2).all()


def test_random_deletion_control_has_the_grain_of_the_map():
    maps = torch.zeros(1, 6, 6)
    maps[0, 2, 2] = 1.0                       # cell 2 covers pixels 37..55
    top = scores.top_pixels(maps, (112, 112), 0.1)[0]
    assert int(top.sum()) == round(0.1 * 112 * 112)
    assert top[20:75, 20:75].sum() == top.sum(), 'the top pixels should form one blob at the hot cell'
    assert ndimage.label(top.numpy())[1] == 1
    random_maps = torch.rand(4, 6, 6, generator=torch.Generator().manual_seed(0))
    for mask in scores.top_pixels(random_maps, (112, 112), 0.1).numpy():  # one image at a time
        # about 4 cells' worth: a few blobs, not ~1,000 pixels
        assert ndimage.label(mask)[1] < 20


def test_by_level_figure_picks_its_examples_by_label_when_labels_are_given():
    items = [ram.Item(path=None, name=name, size=128, map=torch.zeros(2, 2), prediction=prediction,
                      label=label) for name, prediction, label in
             [('a', 0.2, 3), ('b', 2.9, 3), ('c', 0.1, 0), ('d', 1.0, None)]]
    by_label = ram.examples_by_level(items, by_label=True)
    assert by_label[3].name == 'b' and by_label[0].name == 'c' and by_label[1] is None
    items[1].label = None                  # 'a' is then the only label 3, however low its prediction
    assert ram.examples_by_level(items, by_label=True)[3].name == 'a'
    for item in items:
        item.label = None
    by_prediction = ram.examples_by_level(items, by_label=False)
    assert by_prediction[0].name == 'c' and by_prediction[1].name == 'd' and by_prediction[3].name == 'b'


# --- drawing --------------------------------------------------------------------

def eye_window(size=112):
    """An orange disc on black with a dark spot inside (a haemorrhage: still fundus)."""
    image = Image.new('RGB', (size, size))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, size - 7, size - 7), fill=(200, 90, 40))
    draw.ellipse((50, 50, 60, 60), fill=(5, 5, 5))
    return np.asarray(image)


def test_fundus_mask_is_the_eye_disc_with_its_holes_filled():
    window = eye_window()
    inside = figures.fundus_mask(window)
    disc = np.asarray(Image.fromarray(window).convert('L')) > 0      # the drawn disc, spot included
    assert inside[disc].all(), 'no pixel of the eye may be left out'
    assert not inside[~ndimage.binary_dilation(disc, iterations=2)].any(), 'at most 2 px beyond the rim'
    assert inside[55, 55], 'a dark lesion inside the eye is fundus'
    assert not inside[0, 0] and not inside[2, 56]
    assert figures.fundus_mask(np.zeros((20, 20, 3), dtype=np.uint8)).all()


def test_render_colours_nothing_outside_the_eye():
    """The map is strong everywhere, yet every pixel of the black surround (beyond 2 px of the
    rim) keeps the photograph's colour; the eye, a dark lesion in it included, is coloured."""
    window = eye_window()
    photo, heat = figures.enlarged(window, np.full((6, 6), 4.0, dtype=np.float32), size=448)
    picture = figures.render(photo, heat, ['a: level 4 (score 4.00)'], 'RAM')
    left, top, right, bottom = figures.photo_box(picture)
    drawn = np.asarray(picture)[top:bottom, left:right].astype(int)
    assert drawn.shape == photo.shape
    disc = ndimage.binary_fill_holes(np.asarray(Image.fromarray(photo).convert('L')) > 20)
    outside = ~ndimage.binary_dilation(disc, iterations=3)
    assert outside.sum() > 10000
    assert (drawn[outside] == photo[outside]).all(), 'colour outside the eye'
    inside = ndimage.binary_erosion(disc, iterations=3)
    assert np.abs(drawn[inside] - photo[inside]).max(axis=1).min() > 20, 'the eye is not coloured'
    assert np.abs(drawn[220, 220] - photo[220, 220]).max() > 30, 'the dark lesion is fundus'


def test_render_shares_one_scale_in_score_units_across_photographs():
    """A value has one colour on every picture: 1.0 looks the same beside a map that peaks at 1
    and one that peaks at 4 (coloured on their own peaks it would be red in the first), and it
    is jet(1/4) at a quarter of the full opacity; the scale is written on each PNG."""
    photo = np.full((64, 64, 3), 120, dtype=np.uint8)
    flat = np.full((64, 64), 1.0)
    peaked = flat.copy()
    peaked[:8, :8] = 4.0
    pictures = [figures.render(photo, heat, ['x'], 'RAM') for heat in (flat, peaked)]
    colours = []
    for picture in pictures:
        left, top, _, _ = figures.photo_box(picture)
        colours.append(np.asarray(picture)[top + 40, left + 40].astype(int))
        assert picture.info['retina.scale'] == '0..4'
    np.testing.assert_array_equal(colours[0], colours[1])
    from matplotlib import colormaps
    opacity = figures.OPACITY * 0.25
    expected = 120 * (1 - opacity) + np.asarray(colormaps['jet'](0.25)[:3]) * 255 * opacity
    assert np.abs(colours[0] - expected).max() <= 1
    assert methods.colour_levels(np.array([-1.0, 2.0, 9.0])).tolist() == [0.0, 0.5, 1.0]
    # Maps without a unit of their own carry the score in the map's proportions.
    shown = methods.in_score_units('gradcam', torch.tensor([[[0.0, 1.0], [1.0, 2.0]]]),
                                   torch.tensor([2.0]))
    assert float(shown.mean()) == pytest.approx(2.0) and float(shown[0, 1, 1]) == pytest.approx(4.0)
    assert float(methods.in_score_units('layercam', torch.ones(1, 2, 2), torch.tensor([-1.0])).max()) == 0


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
        collect_images([tmp_path / 'a', tmp_path / 'b'])
    with pytest.raises(UserError, match='no such file or folder'):
        collect_images([tmp_path / 'nothing'])
    assert collect_images([tmp_path / 'a', tmp_path / 'a' / '1_left.png']) == \
        [tmp_path / 'a' / '1_left.png']
    Image.new('RGB', (300, 200)).save(tmp_path / 'wide.png')
    with pytest.raises(UserError, match='not square'):
        ram.load_window(tmp_path / 'wide.png', (112, 112))
    Image.new('RGB', (256, 256)).save(tmp_path / 'large.png')   # the 112 window: the eye's middle only
    with pytest.raises(UserError, match='expects 128 px.*--crop_size 128'):
        ram.load_window(tmp_path / 'large.png', (112, 112))
    assert ram.load_window(tmp_path / 'large.png', (224, 224))[1] == 256


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


def score_columns(stdout, name):
    """(map, blind, oracle) of the summary line `name: m b o`."""
    match = re.search(rf'^{re.escape(name)}: (\S+)  (\S+)  (\S+)$', stdout, re.MULTILINE)
    assert match, f'{name} missing from:\n{stdout}'
    return tuple(float(v) for v in match.groups())


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
        with Image.open(out / f'{name}_ram_{CNF}.png') as image:
            assert image.format == 'PNG' and min(image.size) >= 300
    assert not (out / f'9_left_ram_{CNF}.png').exists()
    with Image.open(out / f'ram_{CNF}_by_level.png') as figure:
        assert figure.size[0] > figure.size[1]
    for name in LOCALISATION_NAMES:
        for value in score_columns(result.stdout, name):
            assert 0 <= value <= 1, (name, value)
    assert score_columns(result.stdout, 'auroc')[2] > 0.9, 'the oracle knows where the spots are'
    for name in DELETION_NAMES:
        assert re.search(rf'^{name}: \S+$', result.stdout, re.MULTILINE), name
    assert '# 5 image(s)' in result.stdout
    assert re.search(r'^# level 4 \(1 image\(s\)\): auroc ', result.stdout, re.MULTILINE)


def test_cli_gradcam_of_a_baseline_net_with_masks_per_kind(tmp_path):
    tiny_data_set(tmp_path)
    baseline = config_module.load('c_128_5x5_32')
    checkpoint.save(tmp_path / 'baseline.pt', model=baseline.build_net(), config=baseline, epoch=0,
                    encoding='none')  # trained on lossless images; the set is convert.py's JPEGs
    kinds = tmp_path / 'kinds'
    (kinds / 'bright').mkdir(parents=True)
    (kinds / 'red').mkdir()
    for mask in (tmp_path / 'masks').iterdir():
        (kinds / 'bright' / mask.name).write_bytes(mask.read_bytes())
    red = np.zeros((128, 128), dtype=np.uint8)
    red[60:70, 60:70] = 255
    Image.fromarray(red).save(kinds / 'red' / '3_left.png')
    result = run_script('ram.py', '--cnf', 'c_128_5x5_32', '--weights_from', 'baseline.pt', '--method',
                        'gradcam', '--layer', 'conv5', '--masks', kinds, '--all_levels', '--per_image_scale',
                        '--scores_json', 'scores.json', '--no_progress', cwd=tmp_path)
    out = tmp_path / 'data' / 'ram' / 'c_128_5x5_32'
    assert len(list(out.glob('*_gradcam-conv5_c_128_5x5_32.png'))) == len(LEVELS_OF_TINY_SET)
    assert (out / 'gradcam-conv5_c_128_5x5_32_by_level.png').is_file()
    scored = json.loads((tmp_path / 'scores.json').read_text())
    assert set(scored['kinds']) == {'bright', 'red'}
    assert scored['kinds']['bright']['n'] == 5        # every level, but 1_left has no lesion
    assert scored['kinds']['red']['n'] == 1
    assert scored['grid'] == list(baseline.build_net().output_shapes['conv5'][1:])
    assert score_columns(result.stdout, 'auroc[red]')[0] == \
        pytest.approx(scored['kinds']['red']['scores']['auroc']['map'], abs=1e-4)
    assert '# red: 5 image(s) have no mask of this kind' in result.stdout
    assert 'baseline.pt was trained on images stored lossless' in result.stderr
    assert 'convert.py --extension tiff' in result.stderr


def test_cli_single_files_signed_output_dir_bias_and_fuse(tmp_path):
    images = tiny_data_set(tmp_path)
    other = config_module.load('c_128_4x4_32_ram')       # a 7x7 map, fused with the 6x6 one
    checkpoint.save(tmp_path / 'other.pt', model=other.build_net(), config=other, epoch=0)
    result = run_script('ram.py', '--cnf', CNF, '--fuse', 'c_128_4x4_32_ram', '--fuse_weights', 'other.pt',
                        '--images', images / '2_left.jpeg', '--images', images / '3_left.jpeg', '--limit', 1,
                        '--signed', '--include_bias', '--output_dir', 'maps', '--masks', tmp_path / 'masks',
                        '--no_progress', cwd=tmp_path)
    title = f'{CNF}+c_128_4x4_32_ram'
    assert (tmp_path / 'maps' / f'2_left_ram_bias_{title}_signed.png').is_file()
    assert not (tmp_path / 'maps' / f'3_left_ram_bias_{title}_signed.png').exists()
    assert (tmp_path / 'maps' / f'ram_bias_{title}_signed_by_level.png').is_file()
    assert len(list((tmp_path / 'maps').iterdir())) == 2
    assert '# deletion: not measured' in result.stdout      # no single net made the fused map
    assert 'pooled to the 6x6 grid' in result.stdout


@pytest.mark.parametrize('case, expected', [
    ('baseline', 'use --cnf c_128_5x5_32_ram'),
    ('no_weights', 'train first'),
    ('other_weights', 'do not fit config c_128_5x5_32_ram'),
    ('layer_of_ram', '--layer is for --method gradcam or layercam'),
    ('fuse_weights_alone', '--fuse_weights needs --fuse'),
    ('bias_of_gradcam', '--include_bias is for --method ram'),
])
def test_cli_errors_are_one_line(tmp_path, case, expected):
    if case == 'other_weights':
        other = config_module.load('c_128_4x4_32_ram')
        checkpoint.save(tmp_path / 'other.pt', model=other.build_net(), config=other, epoch=0)
    args = {'baseline': ['--cnf', 'c_128_5x5_32'],
            'no_weights': ['--cnf', CNF],
            'other_weights': ['--cnf', CNF, '--weights_from', 'other.pt'],
            'layer_of_ram': ['--cnf', CNF, '--layer', 'conv5'],
            'fuse_weights_alone': ['--cnf', CNF, '--fuse_weights', 'x.pt'],
            'bias_of_gradcam': ['--cnf', CNF, '--method', 'gradcam', '--include_bias']}[case]
    result = run_script('ram.py', *args, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_heat_map_benchmark_scores_given_weights_and_skips_missing_parts(tmp_path):
    config = config_module.load(CNF)
    checkpoint.save(tmp_path / 'tiny.pt', model=config.build_net(), config=config, epoch=0)
    result = subprocess.run(
        [sys.executable, str(REPO / 'bench' / 'bench_heatmaps.py'), '--synthetic_weights', 'tiny.pt',
         '--synthetic_weights', 'missing.pt', '--real_weights', 'tiny.pt', '--heimed', 'no_heimed',
         '--methods', 'ram', '--n_patients', '12', '--work', 'work', '--device', 'cpu', '--no_write'],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'skipped: synthetic weights missing.pt do not exist' in result.stdout
    assert 'skipped: the real-photo part' in result.stdout
    row = re.search(rf'^\| synthetic \| lesion \| {CNF} \(epoch 0\) \| ram \| 6x6 \| (\d+) \| '
                    r'(\S+) / (\S+) / (\S+) \|', result.stdout, re.MULTILINE)
    assert row, result.stdout[-3000:]
    assert int(row[1]) >= 1 and all(0 <= float(v) <= 1 for v in row.groups()[1:])
    scored = json.loads(next((tmp_path / 'work' / 'scores').glob('*.json')).read_text())
    assert scored['kinds']['lesion']['n'] == int(row[1])
    # The generated set's masks by kind are scored too: the red lesions apart from the bright.
    assert {'red', 'exudate'} <= set(scored['kinds'])
    assert 1 <= scored['kinds']['red']['n'] <= int(row[1])
    assert re.search(rf'^\| synthetic \| red \| {CNF} \(epoch 0\) \| ram \|', result.stdout, re.MULTILINE)


def test_ram_output_dir_inside_an_image_folder_is_refused(workdir):
    config = config_module.load(CONFIG)
    checkpoint.save(workdir / 'weights' / CONFIG / 'weights.pt', model=config.build_net(),
                    config=config, epoch=0)
    images = workdir / 'data' / 'test_tiny'
    before = sorted(p.name for p in images.iterdir())
    result = run_script('ram.py', '--cnf', CONFIG, '--images', images, '--output_dir',
                        images / 'maps', '--no_progress', cwd=workdir, check=False)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'is inside the input folder' in result.stderr
    assert sorted(p.name for p in images.iterdir()) == before


@pytest.mark.parametrize('seed, eye', [(1, 'left'), (2, 'right'), (3, 'left')])
def test_optic_disc_is_found_where_the_synthetic_photograph_has_it(seed, eye):
    """`scores.optic_disc` on the plain conversion of a synthetic photograph (level 0) covers
    the disc the generator drew, and is small: a share of the fundus near the disc's own."""
    from retina.data import synthetic
    from retina.model.augment import centre_crop
    geometry = synthetic._eye_geometry(np.random.default_rng(seed), 576, 384, eye)
    photo, _ = synthetic.make_fundus(0, np.random.default_rng(seed), 576, 384, eye)
    box = crop.find_eye_box_fast(photo)
    converted = np.array(crop.crop_to_eye(photo, 128, box))
    window = centre_crop(torch.from_numpy(converted).permute(2, 0, 1), (112, 112))
    window = window.to(torch.uint8).permute(1, 2, 0).numpy()
    disc = scores.optic_disc(window, figures.fundus_mask(window))
    left, top, right, bottom = box
    x = (geometry.disc_x - left) / (right - left) * 128 - 8  # converted, then the window
    y = (geometry.disc_y - top) / (bottom - top) * 128 - 8
    assert disc[int(round(y)), int(round(x))], 'the found disc misses the drawn one'
    assert 0.005 < disc.mean() < 0.05


def test_levels_are_cut_at_a_released_net_s_own_cut_offs(tmp_path, monkeypatch):
    """A net that carries its own cut-offs (a released one: its spec's cuts) gets its
    pictures' levels, and the by-level figure's, from them, as predict.py cuts its score; a
    net without gets 0.5 .. 3.5."""
    import dataclasses

    from conftest import as_loaded, noise_images
    from retina.core.metrics import FIXED_CUTS, to_levels
    config = config_module.load('c_128_5x5_32_ram')
    torch.manual_seed(0)
    plain = as_loaded(config, config.build_net().eval())
    noise_images(tmp_path / 'images', 3)
    image_paths = collect_images([tmp_path / 'images'])
    captions, examples = [], []
    caption, by_level = figures.caption, ram.examples_by_level

    def recording(name, score, level=None, *args, **kwargs):
        captions.append((score, level))
        return caption(name, score, level, *args, **kwargs)

    def recording_examples(items, by_label):
        examples.extend((item.prediction, item.level) for item in items)
        return by_level(items, by_label)

    monkeypatch.setattr(figures, 'caption', recording)
    monkeypatch.setattr(ram, 'examples_by_level', recording_examples)
    ram.make_maps(plain, image_paths, tmp_path / 'fixed', progress=False)
    scores = [score for score, _ in captions]
    assert [level for _, level in captions] == list(to_levels(scores, FIXED_CUTS))
    # cut-offs below every score: each is level 4 by the net's own cut-offs
    low = min(scores) - 10
    own = (low, low + 1, low + 2, low + 3)
    released = dataclasses.replace(plain, spec=dataclasses.replace(plain.spec, cuts=own))
    captions.clear()
    examples.clear()
    ram.make_maps(released, image_paths, tmp_path / 'own', progress=False)
    assert [level for _, level in captions] == [4, 4, 4]
    assert [level for _, level in examples] == [4, 4, 4]
