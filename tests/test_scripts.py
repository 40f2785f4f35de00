"""The shell entry points: make_kaggle_solution.sh, --help of every script, torchrun."""
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, run_script

SCRIPTS = ('convert.py', 'train_nn.py', 'transform.py', 'blend.py', 'ram.py')


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_explains_every_option(script):
    result = run_script(script, '--help', cwd=REPO)
    options = re.findall(r'^\s+(--\w+)', result.stdout, re.M)
    assert '--debug' in options and len(options) >= 3
    blocks = re.split(r'\n(?=  \S)', result.stdout.split('Options:')[1].strip('\n'))
    for block in blocks:
        assert len(block.split()) >= 4, f'{script}: option without help: {block!r}'


def expand_loop_variables(template, loops):
    """Every value `template` takes when ${var} runs over the words of its `for` loop."""
    match = re.search(r'\$\{(\w+)\}', template)
    if not match:
        return [template]
    values = loops[match.group(1)].split()
    return [v for word in values
            for v in expand_loop_variables(template.replace(match.group(0), word), loops)]


def test_kaggle_script_is_valid_bash_and_uses_only_existing_options():
    script = REPO / 'make_kaggle_solution.sh'
    subprocess.run(['bash', '-n', str(script)], check=True)
    text = script.read_text().replace('\\\n', ' ')
    helps = {name: run_script(name, '--help', cwd=REPO).stdout for name in SCRIPTS}
    used = re.findall(r'\$PY (\w+\.py)([^\n]*)', text)
    loops = dict(re.findall(r'^\s*for (\w+) in ([^;]+); do', text, re.M))
    assert {name for name, _ in used} == set(SCRIPTS)
    for name, args in used:
        for option in re.findall(r'(--\w+)', args):
            assert option in helps[name], f'{name} has no option {option}'
        for config in re.findall(r'configs/(\S+?)\.py', args):
            for value in expand_loop_variables(config, loops):
                assert (REPO / 'configs' / f'{value}.py').is_file(), value
    assert 'set -euo pipefail' in text


def test_blend_yml_runs_name_features_that_the_kaggle_script_makes():
    runs = yaml.safe_load((REPO / 'blend.yml').read_text())
    text = (REPO / 'make_kaggle_solution.sh').read_text()
    for files in runs.values():
        for name in files:
            cnf = re.match(r'(c_\w+?)_train_', name).group(1)
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
    assert (workdir / 'weights' / 'c_128_5x5_32_ram' / 'weights_final.pt').is_file()
