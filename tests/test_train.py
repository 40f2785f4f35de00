"""Training: loss goes down, schedule, checkpoints, resume, NaN stop, devices, DDP on gloo."""
import csv
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from conftest import (_limit_file_size, as_loaded, assert_loadable, kill_when, noise_images,
                      one_line_error, run_script, start, weight_files)
from retina.core import lock, paths
from retina.core.errors import UserError
from retina.core.paths import patient_and_eye
from retina.data.conversion import convert_folder
from retina.data.labels import held_out, labelled_images
from retina.model import checkpoint
from retina.model import config as config_module
from retina.model.augment import KAGGLE, prepare_batch, random_params
from retina.train.loop import lr_for_epoch, make_optimizer, train

CONFIG = 'c_128_5x5_32_ram'
TRAIN = ['train_nn.py', '--cnf', CONFIG, '--max_epochs', '4', '--seed', '1', '--deterministic',
         '--no_progress']


def test_schedule_changes_at_the_end_of_the_numbered_epoch():
    schedule = {0: 0.003, 150: 0.0003, 201: 'stop'}
    assert lr_for_epoch(schedule, 1) == 0.003
    assert lr_for_epoch(schedule, 150) == 0.003
    assert lr_for_epoch(schedule, 151) == 0.0003
    assert lr_for_epoch(schedule, 201) == 0.0003
    assert lr_for_epoch(schedule, 202) == 'stop'


def test_l2_is_lasagne_convention_on_weights_only():
    config = config_module.load('c_128_5x5_32')  # the RAM nets have no weight decay
    optimizer = make_optimizer(config.build_net(), config.cnf, 0.01)
    weights, biases = optimizer.param_groups
    assert weights['weight_decay'] == pytest.approx(2 * 0.0005) and biases['weight_decay'] == 0
    assert all(p.dim() in (2, 4) for p in weights['params'])
    assert optimizer.defaults['nesterov'] and optimizer.defaults['momentum'] == 0.9


def test_a_few_steps_lower_the_loss_on_synthetic_images(converted_workdir):
    from retina.data.cache import load_images
    config = config_module.load(CONFIG)
    image_paths, levels = labelled_images(converted_workdir / 'data' / 'train_tiny',
                                               converted_workdir / 'data' / 'trainLabels.csv')
    images = torch.from_numpy(np.array(load_images(image_paths[:32],
                                                   cache_dir=converted_workdir / 'cache')))
    target = torch.as_tensor(levels[:32], dtype=torch.float32)
    torch.manual_seed(0)
    net = config.build_net()
    optimizer = make_optimizer(net, config.cnf, 0.003)
    x = prepare_batch(images, config.input_size, constants=KAGGLE)
    losses = []
    for _ in range(8):
        loss = F.mse_loss(net(x).squeeze(1), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_random_params_follow_the_config_ranges():
    aug = config_module.load('c_128_4x4_32').cnf['aug_params']
    params = random_params(4000, aug, 0.25, torch.Generator().manual_seed(0))
    assert params['tx'].abs().max() <= 10 and params['tx'].std() > 4
    assert params['rotation'].min() >= 0 and params['rotation'].max() <= 360
    assert 1 / 1.15 - 1e-6 <= params['zoom_x'].min() and params['zoom_x'].max() <= 1.15 + 1e-6
    assert not torch.equal(params['zoom_x'], params['zoom_y'])  # stretch
    assert 0.45 < params['flip'].mean() < 0.55
    assert params['colour'].std().item() == pytest.approx(0.25, rel=0.1)


def _train(workdir, monkeypatch, **kwargs):
    monkeypatch.chdir(workdir)
    return train(config_module.load(CONFIG), device='cpu', progress=False,
                 echo=lambda *a, **k: None, **kwargs)


def test_training_writes_the_original_weight_files_and_log(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    config = config_module.load(CONFIG)
    config.cnf['schedule'] = {0: 0.003, 3: 0.0003, 5: 'stop'}
    result = train(config, device='cpu', progress=False, echo=lambda *a, **k: None)
    run = workdir / paths.run_dir(CONFIG)
    assert (run / 'weights.pt').is_file() and (run / 'weights_final.pt').is_file()
    assert len(list((run / 'epochs').glob('0005_*.pt'))) == 1
    assert list((run / 'best').glob('*.pt'))
    rows = list(csv.DictReader(open(run / 'log.csv')))
    assert [int(r['epoch']) for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(float(r['train_loss'])) for r in rows)
    assert (run / 'config.json').is_file()
    state = checkpoint.load(run / 'weights_final.pt')
    rebuilt = checkpoint.config_of(state).build_net()
    rebuilt.load_state_dict(state['model'])
    assert result['epoch'] == 5


def _train_with_schedule(workdir, schedule):
    """train_nn.py on a copy of CONFIG with another schedule; a one-line error is expected."""
    (workdir / 'configs').mkdir()
    (workdir / 'configs' / 'c_explode.py').write_text(
        'from configs.c_128_5x5_32_ram import cnf as base, layers\n'
        f'cnf = dict(base, schedule={schedule})\n')
    result = run_script('train_nn.py', '--cnf', 'configs/c_explode.py', '--no_progress',
                        cwd=workdir, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    return result, workdir / 'weights' / 'c_explode'


def test_nan_loss_stops_and_keeps_the_last_good_weights(workdir):
    result, run = _train_with_schedule(workdir, "{0: 0.003, 1: 1e12, 5: 'stop'}")
    assert 'NaN' in result.stderr and 'last good weights' in result.stderr
    state = checkpoint.load(run / 'last.pt')
    assert state['epoch'] >= 1
    assert all(torch.isfinite(v).all() for v in state['model'].values())


def test_nan_in_the_first_epoch_says_no_weights_were_saved(workdir):
    result, run = _train_with_schedule(workdir, "{0: 1e12, 5: 'stop'}")
    assert 'at epoch 1' in result.stderr and 'no weights were saved' in result.stderr
    assert not (run / 'last.pt').exists() and not (run / 'weights.pt').exists()


def test_a_typo_in_the_schedule_is_caught_before_training(workdir):
    result, _ = _train_with_schedule(workdir, "{0: 0.003, 150: 'stpo'}")
    assert "schedule entry 150: 'stpo'" in result.stderr
    assert not (workdir / 'weights').exists()


def test_cnf_path_works_from_another_folder(tmp_path):
    result = run_script('train_nn.py', '--cnf', 'configs/c_128_5x5_32_ram.py', '--summary',
                        cwd=tmp_path)
    assert result.stdout.strip().splitlines()[-1].startswith('parameters: ')


@pytest.mark.slow
def test_cli_short_run_a_second_run_and_missing_labels(workdir):
    labels = workdir / 'data' / 'trainLabels.csv'
    text = labels.read_text()
    labels.write_text(text + '99999_left,2\n99999_right,3\n')
    result = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '1',
                        '--no_progress', cwd=workdir)
    assert 'epoch    1' in result.stdout and 'max_epochs 1' in result.stdout
    assert 'validation images; a kappa on fewer than 20 is mostly noise' in result.stdout
    with Image.open(workdir / 'weights' / CONFIG / 'curves.png') as curves:  # drawn each epoch
        assert curves.format == 'PNG'
    assert 'note: 2 image(s) named in data/trainLabels.csv are not in data/train_tiny' in \
        result.stdout
    labels.write_text(text)
    assert not (workdir / 'weights' / CONFIG / 'weights_final.pt').exists()
    first = checkpoint.load(workdir / 'weights' / CONFIG / 'last.pt')
    again = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '1', '--seed', '1',
                       '--no_progress', cwd=workdir)
    assert 'moved the earlier run' in again.stdout
    earlier = list((workdir / 'weights').glob(f'{CONFIG}.earlier-*'))
    assert len(earlier) == 1
    kept = checkpoint.load(earlier[0] / 'last.pt')
    assert all(torch.equal(kept['model'][k], v) for k, v in first['model'].items())
    assert (workdir / 'weights' / CONFIG / 'last.pt').is_file()
    labels = workdir / 'data' / 'trainLabels.csv'
    rows = labels.read_text().splitlines()
    labels.write_text('\n'.join(rows[:-2]) + '\n')
    missing = run_script('train_nn.py', '--cnf', 'c_128_5x5_32', '--max_epochs', '1',
                         cwd=workdir, check=False)
    assert missing.returncode == 2 and 'no label for 2 image(s)' in missing.stderr
    assert rows[-1].split(',')[0] in missing.stderr


def test_weights_from_lists_skipped_layers(workdir):
    source = config_module.load('c_128_4x4_32')  # untrained weights will do
    checkpoint.save(workdir / 'weights' / 'c_128_4x4_32' / 'weights.pt',
                    model=source.build_net(), config=source, epoch=0)
    result = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '1', '--no_progress',
                        '--weights_from', 'weights/c_128_4x4_32/weights.pt', cwd=workdir,
                        check=False)
    assert result.returncode == 2 and 'no weight matches' in result.stderr
    assert 'weights of c_128_4x4_32' in result.stderr
    ok = run_script('train_nn.py', '--cnf', 'c_128_4x4_32_ram', '--max_epochs', '1',
                    '--no_progress', '--weights_from', 'weights/c_128_4x4_32/weights.pt',
                    cwd=workdir)
    assert 'skipped output.weight (1, 128) (in weights.pt: (1, 512))' in ok.stdout
    # the same trunk: its 8 conv layers (weight, bias) and the output bias are copied
    assert 'loaded 17 parameter(s) from weights/c_128_4x4_32/weights.pt (weights of ' \
           'c_128_4x4_32)' in ok.stdout


def test_cuda_request_without_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    result = run_script('train_nn.py', '--cnf', CONFIG, '--device', 'cuda', cwd=tmp_path,
                        check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ('error: --device cuda: no CUDA GPU is available on this '
                                     'machine; use --device cpu')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, workdir, out):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    os.chdir(workdir)
    torch.set_num_threads(1)
    result = train(config_module.load(CONFIG), max_epochs=2, device='cpu', progress=False,
                   echo=lambda *a, **k: None)
    torch.save(result['state_dict'], os.path.join(out, f'rank{rank}.pt'))


def test_two_gloo_ranks_end_with_identical_weights(workdir, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(workdir), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    saved = checkpoint.load(workdir / 'weights' / CONFIG / 'last.pt')['model']
    assert all(torch.equal(saved[name], value) for name, value in ranks[0].items())
    rows = list(csv.DictReader(open(workdir / paths.train_log(CONFIG))))
    assert len(rows) == 2


@pytest.mark.parametrize('device, words', [('mps', 'only cpu and cuda are supported'),
                                           ('tpu7', 'unknown device')])
def test_other_devices_are_one_line(tmp_path, device, words):
    result = run_script('train_nn.py', '--cnf', CONFIG, '--device', device, cwd=tmp_path,
                        check=False)
    assert result.returncode == 2 and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- issue 14: the GPU paths, checked on the CPU ------------------------------

def test_batch_is_per_process_under_torchrun_unless_split():
    from retina.core.runtime import Runtime
    from retina.train.loop import process_batch_size
    cnf = dict(batch_size_train=32)
    eight = Runtime(torch.device('cpu'), rank=3, world=8)
    assert process_batch_size(cnf, eight) == 32
    assert process_batch_size(cnf, eight, split_batch=True) == 4
    assert process_batch_size(cnf, Runtime(torch.device('cpu')), split_batch=True) == 32


def _tiny_epoch(indices, inner=prepare_batch, **kwargs):
    """train_one_epoch of a tiny net over `indices` of 8 random 20-px images, each batch
    prepared by `inner`; the batch sizes and the metrics."""
    from retina.core.runtime import Runtime
    from retina.train.loop import train_one_epoch
    config = config_module.load(CONFIG)
    config.cnf.update(h=16, w=16)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(2, 1))
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 20, 20), dtype=np.uint8)
    sizes = []

    def prepare(batch, size, params, **layout):
        sizes.append(len(batch))
        x = inner(batch, size, params, **layout)
        assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
        return x

    metrics = train_one_epoch(net, torch.optim.SGD(net.parameters(), lr=0.01), images,
                              np.arange(8) % 5, np.asarray(indices), config,
                              Runtime(torch.device('cpu')), torch.Generator().manual_seed(0),
                              progress=False, prepare=prepare, **kwargs)
    return sizes, metrics


def test_a_compiled_run_drops_the_last_smaller_batch():
    assert _tiny_epoch(range(7), batch_size=3)[0] == [3, 3, 1]
    assert _tiny_epoch(range(7), batch_size=3, drop_last=True)[0] == [3, 3]
    # fewer images than one batch: kept (one more compile is better than no step)
    assert _tiny_epoch(range(2), batch_size=3, drop_last=True)[0] == [2]


def test_a_failing_compiler_falls_back_to_eager():
    from retina.core.runtime import compile_or_eager

    def broken_backend(graph, example_inputs):
        raise RuntimeError('no compiler here')

    net = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    said = []
    compiled = compile_or_eager(net, said.append, backend=broken_backend)
    torch.testing.assert_close(compiled(x), net(x))
    assert not said  # the fallback is dynamo's warning at run time, not a note up front


def test_host_cache_batches_are_the_gathered_rows_in_index_order(tmp_path):
    """A memory-mapped (read-only) cache and a torch one give the same sorted batches."""
    from retina.core.runtime import batches
    cache = np.lib.format.open_memmap(tmp_path / 'cache.npy', mode='w+', dtype=np.uint8,
                                      shape=(11, 3, 4, 4))
    cache[:] = np.random.default_rng(0).integers(0, 256, cache.shape, dtype=np.uint8)
    cache.flush()
    read_only = np.load(tmp_path / 'cache.npy', mmap_mode='r')
    indices = np.array([9, 2, 2, 7, 0, 10, 5, 3], dtype=np.int32)
    for images in (read_only, torch.from_numpy(np.array(read_only))):
        got = list(batches(images, indices, 3, torch.device('cpu')))
        assert [c.tolist() for _, c in got] == [[2, 2, 9], [0, 7, 10], [3, 5]]
        for batch, chunk in got:
            assert batch.dtype == torch.uint8 and chunk.dtype == torch.int64
            np.testing.assert_array_equal(batch.numpy(), read_only[chunk.numpy()])


def test_cuda_graphs_compile_the_net_the_validation_net_and_the_augmentation(monkeypatch):
    from retina.core import runtime as runtime_module
    from retina.core.runtime import CUDA_GRAPHS, Runtime
    from retina.train.loop import wrap
    modes = []

    def fake_compile(model, **options):
        modes.append(options.get('mode'))
        return model
    monkeypatch.setattr(torch, 'compile', fake_compile)
    net = torch.nn.Linear(2, 1)
    for graphs, expected in ((True, CUDA_GRAPHS), (False, None)):
        modes.clear()
        wrap(net, Runtime(torch.device('cpu')), True, print, cuda_graphs=graphs)
        assert modes == [expected, expected]  # the net (also the validation net), prepare
    assert runtime_module.CUDA_GRAPHS == 'reduce-overhead'


def test_cuda_graphs_are_refused_where_they_cannot_run():
    from retina.core.errors import UserError
    from retina.core.runtime import Runtime, check_cuda_graphs
    cuda = torch.device('cuda')  # a device object only: nothing runs on it
    check_cuda_graphs(Runtime(cuda), compile_model=True)
    for runtime, compiled, words in ((Runtime(torch.device('cpu')), True, 'need a CUDA GPU'),
                                     (Runtime(cuda), False, '--no_compile'),
                                     (Runtime(cuda, rank=1, world=2), True, 'torchrun')):
        with pytest.raises(UserError, match=words):
            check_cuda_graphs(runtime, compiled)


def test_parts_run_without_cuda_graphs_are_noted(monkeypatch):
    from torch._dynamo.utils import counters

    from retina.core.runtime import note_cuda_graph_skips
    said = []
    monkeypatch.setitem(counters['inductor'], 'cudagraph_skips', 0)
    assert note_cuda_graph_skips(said.append) == 0 and not said
    monkeypatch.setitem(counters['inductor'], 'cudagraph_skips', 2)
    assert note_cuda_graph_skips(said.append) == 2
    assert said == ['note: --cuda_graphs: the compiler ran 2 compiled part(s) without CUDA '
                    'graphs (slower, still correct); TORCH_LOGS=perf_hints shows why']


def test_train_nn_cuda_graphs_on_the_cpu_is_a_one_line_error(tmp_path):
    result = run_script('train_nn.py', '--cnf', CONFIG, '--cuda_graphs', '--device', 'cpu',
                        cwd=tmp_path, check=False)
    assert result.returncode != 0 and 'CUDA graphs need a CUDA GPU' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and 'Traceback' not in result.stderr


def test_the_compiled_augmentation_is_one_graph_compiled_once():
    """Compiled (as on a GPU), prepare_batch is one graph, traced once for an epoch: no graph
    break (dynamo cannot trace `out=` into a channels_last tensor) and no second trace (the
    constants are placed before it runs, not cached from inside its first graph, which with
    CUDA graphs would be memory the next replay reuses)."""
    from retina.model import augment
    graphs = []

    def counting(graph, example_inputs):
        graphs.append(graph)
        return graph.forward
    augment._CONSTANTS.clear()
    torch._dynamo.reset()
    compiled = torch.compile(prepare_batch, backend=counting, dynamic=False)
    sizes, metrics = _tiny_epoch(range(8), compiled, batch_size=2, drop_last=True)
    assert sizes == [2, 2, 2, 2] and math.isfinite(metrics['train_loss'])
    assert len(graphs) == 1


def test_the_compiled_augmentation_gives_the_eager_result():
    config = config_module.load(CONFIG)
    images = torch.randint(0, 256, (3, 3, 128, 128), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    params = random_params(3, config.cnf['aug_params'], config.cnf['sigma'],
                           torch.Generator().manual_seed(1))
    traced = torch.compile(prepare_batch, backend='eager', dynamic=False)
    for dtype in (torch.float32, torch.bfloat16):
        layout = dict(dtype=dtype, memory_format=torch.channels_last, constants=KAGGLE)
        eager = prepare_batch(images, config.input_size, params, **layout)
        got = traced(images, config.input_size, params, **layout)
        assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, eager)


def test_checkpoints_are_host_copies_written_in_order_in_the_background(tmp_path, monkeypatch):
    config = config_module.load(CONFIG)
    net = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    state = checkpoint.snapshot(net, config, 1, optimizer)
    before = state['model']['weight'].clone()
    with torch.no_grad():
        net.weight += 1  # training goes on: the snapshot keeps the weights of its moment
    assert torch.equal(state['model']['weight'], before)
    momentum = state['optimizer']['state'][0]['momentum_buffer']
    assert momentum.data_ptr() != optimizer.state_dict()['state'][0]['momentum_buffer'].data_ptr()

    written = []
    monkeypatch.setattr(checkpoint.atomic, 'torch_save', lambda path, s: written.append(path))
    writer = checkpoint.BackgroundWriter()
    writer.write([(tmp_path / 'a.pt', state), (tmp_path / 'last.pt', state)])
    writer.wait()
    assert written == [tmp_path / 'a.pt', tmp_path / 'last.pt']

    def full_disk(path, s):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(checkpoint.atomic, 'torch_save', full_disk)
    writer.write([(tmp_path / 'b.pt', state)])
    with pytest.raises(OSError, match='No space'):
        writer.wait()
    writer.wait()  # reported once


def test_tta_iterations_inside_the_batch_loop_give_each_iteration_s_features(tmp_path,
                                                                              monkeypatch):
    """transform.py's blocks of iterations per batch: the same sums as one pass per iteration."""
    from retina.features.extract import extract_features
    from retina.features.files import load_features
    from retina.model.augment import broadcast_params, tta_params
    monkeypatch.chdir(tmp_path)
    config = config_module.load(CONFIG)
    folder = tmp_path / 'images'
    pixels = noise_images(folder, 5)
    torch.manual_seed(0)
    net = config.build_net().eval()
    made = extract_features(config, as_loaded(config, net), folder, 'test', n_iter=7, batch_size=2, progress=False,
                            echo=lambda *a: None, precision='fp32')
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    augmentations = tta_params(7, 0, config.cnf['aug_params'], config.cnf['sigma'])
    with torch.no_grad():
        each = torch.stack([net(prepare_batch(images, config.input_size,
                                              broadcast_params(p, 5), constants=KAGGLE),
                                return_features=True)[1]
                            for p in augmentations]).double()
    for done in (5, 7):
        mean, _ = load_features(paths.features(CONFIG, 'test', 'mean', done, 0))
        np.testing.assert_allclose(mean, each[:done].mean(0).numpy(), rtol=1e-4, atol=1e-5)
    std, _ = load_features(made['std'])
    np.testing.assert_allclose(std, each.std(0, unbiased=False).numpy(), rtol=1e-3, atol=1e-4)


def _short_of_memory(net, fails):
    """`net`, whose forward raises out-of-memory where `fails(call number, batch size)` (as a
    GPU smaller than the default batch needs would); the batch sizes it was called with."""
    forward, seen = net.forward, []

    def limited(x, **kwargs):
        seen.append(len(x))
        if fails(len(seen), len(x)):
            raise torch.OutOfMemoryError(f'CUDA out of memory (a batch of {len(x)}: simulated)')
        return forward(x, **kwargs)
    net.forward = limited
    return seen


def test_validation_halves_its_batch_until_it_fits_and_keeps_that_size(capsys):
    from retina.core.runtime import Runtime
    from retina.model.checkpoint import InputSpec
    from retina.model.inference import predict
    config = config_module.load(CONFIG)
    torch.manual_seed(0)
    net = config.build_net().eval()
    images = np.random.default_rng(0).integers(0, 256, (7, 3, 128, 128), dtype=np.uint8)
    runtime = Runtime(torch.device('cpu'))
    spec = InputSpec.of_config(config)
    expected = predict(net, images, np.arange(7), spec, runtime, batch_size=7)
    seen = _short_of_memory(net, lambda call, size: size > 2)
    got = predict(net, images, np.arange(7)[::-1], spec, runtime, batch_size=8)
    np.testing.assert_allclose(got, expected[::-1], rtol=1e-5, atol=1e-6)
    assert seen[:3] == [7, 4, 2] and runtime.eval_limit == 2
    assert ("validation: 4 images per batch do not fit in memory; trying 2"
            in capsys.readouterr().err)
    seen.clear()
    # the next epoch starts at what fit
    predict(net, images, np.arange(7), spec, runtime, runtime.eval_batch_size(config.cnf))
    assert max(seen) == 2
    with pytest.raises(torch.OutOfMemoryError):  # not even one image: the error itself
        _short_of_memory(net, lambda call, size: True)
        predict(net, images, np.arange(3), spec, runtime, runtime.eval_batch_size(config.cnf))


# The first block: 2 batches (4 + 1 images) × 5 iterations, calls 1-10; in the second, the
# first batch's iteration 6 (call 12) runs after its iteration 5 has added to the sums.
@pytest.mark.parametrize('failing, expected', [
    ({1}, [4, 2, 2, 2, 2, 2]),  # the first call: the sums do not exist yet
    ({12}, [4] * 5 + [1] * 5 + [4, 4, 2]),  # the second block, halfway through a batch
    ({12, 15}, [4] * 5 + [1] * 5 + [4, 4, 2, 2, 2, 1]),  # twice in one block: 4, 2, then 1
])
def test_features_redo_a_block_at_half_the_batch_when_memory_runs_out(tmp_path, monkeypatch,
                                                                      capsys, failing,
                                                                      expected):
    from retina.features.extract import extract_features
    from retina.features.files import load_features
    config = config_module.load(CONFIG)
    folder = tmp_path / 'images'
    noise_images(folder, 5)
    torch.manual_seed(0)
    net = config.build_net().eval()
    results = {}
    for name in ('plain', 'short'):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        seen = (_short_of_memory(net, lambda call, size: call in failing and size > 1)
                if name == 'short' else [])
        made = extract_features(config, as_loaded(config, net), folder, 'test', n_iter=7, batch_size=4,
                                progress=False, echo=lambda *a: None)
        results[name] = [load_features(made[k])[0] for k in ('mean', 'std')]
    assert seen[:len(expected)] == expected
    assert 'test features: 4 images per batch do not fit' in capsys.readouterr().err
    for short, plain in zip(results['short'], results['plain']):
        np.testing.assert_allclose(short, plain, rtol=1e-4, atol=1e-5)


def test_precision_is_recorded_and_a_run_resumes_under_the_other(workdir, monkeypatch):
    said = []
    monkeypatch.chdir(workdir)
    train(config_module.load(CONFIG), device='cpu', progress=False, max_epochs=1,
          precision='fp32', echo=said.append)
    run = workdir / paths.run_dir(CONFIG)
    assert checkpoint.load(run / 'last.pt')['precision'] == 'fp32'
    assert json.loads((run / 'config.json').read_text())['precision'] == 'fp32'
    assert any(', fp32' in line for line in said)
    result = train(config_module.load(CONFIG), device='cpu', progress=False, max_epochs=2,
                   precision='bf16', resume=True, echo=said.append)
    assert result['epoch'] == 2
    assert any('computed in fp32 until epoch 1; it continues in bf16' in line for line in said)
    last = checkpoint.load(run / 'last.pt')
    assert last['precision'] == 'bf16' and last['epoch'] == 2
    # Weights and momentum stay fp32 under bf16 autocast.
    assert all(v.dtype == torch.float32 for v in last['model'].values() if v.is_floating_point())
    momentum = [s['momentum_buffer'] for s in last['optimizer']['state'].values()]
    assert momentum and all(m.dtype == torch.float32 for m in momentum)


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    from retina.core import precision
    from retina.core.runtime import Runtime
    cpu = torch.device('cpu')
    monkeypatch.setattr(precision, 'cpu_has_native_bf16', lambda: False)
    assert precision.resolve_precision('auto', cpu) == 'fp32'
    assert Runtime(cpu, precision='auto').input_dtype == torch.float32
    monkeypatch.setattr(precision, 'cpu_has_native_bf16', lambda: True)
    assert precision.resolve_precision('auto', cpu) == 'bf16'
    runtime = Runtime(cpu, precision='auto')
    assert runtime.input_dtype == torch.bfloat16
    with runtime.autocast():
        assert torch.nn.Linear(2, 1)(torch.ones(1, 2)).dtype == torch.bfloat16
    # The flag turns it off; grading without a precision keeps fp32 on the CPU.
    assert Runtime(cpu, precision='fp32').input_dtype == torch.float32
    assert Runtime(cpu).precision == 'fp32'
    assert precision.resolve_precision('auto', torch.device('cuda')) == 'bf16'


def test_a_cpu_without_bf16_trains_in_fp32_and_says_so(workdir, monkeypatch):
    from retina.core import precision
    monkeypatch.setattr(precision, 'cpu_has_native_bf16', lambda: False)
    said = []
    _train(workdir, monkeypatch, max_epochs=1, precision='auto')
    monkeypatch.chdir(workdir)
    train(config_module.load(CONFIG), device='cpu', progress=False, max_epochs=2, resume=True,
          echo=said.append)
    assert checkpoint.load(workdir / paths.resume_checkpoint(CONFIG))['precision'] == 'fp32'
    assert any(line.endswith(', fp32') for line in said), said


def test_train_nn_hold_out_keeps_the_test_patients_out_and_resume_keeps_it(workdir):
    names = [p.stem for p in (workdir / 'data' / 'train_tiny').iterdir() if p.suffix == '.jpeg']
    out = {n for n in names if held_out(n, 0.3)}
    assert out and len(out) < len(names)
    result = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '1', '--hold_out', '0.3',
                        '--precision', 'fp32', '--no_progress', cwd=workdir)
    patients = {patient_and_eye(n)[0] for n in out}
    assert f'{len(out)} image(s) of {len(patients)} patient(s) kept out' in result.stdout
    assert f'{len(names) - len(out)} training / ' not in result.stdout  # validation is split off
    line = next(l for l in result.stdout.splitlines() if 'training /' in l)
    trained, validated = (int(w) for w in re.findall(r'(\d+) (?:training|validation)', line))
    assert trained + validated == len(names) - len(out)
    state = checkpoint.load(workdir / paths.resume_checkpoint(CONFIG))
    assert state['config']['cnf']['hold_out'] == 0.3 and state['precision'] == 'fp32'
    resumed = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '2', '--resume',
                         '--precision', 'fp32', '--no_progress', cwd=workdir)
    assert 'kept out' in resumed.stdout and 'epoch    2' in resumed.stdout


@pytest.mark.slow
def test_schedule_option_replaces_the_config_s_and_on_resume_the_rest_of_the_run_s(workdir):
    def lrs():
        rows = list(csv.DictReader(open(workdir / paths.train_log(CONFIG))))
        return [float(r['lr']) for r in rows]
    run_script('train_nn.py', '--cnf', CONFIG, '--schedule', '0:0.002,1:0.0005,4:stop',
               '--max_epochs', '1', '--no_progress', cwd=workdir)
    assert lrs() == [0.002]
    saved = json.loads((workdir / 'weights' / CONFIG / 'config.json').read_text())
    assert saved['cnf']['schedule'] == {'0': 0.002, '1': 0.0005, '4': 'stop'}
    # --resume without --schedule keeps the run's (not the config module's) schedule.
    run_script('train_nn.py', '--cnf', CONFIG, '--resume', '--max_epochs', '2', '--no_progress',
               cwd=workdir)
    assert lrs() == [0.002, 0.0005]
    # A new schedule on --resume replaces the rest: epoch 3 at its rate, then it stops.
    result = run_script('train_nn.py', '--cnf', CONFIG, '--resume', '--schedule',
                        '0:0.002,2:0.0001,3:stop', '--no_progress', cwd=workdir)
    assert lrs() == [0.002, 0.0005, 0.0001] and 'the schedule is done' in result.stdout
    assert 'note: the rest of the run follows --schedule 0:0.002,2:0.0001,3:stop' in result.stdout
    assert (workdir / 'weights' / CONFIG / 'weights_final.pt').is_file()
    for bad, words in (('0:fast', "'0:fast' is not EPOCH:RATE"), ('1:0.1,2:stop', 'epoch 0'),
                       ('0:0.1', "no 'stop' entry"), ('0:0.1,5:-1,6:stop', 'entry 5')):
        failed = run_script('train_nn.py', '--cnf', CONFIG, '--schedule', bad, cwd=workdir,
                            check=False)
        assert failed.returncode != 0 and words in failed.stderr, (bad, failed.stderr)
        assert 'Traceback' not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_training_killed_between_and_during_checkpoint_writes_resumes_to_the_same_result(
        workdir, tmp_path):
    """The one resume test: a run killed (SIGKILL) as each of epochs 1, 2 and 3 is logged, while
    its checkpoints are being written, then resumed to the end, ends with the weights and the
    log of an uninterrupted run.  Every kill is checked to have landed mid-run."""
    reference = tmp_path / 'reference'
    shutil.copytree(workdir, reference)
    run_script(*TRAIN, cwd=reference)
    log = workdir / 'weights' / CONFIG / 'log.csv'

    def logged(epochs):
        return lambda: log.is_file() and len(log.read_text().splitlines()) > epochs

    for epochs in (1, 2, 3):
        resume = (workdir / 'weights' / CONFIG / 'last.pt').is_file()
        code = kill_when(start(TRAIN + (['--resume'] if resume else []), workdir),
                         logged(epochs))
        assert code == -signal.SIGKILL, f'the run ended before the kill at epoch {epochs}'
        # Epoch 1 is logged before its checkpoints are written: a kill then may leave none.
        assert_loadable(workdir / 'weights', allow_empty=epochs == 1)
    run_script(*TRAIN, '--resume', cwd=workdir)
    ours = checkpoint.load(workdir / 'weights' / CONFIG / 'last.pt')['model']
    theirs = checkpoint.load(reference / 'weights' / CONFIG / 'last.pt')['model']
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    epochs = [line.split(',')[0] for line in log.read_text().splitlines()[1:]]
    assert epochs == ['1', '2', '3', '4']


@pytest.mark.parametrize('sent, status', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_kill_ends_cleanly_and_says_how_to_resume(workdir, sent, status):
    # Long enough that the interrupt always lands mid-run, however fast the machine.
    process = start(['train_nn.py', '--cnf', CONFIG, '--max_epochs', '1000', '--no_progress'],
                    workdir)
    last = workdir / 'weights' / CONFIG / 'last.pt'
    deadline = time.time() + 120
    while not last.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if not last.is_file():  # the signal would land before the first checkpoint: no test
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f'no last.pt before the signal (exit {process.returncode}):\n{stderr[-3000:]}')
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status
    assert '--resume' in stderr and 'Traceback' not in stderr
    assert not (workdir / 'weights' / CONFIG / 'run.lock').exists(), 'the lock outlived the run'
    assert_loadable(workdir / 'weights')


def test_full_disk_during_training_leaves_no_corrupt_weights(workdir):
    # Files over 200 kB cannot be written: the weights (~1 MB) hit the limit mid-write.
    process = start(['train_nn.py', '--cnf', CONFIG, '--max_epochs', '1', '--no_progress'],
                    workdir, preexec_fn=_limit_file_size(200_000))
    stdout, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    one_line_error(result, 'file size limit')
    run = workdir / 'weights' / CONFIG
    assert not weight_files(run), 'a partial weights file was left under its final name'
    assert not list(run.glob('.*.tmp'))


def test_unconverted_or_mixed_size_images_are_refused_not_squashed(workdir, synthetic_source):
    # train_nn.py and transform.py share the image cache that refuses them
    mixed = workdir / 'data' / 'mixed'
    shutil.copytree(workdir / 'data' / 'train_tiny', mixed)
    odd = sorted(mixed.iterdir())[5]
    with Image.open(odd) as image:
        image.resize((64, 64)).save(odd)
    for folder, words in ((synthetic_source / 'train', 'is not square'),
                          (mixed, f'{odd.name}: 64×64, but the other images are 128×128')):
        result = run_script('train_nn.py', '--cnf', CONFIG, '--train_dir', folder,
                            '--max_epochs', '1', '--no_progress', cwd=workdir, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert words in result.stderr and 'Traceback' not in result.stderr
    assert not (workdir / 'weights').exists()


def _earlier_run(workdir):
    """A finished-looking earlier run of CONFIG: its files must survive any failing new run."""
    run = workdir / 'weights' / CONFIG
    run.mkdir(parents=True)
    (run / 'log.csv').write_text('epoch\n1\n')
    (run / 'last.pt').write_bytes(b'earlier weights')
    return run


def test_a_second_run_of_a_config_is_refused_while_the_first_runs(workdir):
    run = _earlier_run(workdir)
    with lock.hold(workdir / paths.run_lock(CONFIG), 'first run'):
        result = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '1',
                            '--no_progress', cwd=workdir, check=False)
    one_line_error(result, 'in use by', f'pid {os.getpid()}', 'run.lock')
    assert result.returncode == 2
    assert (run / 'last.pt').read_bytes() == b'earlier weights'
    assert not list((workdir / 'weights').glob('*.earlier-*'))


def test_a_run_failing_in_setup_or_epoch_1_leaves_the_earlier_run_in_place(workdir, monkeypatch):
    from retina.train.loop import train
    run = _earlier_run(workdir)
    result = run_script('train_nn.py', '--cnf', CONFIG, '--labels', 'data/nothing.csv',
                        '--max_epochs', '1', '--no_progress', cwd=workdir, check=False)
    one_line_error(result, 'data/nothing.csv')
    monkeypatch.chdir(workdir)
    config = config_module.load(CONFIG)
    config.cnf['schedule'] = {0: 1e12, 5: 'stop'}  # NaN in the first epoch
    with pytest.raises(UserError, match='earlier run .* is left as it was'):
        train(config, device='cpu', progress=False, echo=lambda *a, **k: None, max_epochs=1)
    assert sorted(p.name for p in run.iterdir()) == ['last.pt', 'log.csv']
    assert (run / 'last.pt').read_bytes() == b'earlier weights'
    assert not list((workdir / 'weights').glob('*.earlier-*'))


def test_a_log_with_a_byte_order_mark_reads_and_a_foreign_one_is_named(tmp_path):
    from retina.train.runs import read_log
    log = tmp_path / 'log.csv'
    log.write_text('\ufeffepoch,train_loss\n1,0.5\n2,0.4\n', encoding='utf-8')
    assert [row['epoch'] for row in read_log(log)] == ['1', '2']
    log.write_text('when,loss\nmonday,0.5\n')
    with pytest.raises(UserError, match='log.csv: not a training log'):
        read_log(log)


@pytest.mark.slow
def test_resume_keeps_the_runs_folders_and_refuses_a_changed_config(workdir):
    """Also: checkpoints record the look of the folder they were trained on."""
    labels = workdir / 'data' / 'trainLabels.csv'
    other = workdir / 'other'
    convert_folder(workdir / 'data' / 'train_tiny', other / 'images', 128, 'png', n_proc=1,
                   progress=False, preprocessing='local_contrast')
    shutil.copy(labels, other / 'labels.csv')
    labels.write_text('image,level\n')  # the config's own labels: useless, must not be read
    run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '1', '--no_progress',
               '--train_dir', other / 'images', '--labels', other / 'labels.csv', cwd=workdir)
    resumed = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '2', '--no_progress',
                         '--resume', cwd=workdir)
    assert 'epoch    2' in resumed.stdout and str(other / 'images') in resumed.stdout
    saved = json.loads((workdir / 'weights' / CONFIG / 'config.json').read_text())
    assert saved['cnf']['train_dir'] == str(other / 'images')
    # the checkpoints record the training folder's look, for transform/ram/predict to check
    assert checkpoint.load(workdir / 'weights' / CONFIG / 'last.pt')['preprocessing'] == \
        'local_contrast'
    # and how its images are stored (png: lossless), for predict.py to repeat
    assert checkpoint.load(workdir / 'weights' / CONFIG / 'last.pt')['encoding'] == 'none'

    elsewhere = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '3', '--no_progress',
                           '--resume', '--train_dir', workdir / 'data' / 'train_tiny',
                           cwd=workdir, check=False)
    assert elsewhere.returncode == 2 and 'Traceback' not in elsewhere.stderr
    assert 'train_dir' in elsewhere.stderr and 'started with other settings' in elsewhere.stderr

    (workdir / 'configs').mkdir()
    (workdir / 'configs' / f'{CONFIG}.py').write_text(
        f'from configs.{CONFIG} import cnf as base, layers\n'
        f'cnf = dict(base, sigma=0.1, batch_size_train=64)\n')
    edited = run_script('train_nn.py', '--cnf', f'configs/{CONFIG}.py', '--max_epochs', '3',
                        '--no_progress', '--resume', cwd=workdir, check=False)
    assert edited.returncode == 2 and 'Traceback' not in edited.stderr
    assert 'batch_size_train 128 -> 64' in edited.stderr and 'sigma 0.5 -> 0.1' in edited.stderr


def test_images_larger_than_the_config_expects_are_refused(workdir):
    big = workdir / 'data' / 'big'
    big.mkdir()
    for photo in sorted((workdir / 'data' / 'train_tiny').glob('*.jpeg')):
        Image.open(photo).resize((256, 256)).save(big / photo.name)
    result = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '1', '--no_progress',
                        '--train_dir', big, cwd=workdir, check=False)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'images are 256 px but c_128_5x5_32_ram expects 128 px' in result.stderr
    assert 'convert.py --crop_size 128' in result.stderr
