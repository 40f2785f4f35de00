"""retina.config and the scripts' options: configs of the wrong shape, values out of range."""
import re

import pytest

from conftest import run_script
from retina.core.errors import UserError
from retina.model import config as config_module

CONFIG = 'c_128_5x5_32_ram'


@pytest.mark.parametrize('body, words', [
    ("cnf = [('w', 112)]\nlayers = base_layers\n", 'cnf must be a dict'),
    ("cnf = base\nlayers = 'conv'\n", 'layers must be a non-empty list of (kind, options'),
    ("cnf = base\nlayers = [('conv', 32)]\n", 'layers must be a non-empty list'),
    ("cnf = dict(base, aug_params=[1, 2])\nlayers = base_layers\n", 'aug_params must be a dict'),
    ("cnf = dict(base, schedule={0: 0.003, 50: 0.0003})\nlayers = base_layers\n",
     "no 'stop' entry, so training would never end; add one, e.g. 51: 'stop'"),
])
def test_configs_of_the_wrong_shape(tmp_path, body, words):
    (tmp_path / 'configs').mkdir()
    path = tmp_path / 'configs' / 'c_odd.py'
    path.write_text(f'from configs.{CONFIG} import cnf as base, layers as base_layers\n' + body)
    with pytest.raises(UserError, match=re.escape(words)):
        config_module.load(path)


def test_a_negative_seed_is_refused_by_the_option(tmp_path):
    result = run_script('train_nn.py', '--cnf', CONFIG, '--seed', '-1', cwd=tmp_path,
                        check=False)
    assert result.returncode == 2 and "'--seed': -1 is not in the range" in result.stderr
    assert 'Traceback' not in result.stderr


def test_a_config_importing_a_module_of_the_flat_package_names_its_new_home(tmp_path):
    """A config written before the package was laid out by stage (`from retina.nets import`)
    gets one line naming the module's new place, not a traceback."""
    folder = tmp_path / 'configs'
    folder.mkdir()
    (folder / 'old_style.py').write_text('from retina.nets import trunk_5x5\n')
    with pytest.raises(UserError, match=r'retina\.nets moved to retina\.model\.nets'):
        config_module.load(str(folder / 'old_style.py'))
    (folder / 'old_stats.py').write_text('from retina.stats import load_stats\n')
    with pytest.raises(UserError, match=r'retina\.stats moved to retina\.data\.stats'):
        config_module.load(str(folder / 'old_stats.py'))
