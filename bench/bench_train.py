#!/usr/bin/env python
"""Training and feature-extraction throughput per config, against the bare model step.

    python bench/bench_train.py [--configs c_128_5x5_32_ram,...] [--steps 3] [--device auto]

For each config, measured side by side in one run on the same device:
- train: `retina.train.train_one_epoch` over a uint8 image cache (gather,
  transfer, on-device augmentation, standardisation, forward, backward,
  Nesterov step): the real input pipeline;
- bare: forward + backward + step on random tensors already on the device,
  same batch size and input size;
- features: `transform.py`'s inner loop (centred window, feature layer),
  images/s at the test batch size.
The overhead column is 1 − train/bare.  Prints a markdown table and writes
it to BENCHMARKS.md under a section named after the device (CPU, or the GPU model).
"""
import resource
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from report import device_name, replace_section, today  # noqa: E402
from retina import config as config_module  # noqa: E402
from retina.augment import prepare_batch  # noqa: E402
from retina.runtime import Runtime, batches, place_images, resolve_device  # noqa: E402
from retina.train import make_optimizer, train_one_epoch  # noqa: E402

ALL = [f'c_{r}_{k}_32{v}' for r in (128, 256, 512) for k in ('5x5', '4x4') for v in ('', '_ram')]
FOLDER_SIZE = {112: 128, 224: 256, 448: 512}
WARMUP = 3  # untimed steps first: torch.compile may compile again on the second call
MAX_IMAGES = 2048  # the cache the batches are drawn from (indices wrap): 1.6 GB at 512 px


def peak_memory_gib(device):
    """Peak GPU memory allocated by torch, or the process's peak resident size on the CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def synchronise(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def bare_rate(model, optimizer, config, batch_size, steps, device):
    x = torch.randn(batch_size, 3, *config.input_size, device=device)
    if device.type == 'cuda':
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.rand(batch_size, device=device) * 4
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda'):
            out = model(x)
        loss = F.mse_loss(out.float().squeeze(1), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(WARMUP):
        step()
    synchronise(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronise(device)
    return batch_size * steps / (time.perf_counter() - start)


def pipeline_rate(model, optimizer, config, images, batch_size, steps, runtime,
                  prepare=prepare_batch):
    levels = np.random.default_rng(0).integers(0, 5, len(images))
    generator = torch.Generator(device=runtime.device).manual_seed(0)
    config.cnf['batch_size_train'] = batch_size
    warm = np.arange(batch_size * WARMUP) % len(images)
    train_one_epoch(model, optimizer, images, levels, warm, config, runtime, generator,
                    progress=False, prepare=prepare)
    indices = np.random.default_rng(1).integers(0, len(images), batch_size * steps)
    synchronise(runtime.device)
    start = time.perf_counter()
    train_one_epoch(model, optimizer, images, levels, indices, config, runtime, generator,
                    progress=False, prepare=prepare)
    synchronise(runtime.device)
    return len(indices) / (time.perf_counter() - start)


@torch.no_grad()
def feature_rate(model, config, images, batch_size, steps, device):
    model.eval()
    order = np.arange(batch_size * steps) % len(images)

    def run():
        for batch, _ in batches(images, order, batch_size, device):
            x = prepare_batch(batch, config.input_size)
            if device.type == 'cuda':
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda'):
                model(x, return_features=True)

    run()  # warm-up: a whole untimed pass over the same batches
    synchronise(device)
    start = time.perf_counter()
    run()
    synchronise(device)
    return len(order) / (time.perf_counter() - start)


@click.command()
@click.option('--configs', default=','.join(ALL), show_default=True,
              help='Comma-separated config names.')
@click.option('--steps', default=3, show_default=True, type=click.IntRange(min=1),
              help='Timed training steps per measurement (after WARMUP=3 untimed steps).')
@click.option('--device', default='auto', show_default=True, help='auto, cpu, cuda or cuda:N.')
@click.option('--batch_size', type=click.IntRange(min=1),
              help="Batch size for every config [default: the config's batch_size_train].")
@click.option('--test_batch_size', type=click.IntRange(min=1),
              help="Batch size for features [default: the config's batch_size_test].")
@click.option('--compile', 'compile_model', is_flag=True,
              help='torch.compile the model and the augmentation.')
@click.option('--write/--no_write', default=True, show_default=True,
              help='Write the table to BENCHMARKS.md.')
@click.option('--section', default='', metavar='TEXT',
              help='Words added to the BENCHMARKS.md section title, so that runs with other '
                   'settings (batch size, --compile) keep their own table.')
def main(configs, steps, device, batch_size, test_batch_size, compile_model, write, section):
    """Print training/bare/feature images/s per config and write them to BENCHMARKS.md."""
    device = resolve_device(device)
    runtime = Runtime(device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    for name in configs.split(','):
        config = config_module.load(name)
        batch = batch_size or config.cnf['batch_size_train']
        test_batch = test_batch_size or config.cnf['batch_size_test']
        size = FOLDER_SIZE.get(config.cnf['w'], config.cnf['w'])
        count = min(MAX_IMAGES, max(batch * steps, test_batch * steps))
        if device.type == 'cuda':  # the device-resident uint8 cache that train_nn.py uses
            images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8,
                                   device=device, generator=torch.Generator(device).manual_seed(0))
        else:
            images = np.random.default_rng(0).integers(0, 256, (count, 3, size, size),
                                                       dtype=np.uint8)
            images = place_images(images, runtime, 'auto')
        torch.manual_seed(0)
        model = config.build_net().to(device)
        if device.type == 'cuda':
            model = model.to(memory_format=torch.channels_last)
        net = torch.compile(model) if compile_model else model
        prepare = torch.compile(prepare_batch) if compile_model else prepare_batch
        optimizer = make_optimizer(model, config.cnf, 1e-4)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        bare = bare_rate(net, optimizer, config, batch, steps, device)
        train = pipeline_rate(net, optimizer, config, images, batch, steps, runtime, prepare)
        features = feature_rate(net, config, images, test_batch, steps, device)
        peak = peak_memory_gib(device)
        rows.append((name, batch, train, bare, 1 - train / bare, test_batch, features, peak))
        click.echo(f'{name}: train {train:.1f} img/s, bare {bare:.1f} img/s, '
                   f'overhead {100 * (1 - train / bare):.1f}%, features {features:.1f} img/s')
    table = ['| config | batch | train img/s (pipeline) | bare step img/s | overhead | '
             'feature batch | features img/s | peak memory GiB |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for name, batch, train, bare, overhead, test_batch, features, peak in rows:
        table.append(f'| {name} | {batch} | {train:.1f} | {bare:.1f} | {100 * overhead:.1f}% | '
                     f'{test_batch} | {features:.1f} | {peak:.1f} |')
    command = ('python bench/bench_train.py ' + ' '.join(sys.argv[1:])).strip()
    body = (f'Device: {device_name(device)}; torch {torch.__version__}; {today()}.\n'
            f'Command: `{command}`.\n\n' + '\n'.join(table) +
            '\n\nSide by side in one run: the overhead is the share of the bare model step '
            'that the input pipeline (gather, transfer, augmentation) adds.  Peak memory: '
            + ('torch.cuda.max_memory_allocated over the run so far.' if device.type == 'cuda'
               else 'the process\'s peak resident size so far (ru_maxrss).'))
    click.echo('\n'.join(table))
    if write:
        kind = 'CPU'
        if device.type == 'cuda':  # e.g. 'GPU H100': each GPU model keeps its own tables
            kind = 'GPU ' + torch.cuda.get_device_name(device).replace('NVIDIA ', '').split()[0]
        title = f'Training and feature extraction ({kind}{", " + section if section else ""})'
        replace_section(title, body)


if __name__ == '__main__':
    main()
