"""Every config module: loading, shapes, parameter counts, summary, weight transfer."""
import pytest
import torch

from conftest import REPO, run_script
from retina.core.errors import UserError
from retina.model import checkpoint
from retina.model import config as config_module
from retina.model.nets import is_ram_net, parameter_count

CONFIGS = sorted(p.stem for p in (REPO / 'configs').glob('c_*.py'))

# SPEC §4: 12.40M / 12.47M baseline, 9.78M / 9.84M RAM (within 0.1%).
EXPECTED_512 = {'c_512_5x5_32': 12.40e6, 'c_512_4x4_32': 12.47e6,
                'c_512_5x5_32_ram': 9.78e6, 'c_512_4x4_32_ram': 9.84e6}


ORIGINAL_BASELINES = [f'c_{size}_{kernel}_32' for size in (128, 256, 512)
                      for kernel in ('5x5', '4x4')]


def test_the_original_baselines_have_their_ram_variants_and_fine_nets_their_partner():
    """SPEC's six baseline nets and their RAM variants; other families are free to differ."""
    for base in ORIGINAL_BASELINES:
        assert base in CONFIGS and f'{base}_ram' in CONFIGS
        assert not config_module.load(base).build_net().is_ram
        assert config_module.load(f'{base}_ram').build_net().is_ram
    for fine in [c for c in CONFIGS if c.endswith('_ram_fine')]:
        assert fine[:-len('_fine')] in CONFIGS


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_and_gives_one_output_per_image(name):
    config = config_module.load(name)
    net = config.build_net().eval()
    x = torch.randn(2, 3, *config.input_size)
    with torch.no_grad():
        out, features = net(x, return_features=True)
    assert out.shape == (2, 1)
    assert torch.isfinite(out).all()
    if is_ram_net(config.layers):  # the one test for a RAM net, not the file name
        assert net.is_ram and net.feature_layer == 'gap'
        assert features.shape == (2, net.output_shapes[net.last_conv][0])
    else:
        assert not net.is_ram and net.feature_layer == 'rmspool'
        if '512' in name:
            assert features.shape == (2, 2048)


@pytest.mark.parametrize('name', sorted(EXPECTED_512))
def test_512_parameter_counts_match_the_paper(name):
    n = parameter_count(config_module.load(name).build_net())
    assert abs(n - EXPECTED_512[name]) / EXPECTED_512[name] < 1e-3


def test_4x4_512_sizes_follow_the_spec():
    net = config_module.load('c_512_4x4_32').build_net()
    sizes = [shape[1] for shape in net.output_shapes.values() if len(shape) == 3]
    assert sizes[:17] == [224, 225, 112, 56, 57, 56, 27, 28, 27, 28, 13, 14, 13, 14, 6, 5, 2]


def test_untied_biases_are_per_position_and_hold_a_large_share():
    net = config_module.load('c_512_5x5_32').build_net()
    assert net.conv1.bias.shape == (32, 224, 224)
    biases = sum(p.numel() for n, p in net.named_parameters() if n.startswith('conv') and
                 n.endswith('bias'))
    assert 0.3 < biases / parameter_count(net) < 0.5


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('layout', [torch.channels_last, torch.contiguous_format])
def test_the_cpu_untied_bias_gives_autograds_gradients(dtype, layout):
    from retina.model.nets import UntiedConv2d
    torch.manual_seed(0)
    layer = UntiedConv2d(3, 4, 3, 1, 1, (6, 5))
    x = torch.randn(7, 3, 6, 5).contiguous(memory_format=layout)
    target = torch.randn(7, 4, 6, 5)
    grads = []
    for fast in (True, False):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if fast:
                out = layer(xi)
            else:  # autograd's own gradient of the broadcast add
                conv = torch.nn.functional.conv2d(xi, layer.weight, stride=1, padding=1)
                out = torch.nn.functional.leaky_relu(conv + layer.bias.to(conv.dtype), 0.01)
        ((out.float() - target) ** 2).sum().backward()
        grads.append((layer.bias.grad.clone(), layer.weight.grad.clone(), xi.grad.clone()))
    assert grads[0][0].dtype == torch.float32 and grads[0][0].shape == (4, 6, 5)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2,
                                                                              atol=2e-2)
    for fast, plain in zip(*grads):
        torch.testing.assert_close(fast, plain, **tolerance)


def test_ram_variant_shares_trunk_and_settings_with_its_base():
    base, ram = config_module.load('c_256_4x4_32'), config_module.load('c_256_4x4_32_ram')
    assert {k: v for k, v in ram.cnf.items() if k not in ('schedule', 'weight_decay')} == \
        {k: v for k, v in base.cnf.items() if k not in ('schedule', 'weight_decay')}
    assert [l for l in ram.layers if l[0] == 'conv'] == [l for l in base.layers if l[0] == 'conv']


def test_ram_nets_have_the_ram_repositorys_batch_norm_decay_and_schedules():
    """SPEC §9: BN on the input and after every conv but the last, weight decay 0."""
    schedules = {'c_128_5x5_32_ram': {0: 0.001, 150: 0.0001, 201: 'stop'},
                 'c_128_4x4_32_ram': {0: 0.003, 150: 0.0003, 201: 'stop'},
                 'c_256_5x5_32_ram': {0: 0.001, 150: 0.0001, 201: 'stop'},
                 'c_256_4x4_32_ram': {0: 0.001, 150: 0.0001, 201: 'stop'},
                 'c_512_5x5_32_ram': {0: 0.0001, 150: 0.00001, 251: 'stop'},
                 'c_512_4x4_32_ram': {0: 0.0001, 100: 0.00001, 251: 'stop'}}
    for name, schedule in schedules.items():
        config = config_module.load(name)
        assert config.cnf['schedule'] == schedule and config.cnf['weight_decay'] == 0
        kinds = [(kind, opt['name']) for kind, opt in config.layers]
        convs = [n for kind, n in kinds if kind == 'conv']
        assert kinds[0] == ('bn', 'input_bn')
        for conv in convs[:-1]:
            assert kinds[kinds.index(('conv', conv)) + 1] == ('bn', f'{conv}_bn')
        assert kinds[kinds.index(('conv', convs[-1])) + 1][0] == 'gap'
        net = config.build_net()
        assert isinstance(net.conv1_bn, torch.nn.BatchNorm2d) and net.conv1_bn.num_features == 32


def test_fine_heat_map_nets_end_in_about_54_by_54():
    for name, size in (('c_128_5x5_32_ram_fine', 53), ('c_256_5x5_32_ram_fine', 55)):
        net = config_module.load(name).build_net()
        assert net.is_ram and net.output_shapes[net.last_conv][1:] == (size, size)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_batch_norm_weights_are_not_decayed():
    from retina.train.loop import make_optimizer
    config = config_module.load('c_128_5x5_32_ram')
    net = config.build_net()
    optimizer = make_optimizer(net, dict(config.cnf, weight_decay=0.1), 0.01)
    decayed = {id(p) for g in optimizer.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert id(net.conv1.weight) in decayed and id(net.output.weight) in decayed
    assert id(net.conv1_bn.weight) not in decayed and id(net.conv1.bias) not in decayed


def test_config_hyper_parameters_follow_the_spec():
    assert config_module.load('c_512_5x5_32').cnf['batch_size_train'] == 32
    assert config_module.load('c_512_4x4_32').cnf['batch_size_train'] == 48
    assert config_module.load('c_128_4x4_32').cnf['aug_params']['translation_range'] == (-10, 10)
    assert config_module.load('c_256_4x4_32').cnf['aug_params']['translation_range'] == (-20, 20)
    assert config_module.load('c_512_4x4_32').cnf['sigma'] == 0.25
    assert config_module.load('c_512_5x5_32').cnf['schedule'][251] == 'stop'


def test_config_by_path_name_and_module_name_agree():
    a = config_module.load(REPO / 'configs' / 'c_128_5x5_32.py')
    b = config_module.load('c_128_5x5_32')
    c = config_module.load('configs.c_128_5x5_32')
    assert a.name == b.name == c.name == 'c_128_5x5_32' and a.cnf == b.cnf == c.cnf


def test_summary_cli_prints_layers_and_total():
    result = run_script('train_nn.py', '--cnf', 'configs/c_512_5x5_32_ram.py', '--summary',
                        cwd=REPO)
    lines = result.stdout.strip().splitlines()
    # 9,779,169 without batch norm (SPEC §4) + 3,846 BN scales and shifts (3 + 1,920 channels)
    assert lines[-1] == 'parameters: 9,783,015'
    assert any(line.startswith('conv13') and '512x6x6' in line for line in lines)
    assert any(line.startswith('conv12_bn') and 'BatchNorm2d' in line for line in lines)
    per_layer = sum(int(line.split()[-1].replace(',', '')) for line in lines[2:-1])
    assert per_layer == 9_783_015


def test_unknown_config_suggests_the_closest(tmp_path):
    result = run_script('train_nn.py', '--cnf', 'c_128_5x5_23', '--summary', cwd=tmp_path,
                        check=False)
    assert result.returncode == 2
    assert 'did you mean c_128_5x5_32' in result.stderr and 'Traceback' not in result.stderr


def test_typo_key_and_syntax_error_are_one_line(tmp_path):
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'c_typo.py').write_text(
        'from configs.c_128_5x5_32 import cnf as base, layers\n'
        'cnf = dict(base, batch_size_trian=3)\n')
    (tmp_path / 'configs' / 'c_broken.py').write_text('cnf = dict(w=112\n')
    typo = run_script('train_nn.py', '--cnf', 'configs/c_typo.py', '--summary', cwd=tmp_path,
                      check=False)
    assert typo.returncode == 2 and "did you mean 'batch_size_train'" in typo.stderr
    broken = run_script('train_nn.py', '--cnf', 'configs/c_broken.py', '--summary', cwd=tmp_path,
                        check=False)
    assert broken.returncode == 2 and 'c_broken.py, line 1' in broken.stderr
    for result in (typo, broken):
        assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('layers, words', [
    ("[('conv', dict(filters=8, size=3, stride=1, pad=1)), ('output', dict(name='out', units=1))]",
     "layer 1 ('conv'"),
    ("[('conv', dict(name='a', filters=8, size=3, stride=1, pad=1)), ('output', dict(name='a', "
     "units=1))]", "two layers are named 'a'"),
])
def test_a_layer_without_a_name_of_its_own_is_one_line(tmp_path, layers, words):
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'c_unnamed.py').write_text(
        'from configs.c_128_5x5_32 import cnf\n'
        f'layers = {layers}\n')
    result = run_script('train_nn.py', '--cnf', 'configs/c_unnamed.py', '--summary',
                        cwd=tmp_path, check=False)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert 'c_unnamed.py' in result.stderr and 'unexpected' not in result.stderr
    assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_config_may_carry_or_leave_out_an_optional_key(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, 'OPTIONAL_KEYS', dict(config_module.OPTIONAL_KEYS, note='free text'))
    base = config_module.load('c_128_5x5_32')
    for extra, name in (({}, 'c_without'), ({'note': 'hi'}, 'c_with')):
        config_module.check_cnf(dict(base.cnf, **extra), name)
    with pytest.raises(UserError, match="unknown config key 'nots'; did you mean 'note'"):
        config_module.check_cnf(dict(base.cnf, nots='hi'), 'c_typo')
    with pytest.raises(UserError, match='missing: sigma'):
        config_module.check_cnf({k: v for k, v in base.cnf.items() if k != 'sigma'}, 'c_short')


@pytest.mark.parametrize('override, words', [
    ('w=0', 'w=0; it must be a positive integer'),
    ("w='112'", "w='112'; it must be a positive integer"),
    ('batch_size_train=0', 'batch_size_train=0; it must be a positive integer'),
    ('sigma=-1', 'sigma=-1; it must be a number ≥ 0'),
    ('momentum=1.5', 'momentum=1.5; it must be a number from 0 to 1'),
    ("schedule={0: -0.1, 5: 'stop'}", 'schedule entry 0: -0.1'),
    ("aug_params=dict(base['aug_params'], zoom_range=(2, 1))", 'zoom_range=(2, 1)'),
    ('w=16, h=16', 'input too small'),
])
def test_config_values_are_checked_in_one_line(tmp_path, override, words):
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'c_value.py').write_text(
        'from configs.c_128_5x5_32 import cnf as base, layers\n'
        f'cnf = dict(base, {override})\n')
    result = run_script('train_nn.py', '--cnf', 'configs/c_value.py', '--summary', cwd=tmp_path,
                        check=False)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 1

def test_transfer_128_to_256_copies_kernels_and_skips_untied_biases(tmp_path):
    small = config_module.load('c_128_5x5_32')
    large = config_module.load('c_256_5x5_32')
    source = small.build_net()
    checkpoint.save(tmp_path / 'w.pt', model=source, config=small, epoch=1)
    target = large.build_net()
    copied, skipped = checkpoint.load_matching(target, checkpoint.load(tmp_path / 'w.pt'),
                                               tmp_path / 'w.pt')
    assert 'conv1.weight' in copied and 'conv8.weight' in copied
    assert torch.equal(target.conv5.weight, source.conv5.weight)
    assert any(s.startswith('conv1.bias') for s in skipped)
    assert any(s.startswith('conv9.weight') and 'absent' in s for s in skipped)


def test_transfer_carries_batch_norm_layers_by_name(tmp_path):
    small, large = config_module.load('c_128_5x5_32_ram'), config_module.load('c_256_5x5_32_ram')
    source = small.build_net()
    with torch.no_grad():
        source.conv3_bn.running_mean.fill_(0.5)
        source.conv3_bn.weight.fill_(2.0)
    checkpoint.save(tmp_path / 'w.pt', model=source, config=small, epoch=1)
    target = large.build_net()
    copied, skipped = checkpoint.load_matching(target, checkpoint.load(tmp_path / 'w.pt'),
                                               tmp_path / 'w.pt')
    assert {'input_bn.weight', 'conv3_bn.weight', 'conv3_bn.running_mean'} <= set(copied)
    assert torch.equal(target.conv3_bn.running_mean, torch.full((64,), 0.5))
    assert torch.equal(target.conv3_bn.weight, torch.full((64,), 2.0))
    assert any(s.startswith('conv9_bn.weight') and 'absent' in s for s in skipped)


def test_weights_of_another_architecture_are_refused_for_inference(tmp_path):
    four = config_module.load('c_128_4x4_32_ram')
    checkpoint.save(tmp_path / 'w.pt', model=four.build_net(), config=four, epoch=1)
    five = config_module.load('c_128_5x5_32_ram')
    with pytest.raises(UserError, match='do not fit config c_128_5x5_32_ram'):
        checkpoint.load_exact(five.build_net(), checkpoint.load(tmp_path / 'w.pt'),
                              tmp_path / 'w.pt', five.name)


def test_a_new_net_family_is_one_module_that_registers_its_layers(tmp_path, monkeypatch):
    """A family with a layer kind of its own (a tied, padded conv here): its module registers
    the kind, its config uses it, and the net builds, trains with weight decay on the new
    kind's weights, and gets Grad-CAM maps at the new layers; no other file names it."""
    from retina.heatmaps import methods
    from retina.model import nets
    from retina.train.loop import make_optimizer
    monkeypatch.setattr(nets, 'LAYER_KINDS', dict(nets.LAYER_KINDS))
    (tmp_path / 'family_tied.py').write_text(
        'import torch.nn as nn\n'
        'from retina.model.nets import layer_kind\n\n\n'
        "@layer_kind('tied_conv', spatial=True, regularizable=('0.weight',))\n"
        'def tied_conv(opt, shape):\n'
        "    conv = nn.Conv2d(shape[0], opt['filters'], 3, padding=1)\n"
        "    return nn.Sequential(conv, nn.ReLU()), (opt['filters'], *shape[1:])\n")
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'c_32_tied_ram.py').write_text(
        'import family_tied  # noqa: F401 (registers tied_conv)\n'
        'from configs.c_128_5x5_32_ram import cnf as base\n'
        'from retina.model.nets import ram_head\n\n'
        'cnf = dict(base, w=32, h=32)\n'
        "layers = [('tied_conv', dict(name='t1', filters=8)),\n"
        "          ('tied_conv', dict(name='t2', filters=16))] + ram_head()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = config_module.load('configs/c_32_tied_ram.py')
    net = config.build_net()
    assert net.spatial_layers == ['t1', 't2'] == methods.conv_layers(net)
    assert net.is_ram and net.last_conv == 't2' and net(torch.zeros(2, 3, 32, 32)).shape == (2, 1)
    maps, _ = methods.grad_cam(net, torch.randn(2, 3, 32, 32), layer='t1')
    assert maps.shape == (2, 32, 32)
    optimizer = make_optimizer(net, dict(config.cnf, weight_decay=0.1), 0.01)
    decayed = {id(p) for g in optimizer.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert id(net.t1[0].weight) in decayed and id(net.t1[0].bias) not in decayed
    with pytest.raises(ValueError, match="unknown layer kind 'nope'"):
        nets.Net([('nope', dict(name='x'))], (32, 32))
