"""retina.checkpoint: weights of another net, pickled payloads, compressed entries, mismatched or
non-finite tensors."""
import os

import pytest
import torch

from conftest import one_line_error, run_script
from retina.core.errors import UserError
from retina.model import checkpoint
from retina.model import config as config_module

CONFIG = 'c_128_5x5_32_ram'


def test_weights_of_another_architecture_for_transform_and_ram(workdir):
    other = config_module.load('c_128_4x4_32_ram')
    checkpoint.save(workdir / 'other.pt', model=other.build_net(), config=other, epoch=1)
    for script in ('transform.py', 'ram.py'):
        result = run_script(script, '--cnf', CONFIG, '--weights_from', 'other.pt', cwd=workdir,
                            check=False)
        one_line_error(result, 'other.pt', 'c_128_4x4_32_ram', CONFIG)


def test_pickled_payload_in_a_weights_file_is_refused(workdir, tmp_path):
    marker = tmp_path / 'pwned'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    torch.save({'format': checkpoint.FORMAT, 'model': {}, 'payload': Payload()},
               workdir / 'evil.pt')
    with pytest.raises(UserError, match='refused to load'):
        checkpoint.load(workdir / 'evil.pt')
    result = run_script('train_nn.py', '--cnf', CONFIG, '--weights_from', 'evil.pt',
                        '--max_epochs', '1', cwd=workdir, check=False)
    one_line_error(result, 'evil.pt', 'refused to load')
    assert not marker.exists()


@pytest.fixture(scope='module')
def untrained(tmp_path_factory):
    """An untrained checkpoint of CONFIG, built once."""
    config = config_module.load(CONFIG)
    path = tmp_path_factory.mktemp('weights') / 'untrained.pt'
    checkpoint.save(path, model=config.build_net(), config=config, epoch=0)
    return path


def _saved(tmp_path, untrained, change):
    """A copy of the untrained checkpoint after `change(state)` edits its dict."""
    state = torch.load(untrained, weights_only=True)
    change(state)
    path = tmp_path / 'w.pt'
    torch.save(state, path)
    return path


def test_a_compressed_weights_file_is_refused_before_it_inflates(tmp_path, untrained):
    import zipfile
    plain = _saved(tmp_path, untrained, lambda s: s.update(zeros=torch.zeros(4_000_000)))
    bomb = tmp_path / 'bomb.pt'
    with zipfile.ZipFile(plain) as source, \
            zipfile.ZipFile(bomb, 'w', zipfile.ZIP_DEFLATED) as packed:
        for info in source.infolist():
            packed.writestr(info.filename, source.read(info.filename))
    assert bomb.stat().st_size < plain.stat().st_size - 15_000_000
    with pytest.raises(UserError, match='bomb.pt: refused to load: .* is compressed'):
        checkpoint.load(bomb)


@pytest.mark.parametrize('change, words', [
    (lambda s: s['model'].update(extra=torch.zeros(1000, 1000)), 'do not match the network'),
    (lambda s: s['config']['layers'][1][1].update(filters=10 ** 6),
     'do not match the network'),
    (lambda s: s['model'][next(iter(s['model']))].view(-1).__setitem__(0, float('nan')),
     'the weights are broken'),
    (lambda s: s.pop('config'), 'has no usable config'),
    (lambda s: s['config'].update(cnf=[1, 2]), 'has no usable config'),
])
def test_weights_that_do_not_match_their_config_or_are_not_finite(tmp_path, untrained, change,
                                                                   words):
    checkpoint.load(untrained)
    path = _saved(tmp_path, untrained, change)
    with pytest.raises(UserError, match=words) as caught:
        checkpoint.load(path)
    assert str(path) in str(caught.value) and '\n' not in str(caught.value)


def test_weights_trained_on_images_stored_in_an_unknown_way_are_refused(tmp_path, untrained):
    path = _saved(tmp_path, untrained, lambda state: state.update(encoding='webp80'))
    with pytest.raises(UserError, match=r"w\.pt: trained on images stored as 'webp80'"):
        checkpoint.load_net(CONFIG, path)
    assert checkpoint.load_net(CONFIG, untrained).spec.encoding == 'none'  # unrecorded: lossless
