"""Tests for blending: per-patient inputs, the net, fitted cut-offs, the submission and bad input.

Feature files are made here the way transform.py writes them (an .npy per
statistic and a names file beside them); one feature group is the level plus
noise, so a working blend must reach a high validation kappa on it.
"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import one_line_error, run_script
from retina.blend import blending as blend
from retina.blend import files as blend_files
from retina.blend import fitting
from retina.blend import net as blend_net
from retina.core.errors import UserError
from retina.core.metrics import kappa, to_levels
from retina.core.paths import patient_and_eye
from retina.data.labels import lone_eyes, split_rows
from retina.model.config import lr_for_epoch

REPO = Path(__file__).resolve().parent.parent
CONFIG = 'c_128_5x5_32_ram'
LEVEL_PROBABILITIES = [0.4, 0.15, 0.25, 0.1, 0.1]
N_INFORMATIVE, N_NOISE = 8, 24


def feature_path(cnf, split, stat='mean', n_iter=5, skip=0):
    return Path('data/features') / f'{cnf}_{split}_{stat}_iter_{n_iter}_skip_{skip}.npy'


def write_features(root, cnf, split, names, mean, std, n_iter=5, skip=0):
    """Write mean, std and names files as transform.py does."""
    folder = Path(root) / 'data' / 'features'
    folder.mkdir(parents=True, exist_ok=True)
    np.save(root / feature_path(cnf, split, 'mean', n_iter, skip), mean.astype(np.float32))
    np.save(root / feature_path(cnf, split, 'std', n_iter, skip), std.astype(np.float32))
    (folder / f'{cnf}_{split}_names_iter_{n_iter}_skip_{skip}.txt').write_text(
        '\n'.join(names) + '\n')


def make_eyes(patients, rng):
    """Sorted eye names and their levels; every sixth patient has one eye only."""
    levels = {}
    for patient in patients:
        eyes = ('left', 'right') if patient % 6 else (('left',) if patient % 12 else ('right',))
        base = rng.choice(5, p=LEVEL_PROBABILITIES)
        for eye in eyes:
            shift = rng.integers(-1, 2) if rng.random() < 0.3 else 0
            levels[f'{patient}_{eye}'] = int(np.clip(base + shift, 0, 4))
    names = sorted(levels)
    return names, np.array([levels[n] for n in names])


def informative(levels, rng):
    """Mean features: 8 columns of level + noise and 24 of noise; std features: noise."""
    signal = levels[:, None] + rng.normal(scale=0.35, size=(len(levels), N_INFORMATIVE))
    mean = np.hstack([signal, rng.normal(size=(len(levels), N_NOISE))])
    return mean, np.abs(rng.normal(size=(len(levels), 16)))


def pure_noise(n, rng):
    return rng.normal(size=(n, N_INFORMATIVE + N_NOISE)), np.abs(rng.normal(size=(n, 16)))


def write_labels(path, names, levels):
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['image', 'level'])
        writer.writerows(zip(names, levels))


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    """A working directory with train/test features of 'c_fake' (informative) and
    'c_noise', labels, and a test folder; test feature rows are shuffled and
    include one image that is not in the test folder."""
    root = tmp_path_factory.mktemp('blend')
    rng = np.random.default_rng(5)
    names, levels = make_eyes(range(400), rng)
    (root / 'data').mkdir()
    write_labels(root / 'data' / 'trainLabels.csv', names, levels)
    write_features(root, 'c_fake', 'train', names, *informative(levels, rng))
    write_features(root, 'c_noise', 'train', names, *pure_noise(len(names), rng))

    test_names, test_levels = make_eyes(range(1000, 1060), rng)
    test_folder = root / 'data' / 'test_fake'
    test_folder.mkdir()
    for name in test_names:
        (test_folder / f'{name}.jpeg').write_bytes(b'')
    shuffled = rng.permutation(len(test_names) + 1)
    all_names = test_names + ['9999_left']
    all_levels = np.append(test_levels, 4)
    mean, std = informative(all_levels, rng)
    write_features(root, 'c_fake', 'test', [all_names[i] for i in shuffled], mean[shuffled],
                   std[shuffled])
    noise_mean, noise_std = pure_noise(len(all_names), rng)
    write_features(root, 'c_noise', 'test', [all_names[i] for i in shuffled], noise_mean,
                   noise_std)
    return dict(root=root, names=names, levels=levels,
                test_levels=dict(zip(test_names, test_levels.tolist())))


def fake_run(root, cnf='c_fake'):
    return [root / feature_path(cnf, 'train', 'mean'), root / feature_path(cnf, 'train', 'std')]


def run_cli(*args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / 'blend.py'), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


# ---------------------------------------------------------------- per-patient inputs

def test_per_patient_inputs_pair_eyes_by_name():
    names = ['1_left', '1_right', '2_left', '3_right', 'lonely']
    features = np.arange(len(names) * 2, dtype=np.float32).reshape(-1, 2)
    inputs = blend_net.per_patient_inputs(features, names)
    assert inputs.shape == (5, 5)
    np.testing.assert_array_equal(inputs[:, :2], features)
    other = inputs[:, 2:4]
    np.testing.assert_array_equal(other[0], features[1])  # 1_left sees 1_right
    np.testing.assert_array_equal(other[1], features[0])  # and back
    np.testing.assert_array_equal(other[2], features[2])  # 2 has one eye: itself
    np.testing.assert_array_equal(other[3], features[3])
    np.testing.assert_array_equal(other[4], features[4])  # no eye in the name
    np.testing.assert_array_equal(inputs[:, 4], [0, 1, 0, 1, 0])


def test_eyes_pair_in_any_case_and_lone_eyes_are_named(predict_cli):
    names = ['16_LEFT', '16_Right', '17_left', '18_RIGHT', 'lonely']
    features = np.arange(10, dtype=np.float32).reshape(-1, 2)
    inputs = blend_net.per_patient_inputs(features, names)
    np.testing.assert_array_equal(inputs[0, 2:4], features[1])  # 16_LEFT sees 16_Right
    np.testing.assert_array_equal(inputs[1, 2:4], features[0])
    np.testing.assert_array_equal(inputs[:, 4], [0, 1, 0, 1, 0])
    assert lone_eyes(names) == ['17_left', '18_RIGHT', 'lonely']
    # blend.py --per_patient says which eyes it blends alone, in one line.
    notes = [l for l in predict_cli.stdout.splitlines() if 'blended alone' in l]
    assert len(notes) == 1 and 'have no other eye of their patient' in notes[0], notes


def test_per_patient_inputs_never_use_a_neighbouring_row(project):
    rng = np.random.default_rng(0)
    names = [project['names'][i] for i in rng.permutation(len(project['names']))]
    features = rng.normal(size=(len(names), 3)).astype(np.float32)
    inputs = blend_net.per_patient_inputs(features, names)
    row_of = {name: i for i, name in enumerate(names)}
    one_eyed = 0
    for i, name in enumerate(names):
        patient, eye = patient_and_eye(name)
        partner = row_of.get(f'{patient}_{"right" if eye == "left" else "left"}', i)
        one_eyed += partner == i
        np.testing.assert_array_equal(inputs[i, 3:6], features[partner])
        assert inputs[i, 6] == (eye == 'right')
    assert one_eyed > 10, 'the fixture should have patients with one eye'


# ---------------------------------------------------------------- the net

def test_net_learns_informative_features_and_not_noise(project):
    root = project['root']
    result = blend.run_blend({'informative': fake_run(root), 'noise': fake_run(root, 'c_noise')},
                             labels_file=root / 'data' / 'trainLabels.csv', per_patient=True,
                             echo=lambda line: None)
    assert result.kappas['informative'] > 0.8, result.kappas
    assert result.kappas['noise'] < 0.4, result.kappas
    report = result.validation['informative']
    assert report.confusion.sum() == len(report.names) > 30
    valid_patients = {patient_and_eye(n)[0] for n in report.names}
    assert all(f'{p}_{e}' in report.names for p in valid_patients for e in ('left', 'right')
               if f'{p}_{e}' in project['names']), 'both eyes of a patient stay together'
    assert result.blend is not None and result.submission is None


def test_fits_are_reproducible_and_n_iter_averages(project):
    root = project['root']
    kwargs = dict(labels_file=root / 'data' / 'trainLabels.csv', echo=lambda line: None)
    runs = {'r': fake_run(root)}
    first = blend.run_blend(runs, seed=3, **kwargs).validation['r']
    again = blend.run_blend(runs, seed=3, **kwargs).validation['r']
    np.testing.assert_array_equal(first.predictions, again.predictions)
    other_seed = blend.run_blend(runs, seed=4, **kwargs).validation['r']
    assert not np.array_equal(first.predictions, other_seed.predictions)
    two = blend.run_blend(runs, seed=3, n_iter=2, **kwargs).validation['r']
    assert len(two.fit_kappas) == 2
    assert two.fit_kappas[0] == pytest.approx(first.kappa)


def test_net_shape_and_maxout_of_neighbouring_units():
    import torch
    net = blend_net.build_net(7, torch.Generator().manual_seed(0))
    assert net.hidden1.weight.shape == (32, 7) and net.hidden2.weight.shape == (32, 16)
    assert net.output.weight.shape == (1, 16)
    assert torch.all(net.hidden1.bias == 0.01)
    assert net(torch.zeros(5, 7)).shape == (5,)
    units = torch.arange(32.0).flip(0).reshape(1, 32)
    np.testing.assert_array_equal(net.maxout1(units).numpy(), units[:, ::2].numpy())


def test_penalty_gradients_equal_those_of_the_penalty_in_the_loss():
    import torch
    net = blend_net.build_net(6, torch.Generator().manual_seed(1))
    x, y = torch.randn(9, 6), torch.randn(9)
    expected_loss = torch.nn.functional.mse_loss(net(x), y) + blend_net.weight_penalty(net)
    expected = torch.autograd.grad(expected_loss, list(net.parameters()))
    net.zero_grad()
    torch.nn.functional.mse_loss(net(x), y).backward()
    blend_net.add_penalty_gradients(net)
    for (name, parameter), gradient in zip(net.named_parameters(), expected):
        torch.testing.assert_close(parameter.grad, gradient, msg=name)
    assert blend_net.weight_penalty(net) > 0


def test_schedule_is_100_epochs_with_three_drops():
    lrs = [lr_for_epoch(blend_net.SCHEDULE, e) for e in range(1, 102)]
    assert lrs.index('stop') == 100
    assert sorted(set(lrs[:100]), reverse=True) == pytest.approx([5e-4, 5e-5, 5e-6, 5e-7])
    assert lrs[59] == 5e-4 and lrs[60] == pytest.approx(5e-5)


def test_batches_mix_balanced_uniform_and_plain():
    levels = np.array([0] * 950 + [4] * 50)
    rng = np.random.default_rng(1)
    batches = [b for _ in range(40) for b in blend_net.epoch_batches(levels, rng)]
    share_of_4 = [np.mean(levels[b] == 4) for b in batches]
    balanced = sum(s > 0.3 for s in share_of_4) / len(batches)
    assert 0.12 < balanced < 0.28, balanced  # about 0.2 of the batches are class-balanced
    assert all(len(b) <= blend_net.BATCH_SIZE for b in batches)


# ---------------------------------------------------------------- the submission

def read_submission(path):
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['image', 'level']
    return rows[1:]


@pytest.fixture(scope='module')
def predict_cli(project):
    """blend.py --predict --optimize_thresholds: a validation fit, then a fit on everything."""
    result = run_cli('--features_file', 'c_fake_train_mean_iter_5_skip_0.npy',
                     '--features_file', 'c_fake_train_std_iter_5_skip_0.npy', '--per_patient',
                     '--predict', '--optimize_thresholds', '--test_dir', 'data/test_fake',
                     '--output', 'out/sub.csv', cwd=project['root'])
    assert result.returncode == 0, result.stderr
    return result


def test_cli_optimize_thresholds_prints_both_kappas(predict_cli):
    fixed = re.search(r'valid kappa (-?[\d.]+) \(cut-offs 0\.500 1\.500 2\.500 3\.500\)',
                      predict_cli.stdout)
    fitted = re.search(r'valid kappa (-?[\d.]+) \(fitted cut-offs ([\d. ]+)\)',
                       predict_cli.stdout)
    assert fixed and fitted, predict_cli.stdout
    assert float(fitted[1]) >= float(fixed[1]) > 0.8
    assert f'cut-offs {fitted[2]}; ' in predict_cli.stdout, 'the submission uses the fitted ones'
    assert 'confusion matrix, fixed cut-offs' in predict_cli.stdout
    assert 'confusion matrix, fitted cut-offs' in predict_cli.stdout


def test_cli_predict_writes_each_test_image_once_matched_by_name(project, predict_cli):
    root = project['root']
    assert 'wrote out/sub.csv' in predict_cli.stdout
    rows = read_submission(root / 'out' / 'sub.csv')
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)) == len(project['test_levels'])
    assert set(names) == set(project['test_levels'])  # not 9999_left, which has no image
    assert all(level in {'0', '1', '2', '3', '4'} for _, level in rows)
    # The test rows are stored shuffled: only a match by name gets the levels right.
    truth = [project['test_levels'][name] for name in names]
    test_kappa = kappa(truth, [int(level) for _, level in rows])
    assert test_kappa > 0.7, test_kappa
    assert not list((root / 'out').glob('.*tmp*')), 'the temporary file must be renamed'


def test_predict_without_test_folder_uses_feature_names(project, tmp_path, monkeypatch):
    root = project['root']
    monkeypatch.chdir(root)
    lines = []
    result = blend.run_blend({'fake': fake_run(root)}, labels_file='data/trainLabels.csv',
                             predict=True, optimize_thresholds=True,
                             output=tmp_path / 'sub.csv', echo=lines.append)
    rows = read_submission(tmp_path / 'sub.csv')
    assert len(rows) == len(project['test_levels']) + 1  # every name of the test features
    assert any('not found' in line for line in lines)
    assert result.submission.thresholds == result.validation['fake'].thresholds
    levels = dict(rows)
    expected = to_levels([result.submission.predictions[n] for n in levels],
                              result.submission.thresholds)
    assert [int(v) for v in levels.values()] == expected.tolist()


# ---------------------------------------------------------------- choosing files

def test_latest_features_pick_the_newest_pair(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    names, levels = make_eyes(range(4), rng)
    for cnf, n_iter, age in (('c_x', 5, 100), ('c_x', 10, 50), ('c_x_ram', 20, 0)):
        write_features(tmp_path, cnf, 'train', names, *informative(levels, rng), n_iter=n_iter)
        for stat in ('mean', 'std'):
            path = feature_path(cnf, 'train', stat, n_iter)
            os.utime(path, (time.time() - age, time.time() - age))
    assert blend_files.latest_features('c_x') == [feature_path('c_x', 'train', 'mean', 10),
                                            feature_path('c_x', 'train', 'std', 10)]
    with pytest.raises(UserError, match='transform.py --cnf c_y'):
        blend_files.latest_features('c_y')


def test_feature_names_are_parsed_by_the_function_paths_builds_them_beside():
    from retina.core import paths
    name = paths.features('c_x_ram', 'train', 'std', 12, 36)
    assert paths.parse_features(name) == paths.FeatureFile('c_x_ram', 'train', 'std', 12, 36)
    for other in ('my_features.npy', 'c_x_train_mean_iter_5.npy',
                  'c_x_valid_mean_iter_5_skip_0.npy', paths.feature_names('c_x', 'train', 5, 0)):
        assert paths.parse_features(other) is None, other
    moved = Path('elsewhere') / name.name
    assert blend_files.matching_test_file(moved) == Path('elsewhere') / paths.features(
        'c_x_ram', 'test', 'std', 12, 36).name
    assert blend_files.names_file_for(moved) == Path('elsewhere') / paths.feature_names(
        'c_x_ram', 'train', 12, 36).name
    with pytest.raises(UserError, match='no _train_'):
        blend_files.matching_test_file(paths.features('c_x', 'test', 'mean', 5, 0))


def test_blend_config_resolves_names_and_test_files(project, monkeypatch):
    root = project['root']
    monkeypatch.chdir(root)
    (root / 'mine.yml').write_text('both:\n  - c_fake_train_mean_iter_5_skip_0.npy\n'
                                   '  - data/features/c_noise_train_std_iter_5_skip_0.npy\n')
    runs = blend_files.load_blend_config('mine.yml')
    assert runs == {'both': [feature_path('c_fake', 'train', 'mean'),
                             feature_path('c_noise', 'train', 'std')]}
    assert blend_files.matching_test_file(runs['both'][0]) == feature_path('c_fake', 'test', 'mean')


def test_runs_are_aligned_by_name(project):
    rng = np.random.default_rng(3)
    names = ['1_left', '1_right', '2_left']
    features = rng.normal(size=(3, 2))
    order = [2, 0, 1]
    aligned = blend_files.reorder_rows(features[order], [names[i] for i in order], names, 'b', 'a')
    np.testing.assert_array_equal(aligned, features)
    with pytest.raises(UserError, match='same training images'):
        blend_files.reorder_rows(features[:2], names[:2], names, 'b', 'a')


# ---------------------------------------------------------------- bad input

def write(relative, text):
    return lambda root: (root / relative).write_text(text)


def edit_lines(relative, change):
    """Damage that replaces the lines of a text file by `change(lines)`."""
    def damage(root):
        path = root / relative
        path.write_text('\n'.join(change(path.read_text().splitlines())) + '\n')
    return damage


def unlink(relative):
    return lambda root: (root / relative).unlink()


def drop_a_column(relative):
    def damage(root):
        np.save(root / relative, np.load(root / relative)[:, :-1])
    return damage


FAKE = ['--features_file', 'c_fake_train_mean_iter_5_skip_0.npy']
PREDICT = FAKE + ['--predict', '--test_dir', 'data/test_fake']
LABELS = 'data/trainLabels.csv'
FAKE_TEST = 'data/features/c_fake_test_mean_iter_5_skip_0.npy'


def out_of_range_at_line_4(lines):
    return lines[:3] + [lines[3].split(',')[0] + ',7'] + lines[4:]


# case: (damage done to a copy of the project, blend.py's arguments, what its one-line
# message must mention)
BAD_INPUTS = {
    'blend_yml_missing': (None, [], 'blend.yml'),
    'blend_yml_malformed': (write('blend.yml', 'run: [c_fake_train_mean_iter_5_skip_0.npy\n'), [],
                            'blend.yml, line'),
    'blend_yml_not_a_mapping': (write('blend.yml', '- c_fake_train_mean_iter_5_skip_0.npy\n'), [],
                                'blend.yml'),
    'blend_yml_names_missing_file': (
        write('blend.yml', 'run:\n  - c_gone_train_mean_iter_5_skip_0.npy\n'), [],
        'c_gone_train_mean_iter_5_skip_0.npy'),
    'features_file_missing': (
        None, ['--features_file', 'data/features/c_gone_train_mean_iter_5_skip_0.npy'],
        'c_gone_train_mean_iter_5_skip_0.npy'),
    'rows_differ_between_files': (
        edit_lines('data/features/c_noise_train_names_iter_5_skip_0.txt', lambda n: n[::-1]),
        FAKE + ['--features_file', 'c_noise_train_mean_iter_5_skip_0.npy'],
        'c_noise_train_mean_iter_5_skip_0.npy'),
    'rows_differ_from_names_file': (
        edit_lines('data/features/c_fake_train_names_iter_5_skip_0.txt', lambda n: n[:-1]), FAKE,
        'c_fake_train_mean_iter_5_skip_0.npy'),
    'train_images_without_labels': (edit_lines(LABELS, lambda lines: lines[:-5]), FAKE,
                                    'trainLabels.csv'),
    'labels_out_of_range': (edit_lines(LABELS, out_of_range_at_line_4), FAKE,
                            'trainLabels.csv, line 4'),
    'test_features_miss_an_image': (write('data/test_fake/5000_left.jpeg', ''), PREDICT,
                                    'transform.py --test'),
    'test_features_missing': (unlink(FAKE_TEST), PREDICT, 'c_fake_test_mean_iter_5_skip_0.npy'),
    'test_dir_given_but_missing': (None, FAKE + ['--predict', '--test_dir', 'data/test_gone'],
                                   'data/test_gone'),
    'features_file_and_blend_cnf': (None, FAKE + ['--blend_cnf', 'blend.yml'], '--blend_cnf'),
    'cnf_without_features': (None, ['--cnf', 'c_128_5x5_32'], 'transform.py --cnf c_128_5x5_32'),
    'test_features_wrong_width': (drop_a_column(FAKE_TEST), PREDICT, 'features per image'),
    'output_not_writable': (write('a_file', ''), PREDICT + ['--output', 'a_file/sub.csv'],
                            'a_file'),
}


@pytest.fixture(scope='module')
def bad_input_results(project, tmp_path_factory):
    """Run the bad-input cases side by side, one per CPU (interpreter start-up dominates)."""
    def run_case(case):
        root = tmp_path_factory.mktemp(case)
        shutil.copytree(project['root'], root, dirs_exist_ok=True)
        damage, arguments, _ = BAD_INPUTS[case]
        if damage is not None:
            damage(root)
        result = run_cli(*arguments, cwd=root)
        return case, (result.returncode, result.stdout, result.stderr)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(pool.map(run_case, BAD_INPUTS))


@pytest.mark.parametrize('case', BAD_INPUTS)
def test_bad_input_is_one_line_error(bad_input_results, case):
    returncode, stdout, stderr = bad_input_results[case]
    assert returncode != 0, stdout
    assert 'Traceback' not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith('error: ') and BAD_INPUTS[case][2] in lines[0], lines[0]
    assert 'valid kappa' not in stdout, 'bad input must stop blend.py before the first fit'


# ---------------------------------------------------------------- which images the blend fits on

@pytest.fixture(scope='module')
def held_out_project(tmp_path_factory):
    """Features of 300 patients whose weights record a test split (hold_out 0.2)."""
    root = tmp_path_factory.mktemp('blend_fit_on')
    rng = np.random.default_rng(11)
    names, levels = make_eyes(range(300), rng)
    (root / 'data').mkdir()
    write_labels(root / 'data' / 'trainLabels.csv', names, levels)
    write_features(root, 'c_fake', 'train', names, *informative(levels, rng))
    test_names, test_levels = make_eyes(range(1000, 1020), rng)
    write_features(root, 'c_fake', 'test', test_names, *informative(test_levels, rng))
    for split in ('train', 'test'):
        (root / 'data' / 'features' / f'c_fake_{split}_source_iter_5_skip_0.json').write_text(
            '{"fingerprint": "f1", "weights": "weights/c_fake.pt", "hold_out": 0.2}')
    return dict(root=root, names=names, levels=levels)


def _fits_recorded(monkeypatch):
    """The rows every blend net is fitted on (a list of arrays)."""
    fitted, prepare = [], fitting.prepare_inputs

    def recording(features, names, fit_rows, per_patient):
        fitted.append(np.asarray(fit_rows))
        return prepare(features, names, fit_rows, per_patient)
    monkeypatch.setattr(fitting, 'prepare_inputs', recording)
    return fitted


@pytest.mark.parametrize('fit_on', ['unseen', 'all'])
def test_blend_fits_on_the_chosen_images_and_never_on_the_test_split(held_out_project, fit_on,
                                                                       monkeypatch, tmp_path):
    root, names, levels = (held_out_project[k] for k in ('root', 'names', 'levels'))
    monkeypatch.chdir(root)
    monkeypatch.setattr(fitting, 'MIN_UNSEEN_PATIENTS', 10)
    fitted = _fits_recorded(monkeypatch)
    lines = []
    result = blend.run_blend({'r': fake_run(root)}, labels_file=root / 'data' / 'trainLabels.csv',
                             per_patient=True, echo=lines.append, fit_on=fit_on, seed=2,
                             predict=True, optimize_thresholds=True,
                             output=tmp_path / f'sub_{fit_on}.csv', test_dir=None)
    train_rows, valid_rows, test_rows = split_rows(names, levels, 0.2)
    assert len(test_rows) > 30 and result.hold_out == 0.2 and result.fit_on == fit_on
    fit_sets = [set(rows.tolist()) for rows in fitted]
    assert all(not rows & set(test_rows.tolist()) for rows in fit_sets), 'fitted on test rows'
    if fit_on == 'unseen':
        assert all(rows <= set(valid_rows.tolist()) for rows in fit_sets)
        assert len(fitted) == fitting.FOLDS + 1  # the folds, then the fit on every valid row
        assert fit_sets[-1] == set(valid_rows.tolist())
    else:
        assert fit_sets[0] == set(train_rows.tolist())
        assert fit_sets[-1] == set(train_rows.tolist()) | set(valid_rows.tolist())
    report = result.validation['r']
    assert sorted(report.names) == sorted(names[i] for i in valid_rows)
    held = result.held_out['r']
    assert held.images == len(test_rows) and held.kappa.value > 0.6  # informative features
    assert any(line.startswith('run r: held-out test kappa') for line in lines)


def test_unseen_fits_are_reproducible_and_out_of_fold(held_out_project, monkeypatch):
    root = held_out_project['root']
    monkeypatch.chdir(root)
    monkeypatch.setattr(fitting, 'MIN_UNSEEN_PATIENTS', 10)
    fitted = _fits_recorded(monkeypatch)
    kwargs = dict(labels_file=root / 'data' / 'trainLabels.csv', echo=lambda line: None,
                  fit_on='unseen', seed=5)
    first = blend.run_blend({'r': fake_run(root)}, **kwargs)
    again = blend.run_blend({'r': fake_run(root)}, **kwargs)
    np.testing.assert_array_equal(first.validation['r'].predictions,
                                  again.validation['r'].predictions)
    np.testing.assert_array_equal(first.held_out['r'].predictions,
                                  again.held_out['r'].predictions)
    # Out of fold: each fold's net never saw the validation images it predicted.
    valid = set(split_rows(held_out_project['names'], held_out_project['levels'],
                                0.2)[1].tolist())
    folds = [valid - set(rows.tolist()) for rows in fitted[:fitting.FOLDS]]
    assert set().union(*folds) == valid and sum(map(len, folds)) == len(valid)


def test_unseen_falls_back_to_all_with_a_note_when_validation_is_small(project):
    root, lines = project['root'], []
    result = blend.run_blend({'r': fake_run(root)}, labels_file=root / 'data' / 'trainLabels.csv',
                             echo=lines.append)
    assert result.fit_on == 'all' and result.hold_out is None
    assert any('fewer than 100' in line and '--fit_on all' in line for line in lines)


def test_cli_fit_on_is_an_option_with_help(project):
    result = run_cli('--help', cwd=project['root'])
    assert '--fit_on [unseen|all]' in result.stdout and 'validation' in result.stdout
    bad = run_cli('--fit_on', 'train', cwd=project['root'])
    assert bad.returncode != 0 and "'train' is not one of" in bad.stderr


def test_feature_file_of_the_wrong_shape(workdir):
    features = workdir / 'data' / 'features'
    features.mkdir(parents=True)
    names = [p.stem for p in sorted((workdir / 'data' / 'train_tiny').glob('*.jpeg'))]
    np.save(features / f'{CONFIG}_train_mean_iter_1_skip_0.npy', np.zeros((len(names) - 3, 8)))
    (features / f'{CONFIG}_train_names_iter_1_skip_0.txt').write_text('\n'.join(names) + '\n')
    result = run_script('blend.py', '--features_file', f'{CONFIG}_train_mean_iter_1_skip_0.npy',
                        cwd=workdir, check=False)
    one_line_error(result, f'{CONFIG}_train_mean_iter_1_skip_0.npy', 'rows')


def _features(root, cnf, split, names, array, fingerprint='f1', stat='mean'):
    """A feature file, its names file and its source record, as transform.py writes them."""
    folder = root / 'data' / 'features'
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f'{cnf}_{split}_{stat}_iter_1_skip_0.npy'
    np.save(path, array)
    (folder / f'{cnf}_{split}_names_iter_1_skip_0.txt').write_text('\n'.join(names) + '\n')
    (folder / f'{cnf}_{split}_source_iter_1_skip_0.json').write_text(
        json.dumps(dict(fingerprint=fingerprint, weights=f'weights/{fingerprint}.pt')))
    return path


def _blend_project(root, train_fingerprint='f1', test_fingerprint='f1'):
    """Train/test features whose image names hold commas and spaces; returns the train file."""
    rng = np.random.default_rng(0)
    names = sorted(f'{p} x,{p % 3}_{eye}' for p in range(30) for eye in ('left', 'right'))
    levels = rng.integers(0, 5, len(names))
    with open(root / 'labels.csv', 'w', newline='') as f:
        import csv
        csv.writer(f).writerows([('image', 'level'), *zip(names, levels)])
    features = levels[:, None] + rng.normal(scale=0.3, size=(len(names), 4))
    train = _features(root, 'c_x', 'train', names, features.astype(np.float32),
                      train_fingerprint)
    _features(root, 'c_x', 'test', names[:10], features[:10].astype(np.float32),
              test_fingerprint)
    return train, names


def test_names_with_commas_and_spaces_survive_to_the_submission(tmp_path, monkeypatch):
    import csv
    from retina.blend import blending as blend
    from retina.blend import net as blend_net
    monkeypatch.chdir(tmp_path)
    # The fits do not matter here, only the names: two epochs will do.
    fit = blend_net.fit_net
    monkeypatch.setattr(blend_net, 'fit_net', lambda inputs, levels, seed, **kwargs: fit(
        inputs, levels, seed, schedule={0: 5e-4, 2: 'stop'}))
    train, names = _blend_project(tmp_path)
    common = dict(labels_file=tmp_path / 'labels.csv', predict=True, echo=lambda *a: None)
    first = blend.run_blend({'run': [train]}, **common).submission.path
    second = blend.run_blend({'run': [train]}, **common).submission.path
    assert first != second and first.is_file() and second.is_file()
    rows = list(csv.reader(open(first, newline='')))
    assert rows[0] == ['image', 'level'] and [r[0] for r in rows[1:]] == names[:10]


def test_train_and_test_features_of_other_weights_are_not_blended(tmp_path, monkeypatch):
    from retina.blend import blending as blend
    monkeypatch.chdir(tmp_path)
    train, _ = _blend_project(tmp_path, 'f1', 'f2')
    with pytest.raises(UserError, match=r'c_x_test_mean_iter_1_skip_0.npy: made with other '
                                        r'weights .*weights/f2.pt vs weights/f1.pt'):
        blend.run_blend({'run': [train]}, labels_file=tmp_path / 'labels.csv', predict=True,
                        echo=lambda *a: None)


@pytest.mark.parametrize('content, words', [
    ('npz', 'a .npz archive'),
    ('structured', 'a structured array'),
    ('complex', 'complex numbers'),
    ('empty', 'empty (0 images'),
    ('no columns', 'empty (3 images × 0 features)'),
])
def test_feature_files_that_are_not_plain_real_arrays(tmp_path, content, words):
    from retina.features.files import load_features
    names = ['a', 'b', 'c']
    arrays = {'structured': np.zeros(3, dtype=[('x', 'f4'), ('y', 'f4')]),
              'complex': np.ones((3, 2), np.complex64), 'empty': np.zeros((0, 4), np.float32),
              'no columns': np.zeros((3, 0), np.float32)}
    path = _features(tmp_path, 'c_x', 'train', [] if content == 'empty' else names,
                     arrays.get(content, np.zeros((3, 2), np.float32)))
    if content == 'npz':
        with open(path, 'wb') as f:
            np.savez(f, features=np.zeros((3, 2)))
    for mmap in (False, True):
        with pytest.raises(UserError, match=re.escape(words)):
            load_features(path, mmap=mmap)


def test_a_run_named_twice_in_the_blend_config(tmp_path):
    from retina.blend.files import load_blend_config
    train = _features(tmp_path, 'c_x', 'train', ['a'], np.zeros((1, 2), np.float32))
    config = tmp_path / 'blend.yml'
    config.write_text(f'one: [{train}]\ntwo: [{train}]\none: [{train}]\n')
    with pytest.raises(UserError, match="blend.yml, line 3: .*'one' is given twice"):
        load_blend_config(config)
    config.write_text(f'1: [{train}]\n"1": [{train}]\n')
    with pytest.raises(UserError, match="run name '1' is given twice"):
        load_blend_config(config)


def test_reports_say_fitted_cut_offs_and_count_test_patients():
    from retina.blend import reports
    names = [f'{p}_{eye}' for p in range(30) for eye in ('left', 'right')]
    levels = np.array([p % 5 for p in range(30) for _ in range(2)])
    predictions = levels * 0.5 + 0.1                  # squeezed: fixed cut-offs lose, fitted win
    report = reports.validation_report(names, levels, predictions, optimize_thresholds=True)
    assert report.kappa_fitted > report.kappa
    lines = []
    reports.echo_report('net', report, lines.append)
    assert 'fitted cut-offs' in '\n'.join(lines) and 'true\\pred' in '\n'.join(lines)
    rows = np.arange(20)
    test = reports.test_report(names, levels, rows, predictions[rows], report.thresholds)
    assert (test.images, test.patients) == (20, 10)
    assert test.kappa_fitted.value > test.kappa.value
    lines = []
    reports.note_lone_eyes(['1_left', '1_right', '2_left'], 'images', lines.append)
    assert lines and '2_left' in lines[0] and '1_left' not in lines[0]
