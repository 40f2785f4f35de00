"""The CUDA path against the CPU path: skipped on machines without a GPU.

Run on a GPU machine with `python -m pytest -q tests/test_gpu.py`.  Each test
computes the same thing on both devices and compares, so a wrong kernel,
layout or dtype on the GPU path fails here rather than in a week-long run.
"""
import csv

import numpy as np
import pytest
import torch

from conftest import as_loaded, noise_images, run_script
from retina.core.runtime import Runtime, place_images
from retina.data.cache import load_images
from retina.data.labels import labelled_images
from retina.features.files import load_features
from retina.heatmaps.methods import regression_activation_map
from retina.model import config as config_module
from retina.model.augment import KAGGLE, prepare_batch, random_params
from retina.train.loop import make_optimizer, train_one_epoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

CONFIG = 'c_128_5x5_32_ram'
CUDA = torch.device('cuda')


def relative_error(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def test_augmentation_on_the_gpu_matches_the_cpu():
    config = config_module.load(CONFIG)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 128, 128), dtype=torch.uint8, generator=generator)
    params = random_params(16, config.cnf['aug_params'], config.cnf['sigma'], generator)
    on_cpu = prepare_batch(images, config.input_size, params, constants=KAGGLE)
    on_gpu = prepare_batch(images.to(CUDA), config.input_size,
                           {k: v.to(CUDA) for k, v in params.items()}, constants=KAGGLE)
    assert on_gpu.device.type == 'cuda' and on_gpu.dtype == torch.float32
    assert relative_error(on_gpu, on_cpu) < 1e-4
    # What training asks for on the GPU: bf16 channels_last written directly.
    direct = prepare_batch(images.to(CUDA), config.input_size,
                           {k: v.to(CUDA) for k, v in params.items()},
                           dtype=Runtime(CUDA).input_dtype, memory_format=torch.channels_last,
                           constants=KAGGLE)
    assert direct.dtype == torch.bfloat16
    assert direct.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(direct.float(), on_cpu) < 1e-2


@pytest.mark.parametrize('name', ['c_128_5x5_32', 'c_128_4x4_32_ram', 'c_512_5x5_32_ram'])
def test_bf16_channels_last_forward_matches_float32_on_the_cpu(name):
    config = config_module.load(name)
    torch.manual_seed(0)
    net = config.build_net().eval()
    x = torch.randn(4, 3, *config.input_size)
    with torch.no_grad():
        reference, ref_features = net(x, return_features=True)
        gpu_net = net.to(CUDA).to(memory_format=torch.channels_last)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out, features = gpu_net(x.to(CUDA).contiguous(memory_format=torch.channels_last),
                                    return_features=True)
    assert torch.isfinite(out).all()
    assert relative_error(features.float(), ref_features) < 2e-2
    assert relative_error(out.float(), reference) < 5e-2


def test_untied_bias_keeps_bf16_activations_under_autocast():
    config = config_module.load(CONFIG)
    net = config.build_net().to(CUDA)
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        y = net.conv1(torch.randn(2, 3, *config.input_size, device=CUDA))
    assert y.dtype == torch.bfloat16


def test_training_on_the_gpu_lowers_the_loss_with_a_device_cache(converted_workdir):
    config = config_module.load(CONFIG)
    config.cnf['batch_size_train'] = 16
    runtime = Runtime(CUDA)
    image_paths, levels = labelled_images(converted_workdir / 'data' / 'train_tiny',
                                               converted_workdir / 'data' / 'trainLabels.csv')
    images = np.array(load_images(image_paths, 128, cache_dir=converted_workdir / 'cache',
                                  progress=False))
    cached = place_images(images, runtime, 'yes')
    assert isinstance(cached, torch.Tensor) and cached.device.type == 'cuda'
    torch.manual_seed(0)
    model = config.build_net().to(CUDA).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config.cnf, 3e-3)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    losses = [train_one_epoch(model, optimizer, cached, levels, np.arange(len(levels)), config, runtime,
                              generator, progress=False)['train_loss'] for _ in range(8)]
    assert all(np.isfinite(losses))
    assert min(losses[-3:]) < losses[0]


def test_ram_on_the_gpu_mean_equals_prediction():
    config = config_module.load(CONFIG)
    torch.manual_seed(0)
    net = config.build_net().to(CUDA).eval()
    x = torch.randn(3, 3, *config.input_size, device=CUDA)
    maps, predictions = regression_activation_map(net, x, include_bias=True)
    assert maps.device.type == 'cuda'
    assert torch.allclose(maps.mean(dim=(1, 2)), predictions, atol=1e-3, rtol=1e-4)


def test_scripts_on_cuda_match_the_cpu(workdir):
    """train_nn.py on the GPU (compiled: the default there), then transform.py on both devices
    with the same weights."""
    result = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '2', '--device', 'cuda',
                        '--no_progress', cwd=workdir)
    assert 'device cuda' in result.stdout and 'compiled' in result.stdout
    with open(workdir / 'weights' / CONFIG / 'log.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(np.isfinite(float(r['train_loss'])) for r in rows)
    weights = workdir / 'weights' / CONFIG / 'last.pt'
    features = {}
    for device in ('cuda', 'cpu'):
        run_script('transform.py', '--cnf', CONFIG, '--train', '--n_iter', '2', '--device',
                   device, '--weights_from', weights, '--no_progress', cwd=workdir)
        folder = workdir / 'data' / 'features'
        path = folder / f'{CONFIG}_train_mean_iter_2_skip_0.npy'
        features[device] = load_features(path)
        folder.rename(workdir / f'features_{device}')  # the next run starts afresh
    (gpu, gpu_names), (cpu, cpu_names) = features['cuda'], features['cpu']
    assert gpu_names == cpu_names and gpu.shape == cpu.shape
    assert relative_error(torch.from_numpy(gpu), torch.from_numpy(cpu)) < 3e-2


def test_training_step_never_waits_for_the_gpu():
    """Gather, augmentation, forward and backward queue work without a host sync.

    A sync inside the step (a host-to-device copy of a constant, an .item())
    makes the host wait for the queue to drain, so the step's launch time adds
    to its GPU time: the input-pipeline overhead the benchmark shows.
    """
    config = config_module.load(CONFIG)
    torch.manual_seed(0)
    model = config.build_net().to(CUDA).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (32, 3, 128, 128), dtype=torch.uint8, device=CUDA)
    index = torch.randperm(32, device=CUDA)[:16]
    generator = torch.Generator(device=CUDA).manual_seed(0)
    target = torch.rand(16, device=CUDA)

    def step():
        params = random_params(16, config.cnf['aug_params'], config.cnf['sigma'], generator,
                               CUDA)
        x = prepare_batch(images[index], config.input_size, params, dtype=torch.bfloat16,
                          memory_format=torch.channels_last, constants=KAGGLE)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = model(x)
        torch.nn.functional.mse_loss(out.float().squeeze(1), target).backward()

    step()  # first call: constants copied to the device once, cuDNN plans chosen
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    torch.cuda.synchronize()


def test_checkpoint_snapshot_of_a_gpu_net_is_written_in_the_background(tmp_path):
    from retina.model import checkpoint
    config = config_module.load(CONFIG)
    net = config.build_net().to(CUDA)
    optimizer = make_optimizer(net, config.cnf, 1e-3)
    net(torch.randn(2, 3, *config.input_size, device=CUDA)).sum().backward()
    optimizer.step()
    state = checkpoint.snapshot(net, config, 1, optimizer)
    assert all(v.device.type == 'cpu' for v in state['model'].values())
    writer = checkpoint.BackgroundWriter()
    writer.write([(tmp_path / 'last.pt', state)])
    with torch.no_grad():  # the next epoch goes on while the file is written
        next(net.parameters()).add_(1)
    writer.wait()
    loaded = checkpoint.load(tmp_path / 'last.pt')
    for name, value in loaded['model'].items():
        assert torch.equal(value, state['model'][name]), name


def test_tta_from_a_host_cache_matches_the_device_cache(tmp_path, monkeypatch):
    """The 42-GB test set stays on the host: its batches cross once per block of iterations,
    compiled (the GPU default), and give the features of the device-resident cache."""
    from retina.core import runtime
    from retina.features.extract import extract_features
    config = config_module.load(CONFIG)
    folder = tmp_path / 'images'
    noise_images(folder, 6)
    torch.manual_seed(0)
    net = config.build_net().eval()
    means = {}
    place = runtime.place_images
    for where in ('yes', 'no'):  # cache_on_device: on the GPU, then on the host
        monkeypatch.setattr(runtime, 'place_images',
                            lambda images, rt, _, where=where: place(images, rt, where))
        (tmp_path / where).mkdir()
        monkeypatch.chdir(tmp_path / where)  # each run writes its own data/features
        made = extract_features(config, as_loaded(config, net), folder, 'test', n_iter=6,
                                device='cuda',
                                batch_size=4, progress=False, echo=lambda *a: None)
        means[where] = torch.from_numpy(load_features(made['mean'])[0])
    assert relative_error(means['no'], means['yes']) < 1e-3


def test_host_cache_batches_reach_the_gpu_whole_and_in_order(tmp_path):
    """The pinned, prefetched path: every batch equals its rows of the host cache, a consumer
    that stops early stops the producer, and an error in the producer reaches the consumer."""
    import threading

    from retina.core import runtime as runtime_module
    from retina.core.runtime import batches
    cache = np.lib.format.open_memmap(tmp_path / 'cache.npy', mode='w+', dtype=np.uint8,
                                      shape=(40, 3, 16, 16))
    cache[:] = np.random.default_rng(0).integers(0, 256, cache.shape, dtype=np.uint8)
    cache.flush()
    host = np.load(tmp_path / 'cache.npy', mmap_mode='r')
    indices = np.random.default_rng(1).permutation(40)[:37]
    seen = []
    for batch, chunk in batches(host, indices, 6, CUDA):
        assert batch.device.type == 'cuda' and chunk.device.type == 'cuda'
        batch = batch.float() + 0  # work on the consumer's stream, as training does
        np.testing.assert_array_equal(batch.cpu().numpy(), host[chunk.cpu().numpy()])
        seen += chunk.tolist()
    assert sorted(seen) == sorted(indices.tolist())

    for _ in batches(host, indices, 6, CUDA):
        break
    assert not any(t.name == 'host-batches' for t in threading.enumerate())  # it has ended

    # The copies wait behind a long kernel on their side stream: a consumer that did not wait
    # for their event (or a buffer refilled too soon) would read unfinished batches.
    original = runtime_module.gather

    def slow(*args, **kwargs):
        torch.cuda._sleep(20_000_000)
        return original(*args, **kwargs)
    runtime_module.gather = slow
    try:
        for batch, chunk in batches(host, indices, 6, CUDA):
            np.testing.assert_array_equal((batch.float() + 0).cpu().numpy(),
                                          host[chunk.cpu().numpy()])
    finally:
        runtime_module.gather = original

    def broken(*args, **kwargs):
        raise OSError('disk gone')
    runtime_module.gather = broken
    try:
        with pytest.raises(OSError, match='disk gone'):
            list(batches(host, indices, 6, CUDA))
    finally:
        runtime_module.gather = original


def test_cuda_graphs_train_like_the_compiled_net(converted_workdir):
    """train_one_epoch with CUDA graphs (compiled, mode reduce-overhead) against the same
    epochs compiled without them: same seeds, losses and validation predictions alike."""
    from retina.core.runtime import CUDA_GRAPHS, compile_or_eager
    from retina.model.checkpoint import InputSpec
    from retina.model.inference import predict
    config = config_module.load(CONFIG)
    config.cnf['batch_size_train'] = 16
    runtime = Runtime(CUDA)
    image_paths, levels = labelled_images(converted_workdir / 'data' / 'train_tiny',
                                               converted_workdir / 'data' / 'trainLabels.csv')
    images = place_images(np.array(load_images(image_paths, 128, cache_dir=converted_workdir /
                                               'cache', progress=False)), runtime, 'yes')
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    from retina.model import augment
    results = {}
    for mode in (None, CUDA_GRAPHS):
        augment._CONSTANTS.clear()  # each run places its own constants, as a new process does
        torch._dynamo.reset()  # and compiles afresh
        skips = counters['inductor']['cudagraph_skips']
        torch.manual_seed(0)
        model = config.build_net().to(CUDA).to(memory_format=torch.channels_last)
        net = compile_or_eager(model, print, mode=mode)
        prepare = compile_or_eager(prepare_batch, print, quiet=True, mode=mode)
        optimizer = make_optimizer(model, config.cnf, 3e-3)
        generator = torch.Generator(device=CUDA).manual_seed(0)
        losses = [train_one_epoch(net, optimizer, images, levels, np.arange(len(levels)),
                                  config, runtime, generator, progress=False, prepare=prepare,
                                  drop_last=True, cuda_graphs=bool(mode))['train_loss']
                  for _ in range(4)]
        predictions = predict(net, images, np.arange(len(levels)), InputSpec.of_config(config),
                              runtime, batch_size=8, cuda_graphs=bool(mode))
        results[mode] = np.array(losses), predictions
        if mode:  # the graphs were recorded and none of the compiled code skipped them
            manager = cudagraph_trees.get_manager(torch.cuda.current_device(), False)
            assert manager is not None and any(manager.roots.values())
            assert counters['inductor']['cudagraph_skips'] == skips
    (plain_losses, plain), (graph_losses, graphs) = results[None], results[CUDA_GRAPHS]
    assert np.all(np.isfinite(graph_losses)) and np.all(np.isfinite(graphs))
    np.testing.assert_allclose(graph_losses, plain_losses, rtol=0.05, atol=0.02)
    np.testing.assert_allclose(graphs, plain, rtol=0.1, atol=0.05)


def test_train_nn_with_cuda_graphs(workdir):
    result = run_script('train_nn.py', '--cnf', CONFIG, '--max_epochs', '2', '--device', 'cuda',
                        '--cuda_graphs', '--no_progress', cwd=workdir)
    assert 'with CUDA graphs' in result.stdout
    with open(workdir / 'weights' / CONFIG / 'log.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert all(np.isfinite(float(r[k])) for r in rows for k in ('train_loss', 'valid_loss'))
