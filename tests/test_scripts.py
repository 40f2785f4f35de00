"""The shell entry points: make_kaggle_solution.sh, --help of every script, torchrun."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, run_script
from retina.core import paths

SCRIPTS = ('convert.py', 'train_nn.py', 'transform.py', 'blend.py', 'ram.py', 'predict.py')
PIPELINE_SCRIPTS = SCRIPTS[:5]


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_explains_every_option(script):
    result = run_script(script, '--help', cwd=REPO)
    options = re.findall(r'^\s+(--\w+)', result.stdout, re.M)
    assert '--debug' in options and len(options) >= 3
    blocks = re.split(r'\n(?=  \S)', result.stdout.split('Options:')[1].strip('\n'))
    for block in blocks:
        assert len(block.split()) >= 4, f'{script}: option without help: {block!r}'


def run_kaggle_script(tmp_path, *args, check=True, **env):
    """Run make_kaggle_solution.sh with a stand-in interpreter; returns its calls, one list each
    (with check=False: the calls and the CompletedProcess)."""
    root = tmp_path / 'project'
    (root / 'data').mkdir(parents=True, exist_ok=True)
    for name in ('make_kaggle_solution.sh', 'blend.yml', 'blend_ram.yml'):
        shutil.copy(REPO / name, root / name)
    for net in ('c_512_5x5_32', 'c_512_4x4_32'):  # what training leaves in best/
        best = root / 'weights' / net / 'best'
        best.mkdir(parents=True, exist_ok=True)
        for epoch, loss in ((12, 0.9), (140, 0.5)):
            (best / f'{epoch:04d}_20260101-000000_{loss:.6f}.pt').write_bytes(b'')
    calls = tmp_path / 'calls.txt'
    calls.unlink(missing_ok=True)
    stub = tmp_path / 'python'
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n')
    stub.chmod(0o755)
    result = subprocess.run(['bash', str(root / 'make_kaggle_solution.sh'), *args], check=check,
                            capture_output=True, text=True,
                            env=dict(os.environ, PYTHON=str(stub), CALLS=str(calls), **env))
    made = [line.split() for line in calls.read_text().splitlines()] if calls.exists() else []
    return (root, made) if check else (made, result)


def option(call, name):
    return call[call.index(name) + 1] if name in call else None


def test_kaggle_script_runs_the_pipeline_with_existing_options(tmp_path):
    root, calls = run_kaggle_script(tmp_path)
    helps = {name: run_script(name, '--help', cwd=REPO).stdout for name in PIPELINE_SCRIPTS}
    assert [c[0] for c in calls] == (['convert.py'] * 6 + ['train_nn.py'] * 12
                                     + ['transform.py'] * 6 + ['blend.py'] + ['ram.py'] * 3)
    for call in calls:
        for word in call[1:]:
            if word.startswith('--'):
                assert word in helps[call[0]], f'{call[0]} has no option {word}'
        cnf = option(call, '--cnf')
        assert cnf is None or (REPO / cnf).is_file(), cnf
    trained = [option(c, '--cnf') for c in calls if c[0] == 'train_nn.py']
    for call in calls:
        source = option(call, '--weights_from')
        if call[0] == 'train_nn.py' and source:  # 256 from 128, 512 from 256: trained before
            smaller = 'configs/' + source.split('/')[1] + '.py'
            assert trained.index(smaller) < trained.index(option(call, '--cnf'))
            assert source.endswith('/weights_final.pt')
    assert sum(1 for c in calls if c[0] == 'train_nn.py' and '--weights_from' in c) == 8
    blend_call = next(c for c in calls if c[0] == 'blend.py')
    assert option(blend_call, '--blend_cnf') == 'blend.yml' and '--predict' in blend_call
    # As the original: three weight sets per 512 baseline net, each on its own augmentations.
    transforms = [c for c in calls if c[0] == 'transform.py']
    for net in ('c_512_5x5_32', 'c_512_4x4_32'):
        runs = [(option(c, '--skip'), option(c, '--weights_from')) for c in transforms
                if option(c, '--cnf') == f'configs/{net}.py']
        assert runs == [(None, f'weights/{net}/best/0140_20260101-000000_0.500000.pt'),
                        ('50', None), ('100', f'weights/{net}/weights_final.pt')]
    runs = yaml.safe_load((REPO / 'blend.yml').read_text())
    made = {(option(c, '--cnf').split('/')[1][:-3], option(c, '--skip') or '0')
            for c in transforms}
    assert len(runs) == 6 and all('_ram_' not in f for files in runs.values() for f in files)
    for files in runs.values():  # each run names features the script makes
        for name in files:
            found = paths.parse_features(name)
            assert found.split == 'train' and found.n_iter == 50, name
            assert (found.cnf, str(found.skip)) in made, name


def test_kaggle_script_blends_the_ram_nets_only_when_asked(tmp_path):
    root, calls = run_kaggle_script(tmp_path, RAM='1')
    transforms = [option(c, '--cnf') for c in calls if c[0] == 'transform.py']
    assert len(transforms) == 8 and 'configs/c_512_5x5_32_ram.py' in transforms
    blend_file = option(next(c for c in calls if c[0] == 'blend.py'), '--blend_cnf')
    runs = yaml.safe_load((root / blend_file).read_text())
    assert len(runs) == 8 and {'ram_net5', 'ram_net4'} <= set(runs)


def test_kaggle_script_skips_finished_nets_and_resumes_interrupted_ones(tmp_path):
    root = tmp_path / 'project'
    for name, file in (('c_128_5x5_32', 'weights_final.pt'), ('c_256_5x5_32', 'last.pt')):
        (root / 'weights' / name).mkdir(parents=True)
        (root / 'weights' / name / file).write_bytes(b'')
    _, calls = run_kaggle_script(tmp_path)
    trains = {option(c, '--cnf'): c for c in calls if c[0] == 'train_nn.py'}
    assert 'configs/c_128_5x5_32.py' not in trains
    resumed = trains['configs/c_256_5x5_32.py']
    assert '--resume' in resumed and '--weights_from' not in resumed
    # The script's own folders: train_nn.py refuses another experiment's last.pt by them.
    assert option(resumed, '--train_dir') == 'data/train_small'
    assert option(resumed, '--labels') == 'data/trainLabels.csv'
    assert '--resume' not in trains['configs/c_512_5x5_32.py']
    assert len(trains) == 11


def test_kaggle_script_with_fewer_tta_iterations_blends_those_features(tmp_path):
    root, calls = run_kaggle_script(tmp_path, TTA='10')
    transforms = [c for c in calls if c[0] == 'transform.py']
    assert {option(c, '--n_iter') for c in transforms} == {'10'}
    assert {option(c, '--skip') for c in transforms} == {None, '10', '20'}
    blend_file = option(next(c for c in calls if c[0] == 'blend.py'), '--blend_cnf')
    runs = yaml.safe_load((root / blend_file).read_text())
    files = [f for names in runs.values() for f in names]
    assert len(runs) == 6 and all('_iter_10_skip_' in f for f in files)
    assert {f.rsplit('_skip_', 1)[1] for f in files} == {'0.npy', '10.npy', '20.npy'}


def test_kaggle_script_help_and_dry_run_run_nothing(tmp_path):
    calls, result = run_kaggle_script(tmp_path, '--help', check=False)
    assert result.returncode == 0 and calls == []
    assert 'Usage:' in result.stdout and '--dry-run' in result.stdout and 'TTA' in result.stdout
    assert not list((tmp_path / 'project' / 'data').iterdir())

    _, real = run_kaggle_script(tmp_path / 'real', TTA='10')
    calls, result = run_kaggle_script(tmp_path, '--dry-run', check=False, TTA='10')
    assert result.returncode == 0 and calls == []
    printed = [line.split()[1:] for line in result.stdout.splitlines()
               if line.startswith(str(tmp_path / 'python'))]
    assert printed == real  # the same commands, in the same order, none of them run
    assert not list((tmp_path / 'project' / 'data').iterdir())  # not even the blend file


@pytest.mark.parametrize('args, env, message', [
    ((), {'TTA': 'abc'}, 'TTA=abc'), ((), {'TTA': '0'}, 'TTA=0'),
    ((), {'TTA': '10001'}, 'more than transform.py takes'),
    ((), {'TTA': '1' + '0' * 30}, 'more than transform.py takes'),
    ((), {'TTA': '9223372036854775808'}, 'more than transform.py takes'),
    (('--fast',), {}, 'unknown argument --fast')])
def test_kaggle_script_refuses_bad_settings_before_any_work(tmp_path, args, env, message):
    calls, result = run_kaggle_script(tmp_path, *args, check=False, **env)
    assert result.returncode == 2 and calls == []
    assert message in result.stderr and 'Traceback' not in result.stderr


def test_transform_test_dir_alone_extracts_test_features_only():
    from transform import splits_to_extract
    assert splits_to_extract(False, False, None, 'data/other_test') == ['test']
    assert splits_to_extract(False, False, 'data/other_train', None) == ['train']
    assert splits_to_extract(False, False, None, None) == ['train', 'test']
    assert splits_to_extract(False, False, 'a', 'b') == ['train', 'test']
    assert splits_to_extract(True, False, None, 'data/other_test') == ['train']


@pytest.mark.parametrize('blend_file', ['blend.yml', 'blend_ram.yml'])
def test_blend_yml_runs_name_features_that_the_kaggle_script_makes(blend_file):
    runs = yaml.safe_load((REPO / blend_file).read_text())
    text = (REPO / 'make_kaggle_solution.sh').read_text()
    for files in runs.values():
        for name in files:
            cnf = paths.parse_features(name).cnf
            assert (REPO / 'configs' / f'{cnf}.py').is_file()
            assert cnf in text


@pytest.mark.skipif(shutil.which('torchrun') is None and sys.platform != 'linux',
                    reason='needs torch.distributed.run')
def test_torchrun_two_processes_on_the_cpu(workdir):
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
         '2', str(REPO / 'train_nn.py'), '--cnf', 'c_128_5x5_32_ram',
         '--max_epochs', '1', '--no_progress', '--device', 'cpu'],
        cwd=workdir, capture_output=True, text=True, timeout=300,
        env={**__import__('os').environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    assert '× 2 processes' in result.stdout
    assert result.stdout.count('epoch    1') == 1  # only rank 0 reports
    assert (workdir / 'weights' / 'c_128_5x5_32_ram' / 'last.pt').is_file()


@pytest.mark.slow
def test_chain_script_trains_128_then_256_from_it_and_scores_the_test_split(tmp_path):
    """bench/gpu_chain.sh on synthetic photographs, on the CPU with tiny schedules: the 128-px
    net, the 256-px net started from its weights (the original's transfer), TTA features and
    blends, every stage scored on the held-out patients; BENCHMARKS.md left alone (WRITE=0)."""
    data = tmp_path / 'data'
    subprocess.run([sys.executable, '-m', 'retina.synthetic', '--out', str(tmp_path / 'raw'),
                    '--n_patients', '60', '--seed', '1'], cwd=REPO, check=True,
                   capture_output=True)
    for size in (128, 256):
        run_script('convert.py', '--directory', tmp_path / 'raw' / 'train', '--convert_directory',
                   data / f'e{size}', '--crop_size', size, '--extension', 'jpeg', '--enhance',
                   'local_contrast', cwd=tmp_path)
    shutil.copy(tmp_path / 'raw' / 'trainLabels.csv', data / 'eyepacs_labels.csv')
    benchmarks = (REPO / 'BENCHMARKS.md').read_bytes()
    env = dict(os.environ, DATA=str(data), WORK=str(tmp_path / 'work'), OUT=str(tmp_path / 'out'),
               DEVICE='cpu', EPOCHS128='2', EPOCHS256='1', FINE_EPOCHS='1', TTA='2', WRITE='0',
               PY=sys.executable, PYTHONPATH=str(REPO), HEIMED=str(tmp_path / 'no_heimed'))
    result = subprocess.run(['bash', str(REPO / 'bench' / 'gpu_chain.sh')], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    weights = tmp_path / 'work' / 'weights'
    for name, epochs in (('c_128_5x5_32_ram', 2), ('c_256_5x5_32_ram', 1),
                         ('c_128_5x5_32_ram_fine', 1)):
        assert (weights / name / 'weights_final.pt').is_file()
        assert len((weights / name / 'log.csv').read_text().splitlines()) == epochs + 1
    log_256 = (tmp_path / 'out' / 'train_c_256_5x5_32_ram.log').read_text()
    assert re.search(r'loaded \d+ parameter\(s\) from .*c_128_5x5_32_ram/weights_final\.pt',
                     log_256), log_256[:500]
    assert 'hold-out:' in log_256
    source = (tmp_path / 'work' / 'data' / 'features' /
              'c_256_5x5_32_ram_train_source_iter_2_skip_0.json')
    assert json.loads(source.read_text())['hold_out'] == 0.15  # what blend.py reads
    table = [line for line in result.stdout.splitlines() if line.startswith('| ')]
    for stage in ('pixel floor', 'c_128_5x5_32_ram (2 epochs), centred window',
                  'c_256_5x5_32_ram (1 epochs), centred window',
                  'c_256_5x5_32_ram: its head on 2-iteration TTA features',
                  'blend.py --fit_on all', 'blend.py --fit_on unseen'):
        assert any(stage in line for line in table), stage
    assert 'no_heimed/images not found' in result.stdout  # the fine net's maps: no masks here
    assert (REPO / 'BENCHMARKS.md').read_bytes() == benchmarks
