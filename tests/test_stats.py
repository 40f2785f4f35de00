"""retina.stats: a data set's own mean, std, colour PCA and balance weights, and the configs,
training and graded nets that use them instead of the Kaggle constants."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from retina.core.errors import UserError
from retina.data import stats
from retina.data.labels import BALANCE_WEIGHTS, FINAL_BALANCE_WEIGHTS, balance_weights_at
from retina.data.labels import balanced_sample, labelled_images
from retina.model import augment
from retina.model import config as config_module
from retina.model.augment import KAGGLE, constants_for, prepare_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN = dict(mean=[100.0, 80.0, 60.0], std=[50.0, 40.0, 20.0],
           colour_u=np.eye(3).tolist(), colour_ev=[2.0, 1.0, 0.5],
           balance_weights=[1.0, 9.0, 1.0, 1.0, 1.0])
OWN_CONFIG = '''from configs.c_128_5x5_32 import cnf as base, layers
from retina.data.stats import load_stats

cnf = dict(base, **load_stats({path!r}))
'''


def write_images(folder, arrays, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f'{i}_{eye}' for i in range(len(arrays)) for eye in ('left', 'right')]
    for name, array in zip(names, arrays):
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(folder / f'{name}.png')
    return names[:len(arrays)]


def write_labels(path, names, levels):
    path.write_text('image,level\n' + ''.join(f'{n},{lv}\n' for n, lv in zip(names, levels)))
    return path


def quick_init(tensor, gain=1.0):
    with torch.no_grad():
        return tensor.normal_(0, gain / tensor[0].numel() ** 0.5)


def run_stats(*args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, '-m', 'retina.stats', *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=env)


def test_two_flat_colours_give_known_mean_std_and_one_colour_axis(tmp_path):
    names = write_images(tmp_path / 'imgs', [np.full((6, 6, 3), (10, 20, 30)),
                                            np.full((6, 6, 3), (30, 60, 90))])
    labels = write_labels(tmp_path / 'labels.csv', names, [0, 2])
    out = stats.compute(tmp_path / 'imgs', labels, progress=False)
    np.testing.assert_allclose(out['mean'], [20, 40, 60])
    np.testing.assert_allclose(out['std'], [10, 20, 30])
    # Standardised, every pixel is ±(1, 1, 1): one axis carries all the variance (3).
    np.testing.assert_allclose(out['colour_ev'], [3 ** 0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(out['colour_u'])[:, 0], -np.ones(3) / 3 ** 0.5)
    np.testing.assert_allclose(out['balance_weights'], [2, 1, 2, 1, 1])
    assert out['about']['level_counts'] == [1, 0, 1, 0, 0]
    assert out['about']['missing_levels'] == [1, 3, 4]


def test_colour_pca_of_a_crafted_distribution(tmp_path):
    rng = np.random.default_rng(0)
    mixing = np.array([[30.0, 0, 0], [20, 10, 0], [10, 5, 4]])  # correlated channels
    pixels = [np.clip(np.round(rng.standard_normal((32, 32, 3)) @ mixing.T + (120, 80, 60)),
                      0, 255) for _ in range(3)]
    write_images(tmp_path / 'imgs', pixels)
    out = stats.compute(tmp_path / 'imgs', progress=False)
    flat = np.concatenate([p.reshape(-1, 3) for p in pixels])
    np.testing.assert_allclose(out['mean'], flat.mean(0), rtol=1e-9)
    np.testing.assert_allclose(out['std'], flat.std(0), rtol=1e-9)
    correlation = np.corrcoef(flat.T)
    u, ev = np.asarray(out['colour_u']), np.asarray(out['colour_ev'])
    np.testing.assert_allclose(u @ np.diag(ev ** 2) @ u.T, correlation, atol=1e-9)
    np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-9)
    assert list(ev) == sorted(ev, reverse=True) and np.isclose((ev ** 2).sum(), 3)
    # ...and the generating distribution's, up to sampling noise.
    truth = mixing @ mixing.T
    truth = truth / np.sqrt(np.outer(np.diag(truth), np.diag(truth)))
    np.testing.assert_allclose(ev, np.sqrt(np.linalg.eigvalsh(truth)[::-1]), atol=0.02)
    assert 'balance_weights' not in out
    sampled = stats.compute(tmp_path / 'imgs', sample=2, progress=False)['about']
    assert (sampled['images'], sampled['of_images']) == (2, 3)


def test_the_kaggle_constants_have_the_shape_stats_writes():
    u, ev = np.asarray(KAGGLE.colour_u), np.asarray(KAGGLE.colour_ev)
    np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-3)  # as published: 4 digits
    assert np.isclose((ev ** 2).sum(), 3, atol=0.01)  # the PCA of standardised pixels
    np.testing.assert_allclose(BALANCE_WEIGHTS[0], 35126 / 25810)


def test_cli_writes_stats_a_config_picks_up(workdir):
    result = run_stats('--directory', 'data/train_tiny', '--no_progress', cwd=workdir)
    assert result.returncode == 0, result.stderr
    written = workdir / 'data' / 'stats_train_tiny.json'
    assert 'wrote data/stats_train_tiny.json' in result.stdout
    saved = json.loads(written.read_text())
    paths, levels = labelled_images(workdir / 'data' / 'train_tiny',
                                         workdir / 'data' / 'trainLabels.csv')
    counts = np.bincount(levels, minlength=5)
    expected = np.where(counts > 0, len(levels) / np.maximum(counts, 1), 1.0)
    np.testing.assert_allclose(saved['balance_weights'], expected)
    pixels = np.concatenate([np.asarray(Image.open(p).convert('RGB')).reshape(-1, 3)
                             for p in paths]).astype(np.float64)
    np.testing.assert_allclose(saved['mean'], pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(saved['std'], pixels.std(0), rtol=1e-9)

    (workdir / 'configs').mkdir()
    (workdir / 'configs' / 'c_own.py').write_text(
        OWN_CONFIG.format(path='data/stats_train_tiny.json'))
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        config = config_module.load('configs/c_own.py')
    finally:
        os.chdir(cwd)
    for key in stats.CONSTANT_KEYS:
        np.testing.assert_allclose(config.cnf[key], saved[key])
    assert json.loads(config_module.dumps(config))['cnf']['std'] == saved['std']
    assert constants_for(config.cnf) != KAGGLE


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / 'empty').mkdir()
    write_images(tmp_path / 'imgs', [np.zeros((4, 4, 3)), np.full((4, 4, 3), 9)])
    write_labels(tmp_path / 'labels.csv', ['0_left'], [0])
    for args, words in [(['--directory', 'empty'], 'no images'),
                        (['--directory', 'imgs', '--labels', 'labels.csv'], 'no label for'),
                        (['--directory', 'imgs', '--labels', 'absent.csv'], 'not found')]:
        result = run_stats(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and 'Traceback' not in result.stderr
    assert not (tmp_path / 'data').exists()


def test_raw_photographs_and_mixed_sizes_are_refused_as_training_refuses_them(tmp_path):
    write_images(tmp_path / 'raw', [np.zeros((6, 8, 3)), np.zeros((6, 8, 3))])
    write_images(tmp_path / 'mixed', [np.zeros((8, 8, 3)), np.zeros((6, 6, 3))])
    for folder, words in (('raw', 'is not square'), ('mixed', 'mixes sizes')):
        result = run_stats('--directory', folder, '--no_progress', cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and 'Traceback' not in result.stderr
    assert not (tmp_path / 'data').exists()


def test_own_constants_change_the_network_input_and_none_are_assumed():
    images = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    images[:, 1], images[:, 2] = 120, 80
    own = constants_for(OWN)
    plain = prepare_batch(images, (4, 4), constants=own)
    torch.testing.assert_close(plain[0, :, 0, 0], torch.tensor([0.0, 1.0, 1.0]))
    assert constants_for({}) is KAGGLE
    torch.testing.assert_close(prepare_batch(images, (4, 4), constants=constants_for({})),
                               prepare_batch(images, (4, 4), constants=KAGGLE), rtol=0, atol=0)
    with pytest.raises(TypeError, match='constants'):  # no Kaggle fallback: a caller must say
        prepare_batch(images, (4, 4))
    with pytest.raises(ValueError, match='pixel constants needed'):
        prepare_batch(images, (4, 4), constants=None)
    # Colour noise U · (c ∘ EV): with U = I and EV = (2, 1, 0.5), c = (1, 1, 1) adds those.
    params = augment.identity_params(2)
    params['colour'] = torch.ones(2, 3)
    noisy = prepare_batch(images, (4, 4), params, constants=own)
    torch.testing.assert_close(noisy[0, :, 1, 1] - plain[0, :, 1, 1],
                               torch.tensor([2.0, 1.0, 0.5]), rtol=0, atol=1e-5)
    assert not torch.allclose(noisy, prepare_batch(images, (4, 4), params, constants=KAGGLE))


def test_own_balance_weights_change_the_draw():
    levels = np.array([0] * 500 + [1] * 500)
    rng = np.random.default_rng(0)
    drawn = levels[balanced_sample(levels, 0, rng, n=20_000,
                                        weights=OWN['balance_weights'])]
    assert abs(drawn.mean() - 0.9) < 0.01  # weights 1 : 9
    kaggle = levels[balanced_sample(levels, 0, rng, n=20_000)]
    expected = BALANCE_WEIGHTS[1] / BALANCE_WEIGHTS[:2].sum()
    assert abs(kaggle.mean() - expected) < 0.01
    np.testing.assert_allclose(balance_weights_at(10_000, weights=[5] * 5),
                               FINAL_BALANCE_WEIGHTS)


@pytest.mark.parametrize('key, value, words', [
    ('std', [50, 0, 20], 'std must be finite positive numbers'),
    ('mean', [100, 80], 'mean must be 3 numbers'),
    ('mean', [300, 80, 60], '0..255'),
    ('colour_u', [[1, 0, 0], [0, float('nan'), 0], [0, 0, 1]], 'colour_u must be finite'),
    ('colour_u', [1, 0, 0], 'colour_u must be 3 × 3 numbers'),
    ('colour_ev', [1, -1, 0], 'colour_ev must be finite numbers ≥ 0'),
    ('balance_weights', [1, 2, 3, 4], 'balance_weights must be 5 numbers'),
    ('balance_weights', 'abcde', 'balance_weights must be 5 numbers'),
])
def test_bad_constants_in_a_config_are_one_line(key, value, words):
    base = config_module.load('c_128_5x5_32')
    with pytest.raises(UserError, match=words) as caught:
        config_module.check_cnf(dict(base.cnf, **{key: value}), 'configs/c_x.py')
    assert '\n' not in str(caught.value) and str(caught.value).startswith('configs/c_x.py: ')


def test_load_stats_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match='not found; write it with python -m retina.stats'):
        stats.load_stats(tmp_path / 'absent.json')
    (tmp_path / 'bad.json').write_text('{"mean": ')
    with pytest.raises(UserError, match='not a JSON file'):
        stats.load_stats(tmp_path / 'bad.json')
    (tmp_path / 'other.json').write_text('{"a": 1}')
    with pytest.raises(UserError, match='no mean, std'):
        stats.load_stats(tmp_path / 'other.json')
    (tmp_path / 'own.json').write_text(json.dumps(dict(OWN, about={'images': 3})))
    assert stats.load_stats(tmp_path / 'own.json') == OWN  # `about` stays out of the config


def test_a_trained_net_carries_its_constants_to_later_stages(tmp_path, monkeypatch):
    from retina.model import checkpoint
    from retina.publish.export import ExportedNet
    (tmp_path / 'own.json').write_text(json.dumps(OWN))
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'c_own.py').write_text(OWN_CONFIG.format(path='own.json'))
    monkeypatch.chdir(tmp_path)
    config = config_module.load('configs/c_own.py')
    monkeypatch.setattr(torch.nn.init, 'orthogonal_', quick_init)  # the QR costs seconds
    checkpoint.save(tmp_path / 'w.pt', config.build_net(), config, epoch=0)
    # The config module changes after training: the checkpoint's constants still hold.
    (tmp_path / 'own.json').write_text(json.dumps(dict(OWN, mean=[1.0, 2.0, 3.0])))
    loaded = checkpoint.load_net(config_module.load('configs/c_own.py'), tmp_path / 'w.pt')
    assert loaded.constants == constants_for(OWN)
    exported = ExportedNet(loaded.net, loaded.spec, with_ram=False)
    nhwc = torch.randint(0, 256, (2, 128, 128, 3), dtype=torch.uint8)
    with torch.no_grad():
        standardised = prepare_batch(nhwc.permute(0, 3, 1, 2), (112, 112),
                                     constants=constants_for(OWN))
        torch.testing.assert_close(exported(nhwc), loaded.net(standardised).squeeze(1))
    assert exported.spec.constants == constants_for(OWN)
    # predict.py and ram.py feed the net its own standardisation.
    from retina.grade.grader import load_grader, passes
    from retina.model.scoring import prepare_window
    grader = load_grader('configs/c_own.py', tmp_path / 'w.pt')
    images = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    own = prepare_batch(images, grader.input_size, constants=constants_for(OWN))
    with torch.no_grad():
        own_features = grader.net(own, return_features=True)[1].double().numpy()
        kaggle_features = grader.net(prepare_batch(images, grader.input_size, constants=KAGGLE),
                                     return_features=True)[1].double().numpy()
    features = passes(grader, images, [None])[1][0]
    np.testing.assert_allclose(features, own_features, rtol=1e-5, atol=1e-6)
    assert not np.allclose(features, kaggle_features, rtol=1e-3, atol=1e-3)
    windows = augment.centre_crop(images, grader.input_size).to(torch.uint8)
    torch.testing.assert_close(prepare_window(windows, loaded.spec), own)


def test_weights_graded_under_another_config_name_keep_their_own_constants(tmp_path,
                                                                         monkeypatch):
    """--cnf c_128_5x5_32 --weights_from (weights trained as c_own, its own data's stats):
    every stage standardises with the weights' constants, not the named config's."""
    from retina.grade.grader import load_grader
    from retina.model import checkpoint
    from retina.publish.export import ExportedNet
    (tmp_path / 'own.json').write_text(json.dumps(OWN))
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'c_own.py').write_text(OWN_CONFIG.format(path='own.json'))
    monkeypatch.chdir(tmp_path)
    config = config_module.load('configs/c_own.py')
    monkeypatch.setattr(torch.nn.init, 'orthogonal_', quick_init)
    checkpoint.save(tmp_path / 'w.pt', config.build_net(), config, epoch=0)
    loaded = checkpoint.load_net(config_module.load('c_128_5x5_32'), tmp_path / 'w.pt')
    assert loaded.constants == constants_for(OWN) != KAGGLE
    grader = load_grader('c_128_5x5_32', tmp_path / 'w.pt')
    assert grader.constants == constants_for(OWN)
    np.testing.assert_allclose(ExportedNet(grader.net, grader.spec, with_ram=False)
                               .spec.constants.mean, OWN['mean'])


def test_training_standardises_and_balances_with_the_config_constants():
    from retina.core.runtime import Runtime
    from retina.model.checkpoint import InputSpec
    from retina.model.inference import predict
    from retina.train.loop import epoch_sample, train_one_epoch
    config = config_module.load('c_128_5x5_32')
    config.cnf.update(OWN, h=16, w=16, batch_size_train=4)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(2, 1))
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 20, 20), dtype=np.uint8)
    runtime, used = Runtime(torch.device('cpu')), []

    def prepare(batch, size, params, **options):
        used.append(options['constants'])
        return prepare_batch(batch, size, params, **options)

    train_one_epoch(net, torch.optim.SGD(net.parameters(), lr=0.01), images, np.arange(8) % 5,
                    np.arange(8), config, runtime, torch.Generator().manual_seed(0),
                    progress=False, prepare=prepare)
    assert used and all(c is constants_for(OWN) for c in used)
    # Validation: the centred window standardised with the config's mean and std.
    flat = np.full((1, 3, 20, 20), 100, dtype=np.uint8)
    config.cnf.update(mean=[100.0] * 3)
    with torch.no_grad():
        expected = float(net(torch.zeros(1, 3, 16, 16)))
    np.testing.assert_allclose(predict(net, flat, [0], InputSpec.of_config(config), runtime, 4),
                               [expected], rtol=1e-5)
    levels = np.array([0] * 500 + [1] * 500)
    sample = epoch_sample(np.arange(1000), levels, 1, 0, 0.975, runtime,
                          config.cnf['balance_weights'])
    assert abs(levels[sample].mean() - 0.9) < 0.03


def test_default_labels_of_another_folder_mean_no_weights_not_an_error(workdir):
    result = run_stats('--directory', 'data/test_tiny', '--no_progress', cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert 'have no label in data/trainLabels.csv: no balance weights' in result.stderr
    saved = json.loads((workdir / 'data' / 'stats_test_tiny.json').read_text())
    assert 'balance_weights' not in saved and len(saved['colour_ev']) == 3


def test_help_explains_every_option():
    from click.testing import CliRunner
    result = CliRunner().invoke(stats.main, ['--help'])
    assert result.exit_code == 0
    for option in stats.main.params:
        assert option.help, option.name
        assert f'--{option.name}' in result.output
    assert 'over all pixels' in ' '.join(result.output.split())
