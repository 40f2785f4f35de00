"""Batched augmentation: identity, rotation, flips, zoom, translation, colour noise, TTA."""

import numpy as np
import pytest
import torch

from retina.data.labels import MEAN, STD
from retina.model import augment
from retina.model import config as config_module
from retina.model.augment import (COLOUR_EV, COLOUR_U, KAGGLE, affine_theta, augment_batch, broadcast_params,
                                  centre_crop, colour_shift, identity_params, prepare_batch,
                                  tta_params, warp)

CONFIG = 'c_128_5x5_32_ram'
AUG = dict(zoom_range=(1 / 1.15, 1.15), rotation_range=(0, 360), shear_range=(0, 0),
           translation_range=(-40, 40), do_flip=True, allow_stretch=True)


def dot_image(size=32, row=16, col=26):
    image = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    image[0, :, row, col] = 255
    return image


def bright(x):
    return [tuple(p) for p in (x[0, 0] > 100).nonzero().tolist()]


def with_params(**changes):
    params = identity_params(1)
    params.update({k: torch.tensor([float(v)]) for k, v in changes.items()})
    return params


def test_identity_gives_the_centred_window_exactly():
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    out = warp(images, identity_params(3), (28, 28))
    assert torch.allclose(out, images[:, :, 6:34, 6:34].float(), atol=1e-3)
    assert torch.equal(centre_crop(images, (28, 28)), images[:, :, 6:34, 6:34].float())


def test_90_degree_rotation_turns_counter_clockwise():
    # Pixel (row 16, col 26) has its centre at (x, y) = (10.5, 0.5) from the image centre
    # (y down): +90° takes it to (0.5, -10.5), i.e. (row 5, col 16); -90° to (-0.5, 10.5).
    out = warp(dot_image(), with_params(rotation=90), (32, 32))
    assert bright(out) == [(5, 16)]
    out = warp(dot_image(), with_params(rotation=-90), (32, 32))
    assert bright(out) == [(26, 15)]


def test_horizontal_flip_mirrors_left_and_right():
    assert bright(warp(dot_image(), with_params(flip=1), (32, 32))) == [(16, 5)]


def test_translation_moves_content_by_pixels_and_zoom_scales_about_the_centre():
    assert bright(warp(dot_image(), with_params(tx=-4, ty=3), (32, 32))) == [(19, 22)]
    zoomed = warp(dot_image(row=16, col=21), with_params(zoom_x=2, zoom_y=2), (32, 32))
    cols = [c for _, c in bright(zoomed)]
    assert min(cols) >= 25 and max(cols) <= 28  # 5.5 px from the centre becomes ~11


def test_outside_the_photo_is_black():
    out = warp(torch.full((1, 3, 16, 16), 200, dtype=torch.uint8), with_params(tx=8), (16, 16))
    assert out[0, :, :, :6].max() < 1e-3 and out[0, :, :, 10:].min() > 199


def test_each_image_of_a_batch_gets_its_own_transform():
    images = dot_image().expand(2, -1, -1, -1).contiguous()
    params = identity_params(2)
    params['rotation'] = torch.tensor([0.0, 90.0])
    out = warp(images, params, (32, 32))
    assert bright(out[:1]) == [(16, 26)] and bright(out[1:]) == [(5, 16)]


def test_standardise_and_colour_noise_order_and_statistics():
    images = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)
    x = prepare_batch(images, (4, 4), constants=KAGGLE)
    expected = (100 - MEAN) / STD
    assert torch.allclose(x[0, :, 0, 0], torch.as_tensor(expected), atol=1e-5)
    sigma = 0.5
    colour = sigma * torch.randn(20000, 3, generator=torch.Generator().manual_seed(0))
    shifts = colour_shift(colour, KAGGLE).numpy()
    expected_cov = COLOUR_U @ np.diag((sigma * COLOUR_EV) ** 2) @ COLOUR_U.T
    np.testing.assert_allclose(np.cov(shifts.T), expected_cov, atol=0.03)
    assert np.abs(shifts.mean(0)).max() < 0.03
    params = with_params()
    params['colour'] = torch.tensor([[1.0, 0.0, 0.0]])
    noisy = augment_batch(images, params, (4, 4), constants=KAGGLE)
    np.testing.assert_allclose((noisy - x)[0, :, 0, 0].numpy(), COLOUR_U[:, 0] * COLOUR_EV[0],
                               atol=1e-5)


def test_output_is_float32_of_the_window_size():
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    params = augment.random_params(2, AUG, 0.5, torch.Generator().manual_seed(1))
    out = augment_batch(images, params, (16, 16), constants=KAGGLE)
    assert out.dtype == torch.float32  # tests/test_gpu.py checks the device
    assert out.shape == (2, 3, 16, 16)


def test_theta_is_the_identity_for_identity_params_at_equal_sizes():
    theta = affine_theta(identity_params(1), (50, 50), (50, 50))
    assert torch.allclose(theta, torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]), atol=1e-6)


def test_tta_parameters_from_the_halton_sequence():
    one = tta_params(1, 0, AUG, 0.5)
    assert one == [dict(rotation=0.0, shear=0.0, tx=0.0, ty=0.0, zoom_x=1.0, zoom_y=1.0,
                        flip=0.0, colour=[0.0, 0.0, 0.0])]
    params = tta_params(50, 0, AUG, 0.5)
    assert len(params) == 50
    rotations = np.array([p['rotation'] for p in params])
    assert rotations.min() >= 0 and rotations.max() <= 360 and rotations.std() > 80
    assert all(abs(p['tx']) <= 40 and 1 / 1.15 - 1e-9 <= p['zoom_x'] <= 1.15 + 1e-9
               for p in params)
    flips = [p['flip'] for p in params]
    assert 0.3 < np.mean(flips) < 0.7
    colour = np.array([p['colour'] for p in params])
    assert np.isfinite(colour).all() and 0.3 < colour.std() < 0.7
    # --skip continues the same sequence.
    assert tta_params(10, 40, AUG, 0.5) == params[40:]
    applied = broadcast_params(params[3], 4)
    assert applied['colour'].shape == (4, 3) and applied['rotation'].shape == (4,)
    assert applied['rotation'][0].item() == pytest.approx(params[3]['rotation'], rel=1e-6)


def test_theta_scales_area_by_the_zooms_and_flips_orientation():
    params = augment.random_params(64, dict(AUG, shear_range=(-20, 20)), 0.5,
                                   torch.Generator().manual_seed(2))
    theta = affine_theta(params, (64, 64), (64, 64))[:, :, :2]
    # theta maps output to input; its inverse (the forward map) scales areas by
    # zoom_x · zoom_y, rotation and shear keep them, and a flip reverses orientation.
    det = torch.det(theta.inverse())
    expected = params['zoom_x'] * params['zoom_y'] * (1 - 2 * params['flip'])
    assert torch.allclose(det, expected, atol=1e-4)
    assert (params['flip'] == 1).any() and (params['flip'] == 0).any()


def test_sampling_grid_is_affine_grid():
    import torch.nn.functional as F

    from retina.model.augment import sampling_grid
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    for size in ((7, 9), (16, 16)):
        expected = F.affine_grid(theta, (5, 3, *size), align_corners=False)
        torch.testing.assert_close(sampling_grid(theta, size), expected)


def test_prepare_batch_writes_the_asked_dtype_and_layout():
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    params = identity_params(2)
    for p in (None, params):
        plain = prepare_batch(images, (16, 16), p, constants=KAGGLE)
        fast = prepare_batch(images, (16, 16), p, constants=KAGGLE, dtype=torch.bfloat16,
                             memory_format=torch.channels_last)
        assert fast.dtype == torch.bfloat16
        assert fast.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(fast.float(), plain, atol=0.02, rtol=0.01)


def test_a_huge_skip_draws_its_augmentations_at_once():
    from scipy.stats import qmc
    from retina.model.augment import halton, tta_params
    assert np.array_equal(halton(range(41, 46)),
                          qmc.Halton(d=10, scramble=False).random(46)[41:])
    aug = config_module.load(CONFIG).cnf['aug_params']
    params = tta_params(3, 10 ** 15, aug, 0.25)
    assert len(params) == 3 and all(np.isfinite(p['rotation']) for p in params)


def test_the_scrambled_tta_sequence_is_balanced_from_its_first_points():
    """The original's unscrambled Halton sequence flips none of its first 10 augmentations
    and shifts their colours one way; the scrambled default spreads every dimension."""
    def summary(sequence, n):
        params = augment.tta_params(n, 0, AUG, 0.5, sequence)
        colours = np.array([p['colour'] for p in params]) / 0.5
        return np.mean([p['flip'] for p in params]), colours.mean(0)
    flips, colours = summary('halton', 10)
    assert flips == 0 and colours[0] < -0.3
    for n in (10, 20, 50):
        flips, colours = summary('scrambled', n)
        assert 0.35 <= flips <= 0.65 and np.abs(colours).max() < 0.2, (n, flips, colours)
    # Deterministic, one point per index: a skip continues the same sequence.
    again = augment.tta_params(20, 0, AUG, 0.5, 'scrambled')
    assert again == augment.tta_params(20, 0, AUG, 0.5, 'scrambled')
    assert again[10:] == augment.tta_params(10, 10, AUG, 0.5, 'scrambled')
    assert augment.tta_params(10, 0, AUG, 0.5) == augment.tta_params(10, 0, AUG, 0.5, 'scrambled')
    with pytest.raises(ValueError, match='sequence must be one of'):
        augment.tta_params(10, 0, AUG, 0.5, 'sobol')
