"""The batched JPEG re-encoding of training images: close to PIL's encoder at every quality,
used by training when the config asks, and reproducible from the seed."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from retina.data.jpeg import jpeg_batch, quantisation_tables, recompressed
from retina.model import config as config_module
from retina.model.augment import KAGGLE, augment_batch, prepare_batch, random_params


def photo_like(n=4, side=64, seed=0):
    """Smooth colour images with edges and spots, not noise: what JPEG is made for."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side] / side
    images = []
    for _ in range(n):
        base = np.stack([120 + 80 * np.sin(3 * xx + rng.uniform(0, 6)),
                         60 + 40 * np.cos(4 * yy + rng.uniform(0, 6)),
                         30 + 20 * xx], -1)
        for _ in range(6):
            cy, cx = rng.integers(4, side - 4, 2)
            base[cy - 2:cy + 2, cx - 2:cx + 2] = rng.uniform(0, 255, 3)
        images.append(np.clip(base, 0, 255).astype(np.uint8))
    return np.stack(images)


def pil_jpeg(image, quality):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, 'JPEG', quality=quality)
    return np.asarray(Image.open(buffer).convert('RGB'))


@pytest.mark.parametrize('quality', [5, 20, 50, 90])
def test_close_to_pil(quality):
    images = photo_like()
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    ours = jpeg_batch(x, torch.full((len(images),), float(quality))).permute(0, 2, 3, 1).numpy()
    pil = np.stack([pil_jpeg(image, quality) for image in images]).astype(np.float32)
    damage = np.abs(pil - images).mean()
    assert damage > 0.5
    assert np.abs(ours - pil).mean() < 0.35 * damage + 0.5  # ours is PIL's damage, not another


def test_tables_follow_libjpeg_scaling():
    tables = quantisation_tables(torch.tensor([50.0, 100.0, 1.0]))
    assert tables[0, 0, 0, 0] == 16 and tables[0, 1, 0, 0] == 17   # quality 50: the base tables
    assert tables[1].max() == 1                                    # quality 100: no quantisation
    assert tables[2].min() == 255 or tables[2].max() == 255


def test_only_the_chosen_images_change():
    x = torch.from_numpy(photo_like()).permute(0, 3, 1, 2)
    out = recompressed(x, torch.tensor([0.0, 10.0, 0.0, 30.0]))
    assert torch.equal(out[0], x[0].float()) and torch.equal(out[2], x[2].float())
    assert not torch.equal(out[1], x[1].float()) and not torch.equal(out[3], x[3].float())
    assert torch.equal(recompressed(x, torch.zeros(4)), x.float())


def test_training_uses_it_and_is_reproducible():
    cnf = config_module.load('c_128_5x5_32_ram').cnf
    assert cnf['jpeg']['probability'] > 0 and cnf['jpeg']['quality'][0] <= 10
    draw = lambda seed: random_params(256, cnf['aug_params'], cnf['sigma'],
                                      torch.Generator().manual_seed(seed), jpeg=cnf['jpeg'])
    a, b = draw(1), draw(1)
    assert torch.equal(a['jpeg'], b['jpeg'])
    chosen = a['jpeg'] > 0
    assert 0.3 < chosen.float().mean() < 0.7
    low, high = cnf['jpeg']['quality']
    assert a['jpeg'][chosen].min() >= low and a['jpeg'][chosen].max() <= high
    assert 'jpeg' not in random_params(4, cnf['aug_params'], cnf['sigma'])  # only when asked
    x = torch.from_numpy(np.repeat(photo_like(1, 128), 4, 0)).permute(0, 3, 1, 2)
    params = random_params(4, cnf['aug_params'], 0.0, torch.Generator().manual_seed(0))
    plain = augment_batch(x, params, (112, 112), constants=KAGGLE)
    params['jpeg'] = torch.tensor([0.0, 10.0, 0.0, 10.0])
    squeezed = augment_batch(x, params, (112, 112), constants=KAGGLE)
    assert torch.equal(plain[0], squeezed[0]) and not torch.equal(plain[1], squeezed[1])


@pytest.mark.parametrize('jpeg, named', [
    ('dict(probability=0.5, quality=(50, 5))', 'jpeg quality'),
    ('dict(probability=0.5, quality=(5, 50), consistency=-1)', 'jpeg consistency'),
    ('dict(probability=0.5, quality=(5, 50), consistensy=1)', 'optionally consistency')])
def test_a_bad_jpeg_key_is_named(tmp_path, jpeg, named):
    from retina.core.errors import UserError
    bad = tmp_path / 'c_bad.py'
    bad.write_text('from configs.c_128_5x5_32_ram import cnf as base, layers\n'
                   f"cnf = dict(base, jpeg={jpeg})\n")
    with pytest.raises(UserError, match=named):
        config_module.load(str(bad))


def test_the_consistency_pairs_each_image_with_its_jpeg_copy_under_one_warp():
    from retina.train.loop import paired
    cnf = config_module.load('c_256_5x5_32_ram_jpeg').cnf
    batch = torch.from_numpy(photo_like(3, 32)).permute(0, 3, 1, 2)
    draw = lambda seed: paired(batch, torch.tensor([0.0, 2.0, 4.0]),
                               random_params(3, cnf['aug_params'], cnf['sigma'],
                                             torch.Generator().manual_seed(seed), jpeg=cnf['jpeg']),
                               cnf['jpeg'], torch.Generator().manual_seed(seed), 'cpu')
    doubled, target, params = draw(5)
    assert torch.equal(doubled[:3], batch) and torch.equal(doubled[3:], batch)
    assert target.tolist() == [0, 2, 4, 0, 2, 4]
    assert torch.equal(params['rotation'][:3], params['rotation'][3:])
    assert torch.equal(params['colour'][:3], params['colour'][3:])
    low, high = cnf['jpeg']['quality']
    assert params['jpeg'][:3].tolist() == [0, 0, 0]
    assert params['jpeg'][3:].min() >= low and params['jpeg'][3:].max() <= high
    assert torch.equal(draw(5)[2]['jpeg'], params['jpeg'])  # reproducible from the seed


def test_the_consistency_loss_measures_the_gap_not_the_size():
    from retina.data.jpeg import consistency_loss
    out = torch.tensor([1.0, 2.0, 1.0, 2.0])
    features = torch.randn(4, 6)
    same = torch.cat([features[:2], features[:2]])
    assert consistency_loss(out, same, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    gap = consistency_loss(torch.tensor([1.0, 2.0, 1.5, 2.5]), same, 2.0).item()
    assert gap == pytest.approx(2.0 * 0.25, rel=1e-5)
    moved = consistency_loss(out, features, 1.0)
    assert moved.item() > 0
    # a feature shrunk tenfold is not more consistent: each is divided by its spread
    assert consistency_loss(out, features / 10, 1.0).item() == pytest.approx(moved.item(), rel=1e-3)


def _jpeg_gap_after_training(weight, images, levels):
    """A small RAM net trained 6 steps with the consistency `weight`; the mean |score of an
    image − score of its quality-20 copy| afterwards, in eval mode."""
    from retina.core.runtime import Runtime
    from retina.model.nets import build_net, conv, ram_head, with_batch_norm
    from retina.train.loop import make_optimizer, train_one_epoch
    config = config_module.load('c_128_5x5_32_ram')
    config.cnf.update(h=48, w=48, batch_size_train=16,
                      jpeg=dict(probability=0.5, quality=(20, 20), consistency=weight))
    torch.manual_seed(0)
    net = build_net(with_batch_norm([conv('c1', 8, 3, 2), conv('c2', 16, 3, 2)] + ram_head()),
                    (48, 48))
    optimizer = make_optimizer(net, config.cnf, 0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        train_one_epoch(net, optimizer, images, levels, np.arange(len(images)), config,
                        Runtime(torch.device('cpu')), generator, progress=False)
    net.eval()
    squeezed = torch.from_numpy(np.stack([pil_jpeg(image, 20) for image in
                                          images.permute(0, 2, 3, 1).numpy()])).permute(0, 3, 1, 2)
    with torch.no_grad():
        plain = net(prepare_batch(images, (48, 48), constants=KAGGLE)).squeeze(1)
        copied = net(prepare_batch(squeezed, (48, 48), constants=KAGGLE)).squeeze(1)
    return (plain - copied).abs().mean().item()


def test_training_with_the_consistency_term_narrows_the_jpeg_gap():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(np.concatenate([photo_like(16, 64, seed=1),
                                              rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)])
                              ).permute(0, 3, 1, 2).contiguous()
    levels = np.array([0] * 16 + [4] * 16)  # fine texture (destroyed by JPEG) is level 4
    without = _jpeg_gap_after_training(0.0, images, levels)
    with_term = _jpeg_gap_after_training(10.0, images, levels)
    assert with_term < 0.5 * without, (with_term, without)
