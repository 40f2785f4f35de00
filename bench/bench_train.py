#!/usr/bin/env python
"""Training and feature-extraction throughput per config, against the bare model step.

    python bench/bench_train.py [--configs c_128_5x5_32_ram,...] [--steps 3] [--rounds 5]

For each config, on the same device and interleaved round by round (bare,
train, features, then features, train, bare, ...: see report.interleaved), so
that a shared machine's load falls on all three alike:
- train: `retina.train.loop.train_one_epoch` over a uint8 image cache (gather,
  transfer, augmentation written straight in the network's dtype and layout,
  forward, backward, Nesterov step): the real input pipeline;
- bare: forward + backward + step on a random input already on the device, in
  the same dtype and layout, same batch size and input size;
- features: `transform.py`'s inner loop (centred window, feature layer),
  images/s at the feature batch size.
Each figure is the median over the rounds; the overhead is 1 − train/bare,
the median of the per-round ratios.  As in training, the net is compiled on a
GPU and not on the CPU unless --compile/--no_compile says otherwise.  Prints a
markdown table and writes it to BENCHMARKS.md under a section named after the
device (CPU, or the GPU model).
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

from report import (device_name, interleaved, medians, paired_ratio,  # noqa: E402
                    replace_section, today)
from retina.core.options import PRECISION_AUTO_TRAINING, precision_help  # noqa: E402
from retina.core.precision import PRECISIONS  # noqa: E402
from retina.core.runtime import (CUDA_GRAPHS, Runtime, batches, compile_or_eager,  # noqa: E402
                                 new_step, place_images, resolve_device)
from retina.model import config as config_module  # noqa: E402
from retina.model import scoring  # noqa: E402
from retina.model.augment import prepare_batch  # noqa: E402
from retina.model.checkpoint import InputSpec  # noqa: E402
from retina.train.loop import make_optimizer, train_one_epoch  # noqa: E402

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


def images_per_second(run, count, device):
    """A function timing `run()` (which handles `count` images) in images/s."""
    def timed():
        synchronise(device)
        start = time.perf_counter()
        run()
        synchronise(device)
        return count / (time.perf_counter() - start)
    return timed


def bare_run(model, optimizer, config, batch_size, steps, runtime, cuda_graphs=False):
    """`steps` forward + backward + optimizer steps on one random input already in place."""
    device = runtime.device
    x = torch.randn(batch_size, 3, *config.input_size, device=device).to(
        dtype=runtime.input_dtype, memory_format=torch.channels_last)
    y = torch.rand(batch_size, device=device) * 4

    def step():
        new_step(cuda_graphs)
        with runtime.autocast():
            out = model(x)
        loss = F.mse_loss(out.float().squeeze(1), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def run():
        model.train()
        for _ in range(steps):
            step()
    return run


def pipeline_run(model, optimizer, config, images, batch_size, steps, runtime, prepare,
                 cuda_graphs=False):
    """`steps` batches of train_one_epoch, from the cache to the optimizer step."""
    levels = np.random.default_rng(0).integers(0, 5, len(images))
    generator = torch.Generator(device=runtime.device).manual_seed(0)
    rng = np.random.default_rng(1)

    def run():
        indices = rng.integers(0, len(images), batch_size * steps)
        train_one_epoch(model, optimizer, images, levels, indices, config, runtime, generator,
                        progress=False, prepare=prepare, batch_size=batch_size,
                        cuda_graphs=cuda_graphs)
    return run


def feature_run(model, config, images, batch_size, steps, runtime, cuda_graphs=False):
    """`steps` batches of the feature extraction's loop (centred window, feature layer)."""
    order = np.arange(batch_size * steps) % len(images)
    spec = InputSpec.of_config(config)

    @torch.no_grad()
    def run():
        model.eval()
        for batch, _ in batches(images, order, batch_size, runtime.device):
            new_step(cuda_graphs)
            scoring.score(model, batch, spec, precision=runtime.precision,
                          memory_format=torch.channels_last, features=True)
    return run


def measure(name, batch_size, test_batch_size, steps, rounds, runtime, compile_model,
            cuda_graphs=False, cache='device'):
    """One config's row: medians of train, bare and feature images/s, the overhead, memory."""
    device = runtime.device
    config = config_module.load(name)
    batch = batch_size or config.cnf['batch_size_train']
    test_batch = test_batch_size or runtime.eval_batch_size(config.cnf)
    size = FOLDER_SIZE.get(config.cnf['w'], config.cnf['w'])
    count = min(MAX_IMAGES, max(batch * steps, test_batch * steps))
    if device.type == 'cuda' and cache == 'device':  # the cache train_nn.py keeps on a GPU
        images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8,
                               device=device, generator=torch.Generator(device).manual_seed(0))
    else:
        images = np.random.default_rng(0).integers(0, 256, (count, 3, size, size),
                                                   dtype=np.uint8)
        images = place_images(images, runtime, 'no' if cache == 'host' else 'auto')
    torch.manual_seed(0)
    model = config.build_net().to(device).to(memory_format=torch.channels_last)
    net, prepare = model, prepare_batch
    if compile_model:  # as train.wrap and the feature extraction do
        mode = CUDA_GRAPHS if cuda_graphs else None
        net = compile_or_eager(model, click.echo, mode=mode)
        prepare = compile_or_eager(prepare_batch, click.echo, quiet=True, mode=mode)
    optimizer = make_optimizer(model, config.cnf, 1e-4)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    runs = {
        'bare': bare_run(net, optimizer, config, batch, steps, runtime, cuda_graphs),
        'train': pipeline_run(net, optimizer, config, images, batch, steps, runtime, prepare,
                              cuda_graphs),
        'features': feature_run(net, config, images, test_batch, steps, runtime, cuda_graphs),
    }
    counts = dict(bare=batch * steps, train=batch * steps, features=test_batch * steps)
    for key in ('bare', 'train'):  # warm-up: compilation, cuDNN's autotuning, allocations
        for _ in range(max(1, WARMUP // steps)):
            runs[key]()
    runs['features']()
    rates = interleaved({key: images_per_second(run, counts[key], device)
                         for key, run in runs.items()}, rounds)
    median = medians(rates)
    overhead = 1 - paired_ratio(rates['train'], rates['bare'])
    return dict(name=name, batch=batch, test_batch=test_batch, overhead=overhead,
                peak=peak_memory_gib(device), **median)


@click.command()
@click.option('--configs', default=','.join(ALL), show_default=True,
              help='Comma-separated config names.')
@click.option('--steps', default=3, show_default=True, type=click.IntRange(min=1),
              help='Timed batches per measurement (after WARMUP=3 untimed steps).')
@click.option('--rounds', default=5, show_default=True, type=click.IntRange(min=1),
              help='Interleaved rounds (bare, train, features each once per round); medians.')
@click.option('--device', default='auto', show_default=True, help='auto, cpu, cuda or cuda:N.')
@click.option('--batch_size', type=click.IntRange(min=1),
              help="Batch size for every config [default: the config's batch_size_train].")
@click.option('--test_batch_size', type=click.IntRange(min=1),
              help="Batch size for features [default: as transform.py: the config's "
                   'batch_size_test, at least 512 on a GPU].')
@click.option('--compile/--no_compile', 'compile_model', default=None,
              help='torch.compile the model and the augmentation [default: on a GPU yes, on the '
                   'CPU no, as train_nn.py].')
@click.option('--cuda_graphs', is_flag=True,
              help='Compile with CUDA graphs (train_nn.py --cuda_graphs; a CUDA GPU only).')
@click.option('--cache', type=click.Choice(['device', 'host']), default='device',
              show_default=True,
              help='Where the uint8 cache is on a GPU: device (train_nn.py when it fits) or host '
                   '(a cache too large for the GPU: pinned gather and copy on a side stream).')
@click.option('--precision', type=click.Choice(PRECISIONS), default='auto', show_default=True,
              help='As train_nn.py --precision: ' + precision_help(PRECISION_AUTO_TRAINING))
@click.option('--write/--no_write', default=True, show_default=True,
              help='Write the table to BENCHMARKS.md.')
@click.option('--section', default='', metavar='TEXT',
              help='Words added to the BENCHMARKS.md section title, so that runs with other '
                   'settings (batch size, --compile) keep their own table.')
def main(configs, steps, rounds, device, batch_size, test_batch_size, compile_model,
         cuda_graphs, cache, precision, write, section):
    """Print training/bare/feature images/s per config and write them to BENCHMARKS.md."""
    device = resolve_device(device)
    runtime = Runtime(device, precision=precision)
    compile_model = device.type == 'cuda' if compile_model is None else compile_model
    if cuda_graphs and not (device.type == 'cuda' and compile_model):
        raise click.UsageError('--cuda_graphs needs a CUDA device and compiling')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    for name in configs.split(','):
        row = measure(name, batch_size, test_batch_size, steps, rounds, runtime, compile_model,
                      cuda_graphs, cache)
        rows.append(row)
        click.echo(f'{name}: train {row["train"]:.1f} img/s, bare {row["bare"]:.1f} img/s, '
                   f'overhead {100 * row["overhead"]:.1f}%, features {row["features"]:.1f} img/s')
    table = ['| config | batch | train img/s (pipeline) | bare step img/s | overhead | '
             'feature batch | features img/s | peak memory GiB |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for row in rows:
        table.append(f'| {row["name"]} | {row["batch"]} | {row["train"]:.1f} | {row["bare"]:.1f} '
                     f'| {100 * row["overhead"]:.1f}% | {row["test_batch"]} | '
                     f'{row["features"]:.1f} | {row["peak"]:.1f} |')
    command = ('python bench/bench_train.py ' + ' '.join(sys.argv[1:])).strip()
    body = (f'Device: {device_name(device)}; torch {torch.__version__}; '
            f'{"compiled" if compile_model else "eager"}'
            f'{" with CUDA graphs" if cuda_graphs else ""}, {runtime.precision}; uint8 cache on the '
            f'{"host" if cache == "host" or device.type != "cuda" else "device"}; {today()}.\n'
            f'Command: `{command}`.\n\n' + '\n'.join(table) +
            f'\n\nInterleaved in one run ({rounds} rounds of {steps} batches each; medians): '
            'the overhead is the share of the bare model step that the input pipeline '
            '(gather, transfer, augmentation) adds, the median of the per-round ratios.  Peak '
            'memory: ' + ('torch.cuda.max_memory_allocated over the run so far.'
                          if device.type == 'cuda'
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
