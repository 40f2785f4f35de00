"""One option vocabulary (retina/core/options.py): every script that takes a shared option shows
its shared help and range, the aliases parse to what the original names do, and the help texts
that were wrong say the right thing."""
import importlib.util

import click
import pytest
from click.testing import CliRunner

from conftest import REPO
from retina.core import options

SCRIPTS = ('convert.py', 'train_nn.py', 'transform.py', 'blend.py', 'ram.py', 'predict.py')


def _script(name):
    spec = importlib.util.spec_from_file_location(f'script_{name[:-3]}', REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _commands():
    from retina.data import datasets, stats, synthetic
    from retina.publish import export, release
    found = {name: _script(name) for name in SCRIPTS}
    found.update({'retina.synthetic': synthetic.main, 'retina.release': release.main,
                  'retina.export': export.main, 'retina.stats': stats.main,
                  'retina.datasets odir': datasets.main.commands['odir'],
                  'retina.datasets eyepacs': datasets.main.commands['eyepacs']})
    return found


COMMANDS = _commands()

# option -> (its shared help stem, the commands that take it)
SHARED = {
    '--cnf': (options.CNF_HELP, {'train_nn.py', 'transform.py', 'blend.py', 'ram.py',
                                 'predict.py', 'retina.export'}),
    '--weights_from': (options.WEIGHTS_HELP, {'train_nn.py', 'transform.py', 'ram.py',
                                              'predict.py', 'retina.export', 'retina.release'}),
    '--seed': (options.SEED_HELP, {'train_nn.py', 'blend.py', 'retina.synthetic',
                                   'retina.stats'}),
    '--precision': ('auto: ', {'train_nn.py', 'transform.py'}),
    '--device': (options.DEVICE_HELP, {'train_nn.py', 'transform.py', 'ram.py', 'predict.py'}),
    '--no_progress': (options.NO_PROGRESS_HELP, {'convert.py', 'train_nn.py', 'transform.py',
                                                 'ram.py', 'predict.py', 'retina.stats',
                                                 'retina.datasets odir',
                                                 'retina.datasets eyepacs'}),
    '--n_iter': (options.TTA_HELP, {'transform.py', 'predict.py'}),
    '--batch_size': (options.BATCH_SIZE_HELP, {'transform.py', 'ram.py', 'predict.py'}),
    '--crop_size': (options.CROP_SIZE_HELP, {'convert.py', 'predict.py', 'retina.export'}),
    '--labels': (options.LABELS_HELP, {'convert.py', 'train_nn.py', 'blend.py', 'ram.py',
                                       'retina.release', 'retina.stats'}),
    '--train_dir': (options.TRAIN_DIR_HELP, {'train_nn.py', 'transform.py'}),
    '--test_dir': (options.TEST_DIR_HELP, {'transform.py', 'blend.py'}),
    '--directory': (options.INPUT_HELP, {'convert.py', 'retina.stats'}),
    '--images': (options.IMAGES_HELP, {'ram.py', 'predict.py'}),
    '--compile': (options.COMPILE_HELP, {'train_nn.py', 'transform.py'}),
    '--per_patient': (options.PER_PATIENT_HELP, {'blend.py', 'predict.py'}),
    '--layer': (options.LAYER_HELP, {'ram.py', 'predict.py'}),
    '--fuse': (options.FUSE_HELP, {'ram.py', 'predict.py'}),
    '--fuse_weights': (options.WEIGHTS_HELP, {'ram.py', 'predict.py'}),
    '--save_maps': (options.SAVE_MAPS_HELP, {'ram.py', 'predict.py'}),
}
# Another idea under a shared name, on purpose (its own help says so; tested below).
OTHER_IDEA = {('blend.py', '--n_iter'), ('retina.synthetic', '--directory'),
              ('train_nn.py', '--directory'), ('ram.py', '--directory'),
              ('predict.py', '--directory')}
OUTPUT_FOLDERS = {'convert.py': '--convert_directory', 'ram.py': '--output_dir',
                  'retina.synthetic': '--out'}
OUTPUT_FILES = {'blend.py', 'predict.py', 'retina.export', 'retina.stats'}


def option(command, name):
    """The click option of `command` that `name` (one of its names) names, or None."""
    for param in command.params:
        if isinstance(param, click.Option) and (name in param.opts or name in param.secondary_opts):
            return param
    return None


def flat(text):
    """`text` with its white space made single spaces, as click's wrapping leaves it (it breaks
    lines after hyphens too)."""
    return ' '.join(text.split()).replace('- ', '-')


def help_page(name):
    result = CliRunner().invoke(COMMANDS[name], ['--help'])
    assert result.exit_code == 0, result.output
    return flat(result.output)


@pytest.mark.parametrize('name', sorted(COMMANDS))
def test_help_lists_each_shared_option_with_its_shared_help(name):
    command, page = COMMANDS[name], help_page(name)
    for opt, (stem, takers) in SHARED.items():
        param = option(command, opt)
        if name not in takers:
            assert param is None or (name, opt) in OTHER_IDEA or param.opts[0] != opt, \
                f'{name} takes {opt}: add it to SHARED (from retina.core.options)'
            continue
        assert param is not None, f'{name} has no {opt}'
        assert param.help.startswith(stem), f'{name} {opt}: {param.help!r}'
        assert flat(param.help) in page, f'{name} --help does not show {opt} as defined'


@pytest.mark.parametrize('name', sorted(COMMANDS))
def test_output_options_are_an_output_folder_or_file_under_the_name_output(name):
    command = COMMANDS[name]
    param = option(command, '--output')
    if name in OUTPUT_FOLDERS:
        assert param.opts[0] == OUTPUT_FOLDERS[name] and '--output' in param.opts
        assert param.help.startswith(options.OUTPUT_FOLDER_HELP)
        assert not param.type.file_okay
    elif name in OUTPUT_FILES:
        assert param.opts == ['--output'] and param.help.startswith(options.OUTPUT_FILE_HELP)
        assert not param.type.dir_okay
    else:
        assert param is None


def parsed(name, args):
    """The parameters `args` give the command, parsed and checked but not run."""
    with COMMANDS[name].make_context(name, list(args)) as context:
        return context.params


@pytest.mark.parametrize('name, alias, original, key, base', [
    ('convert.py', ['--output', 'out'], ['--convert_directory', 'out'], 'convert_directory', []),
    ('convert.py', ['--preview'], ['--test'], 'test', []),
    ('train_nn.py', ['--directory', 'd'], ['--train_dir', 'd'], 'train_dir', ['--cnf', 'c']),
    ('ram.py', ['--directory', 'd', '--directory', 'e'], ['--images', 'd', '--images', 'e'],
     'images', []),
    ('ram.py', ['--output', 'out'], ['--output_dir', 'out'], 'output_dir', []),
    ('predict.py', ['--images', 'd'], ['d'], 'images', []),
    ('predict.py', ['--directory', 'd', '--directory', 'e'], ['d', 'e'], 'images', []),
    ('retina.synthetic', ['--output', 'out'], ['--out', 'out'], 'out_dir', []),
    ('retina.release', ['--weights_from', 'w.pt'], ['--weights', 'w.pt'], 'weights',
     ['name', '--photos', 'p', '--labels', 'l.csv']),
])
def test_an_alias_parses_to_what_the_original_name_gives(name, alias, original, key, base):
    with_alias, with_original = parsed(name, base + alias), parsed(name, base + original)
    assert with_alias == with_original
    assert with_alias[key] not in (None, (), False)


def test_predict_takes_images_as_arguments_and_options_together_and_needs_one():
    assert sorted(parsed('predict.py', ['a.jpeg', '--images', 'd'])['images']) == ['a.jpeg', 'd']
    assert parsed('predict.py', ['--images', 'd', 'a.jpeg', '--n_iter', '2'])['n_iter'] == 2
    with pytest.raises(click.UsageError, match='IMAGES'):
        parsed('predict.py', ['--n_iter', '2'])


SEED_TAKERS = sorted(SHARED['--seed'][1])


@pytest.mark.parametrize('name', SEED_TAKERS)
def test_the_seed_range_is_the_same_everywhere(name):
    base = {'train_nn.py': ['--cnf', 'c'], 'retina.synthetic': ['--out', 'o'],
            'retina.stats': ['--directory', str(REPO)]}.get(name, [])
    assert parsed(name, base + ['--seed', str(2 ** 32 - 1)])['seed'] == 2 ** 32 - 1
    assert parsed(name, base + ['--seed', '0'])['seed'] == 0
    for bad in ('-1', str(2 ** 32)):
        with pytest.raises(click.BadParameter, match='range'):
            parsed(name, base + ['--seed', bad])


def test_every_seed_option_is_the_shared_one():
    for name, command in COMMANDS.items():
        param = option(command, '--seed')
        assert (param is not None) == (name in SEED_TAKERS), name
        if param is not None:
            assert (param.type.min, param.type.max) == (0, 2 ** 32 - 1), name


def test_tta_iterations_have_one_range_and_blend_n_iter_says_it_is_not_tta():
    ranges = {name: (option(COMMANDS[name], '--n_iter').type.min,
                     option(COMMANDS[name], '--n_iter').type.max)
              for name in ('transform.py', 'predict.py')}
    assert set(ranges.values()) == {(1, options.MAX_TTA_ITERATIONS)}
    blend_help = option(COMMANDS['blend.py'], '--n_iter').help
    assert 'Fits of the blend net per run' in blend_help
    assert 'Not test-time augmentation' in blend_help
    assert "transform.py's --n_iter" in blend_help


def test_test_means_a_preview_in_convert_and_the_test_set_in_transform():
    convert_test = option(COMMANDS['convert.py'], '--test')
    assert convert_test.opts == ['--test', '--preview'] and convert_test.is_flag
    assert convert_test.help.startswith('A preview, not the test set: convert nothing')
    transform_test = option(COMMANDS['transform.py'], '--test')
    assert transform_test.help.startswith('The test set, not a preview: extract features of '
                                          'the test images')


def test_blend_predict_help_says_what_fit_on_fits_on():
    """--predict fits on the images --fit_on names; under the default, unseen, that is the
    validation patients only (retina.blend.fitting)."""
    from retina.blend import fitting as blending
    command = COMMANDS['blend.py']
    assert option(command, '--fit_on').default == 'unseen'
    text = option(command, '--predict').help
    assert 'Fit on every training image' not in text
    assert text.startswith('Fit the blend on the images --fit_on names (unseen, the default: '
                           "only the validation patients of the nets' split, or every training "
                           f'image when they are fewer than {blending.MIN_UNSEEN_PATIENTS}')
    assert 'never on the test split' in text
    assert blending.resolve_fit_on('unseen', [f'{p}_left' for p in range(200)],
                                   list(range(blending.MIN_UNSEEN_PATIENTS)), print) == 'unseen'


@pytest.mark.parametrize('name, auto', [('train_nn.py', options.PRECISION_AUTO_TRAINING),
                                        ('transform.py', options.PRECISION_AUTO_FEATURES)])
def test_precision_help_says_what_auto_means_in_that_script(name, auto):
    text = option(COMMANDS[name], '--precision').help
    assert text.startswith(f'auto: {auto}; {options.PRECISION_HELP}')
    assert flat(text) in help_page(name)


def test_what_auto_precision_means_is_what_each_script_does(monkeypatch):
    """train_nn.py: bf16 on a CPU with native bf16; transform.py: fp32 on every CPU (its
    extraction passes 'auto' to Runtime as '', the fp32-on-CPU default)."""
    import torch
    from retina.core import precision
    from retina.core.runtime import Runtime
    monkeypatch.setattr(precision, 'cpu_has_native_bf16', lambda: True)
    cpu = torch.device('cpu')
    assert precision.resolve_precision('auto', cpu) == 'bf16'
    assert 'CPUs with native bf16' in options.PRECISION_AUTO_TRAINING
    assert Runtime(cpu, precision='').precision == 'fp32'
    assert 'fp32 on every CPU' in options.PRECISION_AUTO_FEATURES
    monkeypatch.setattr(precision, 'cpu_has_native_bf16', lambda: False)
    assert precision.resolve_precision('auto', cpu) == 'fp32'
