#!/usr/bin/env python
"""Batches from a host image cache: the earlier gather against `retina.core.runtime.batches`.

    python bench/bench_gather.py [--device auto] [--rounds 7]

A cache too large for the GPU (the 512-px Kaggle test set is 42 GB) stays on
the host as a memory map, and every batch is gathered from it.  Compared,
interleaved round by round (report.interleaved), on a memory-mapped cache
that the page cache holds:
- before: numpy fancy indexing, a contiguous copy and, for a GPU, a second
  copy into pinned memory (`pin_memory()`), then the transfer, one batch
  ahead in a thread (the code before issue 14's second round, kept here);
- now: `batches` — one index_select over ATen's threads straight into a
  pinned buffer, two batches ahead, copied on a side stream.
Images/s until the last batch is on the device, medians, and their ratio.
"""
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from report import (device_name, interleaved, medians, paired_ratio,  # noqa: E402
                    replace_section, today)
from retina.core.runtime import batches, resolve_device  # noqa: E402

CASES = [(512, 32, 'training, 512 px'), (512, 512, 'features, 512 px'),
         (128, 128, 'training, 128 px')]


def batches_before(images, indices, batch_size, device):
    """The host-cache path before this round: fancy indexing, then pin_memory() and the copy."""
    def to_device(chunk):
        tensors = (torch.from_numpy(np.ascontiguousarray(images[chunk])), torch.from_numpy(chunk))
        if device.type == 'cuda':
            return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
        return tensors

    chunks = [np.sort(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    if device.type != 'cuda':
        for chunk in chunks:
            yield to_device(chunk)
        return
    ready = queue.Queue(maxsize=3)
    threading.Thread(target=_produce, args=(ready, chunks, to_device), daemon=True).start()
    while (item := ready.get()) is not None:
        yield item


def _produce(ready, chunks, to_device):
    for chunk in chunks:
        ready.put(to_device(chunk))
    ready.put(None)


def rate(stream, images, batch_size, n_batches, device, rng):
    """A function: images/s of `stream` over n_batches random batches, until all are on the
    device (each batch is touched on the device, as the augmentation would)."""
    def timed():
        indices = rng.integers(0, len(images), batch_size * n_batches)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for batch, _ in stream(images, indices, batch_size, device):
            batch[:, 0, 0, 0].float().sum()  # read on the device, as the augmentation would
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return len(indices) / (time.perf_counter() - start)
    return timed


@click.command()
@click.option('--device', default='auto', show_default=True, help='auto, cpu, cuda or cuda:N.')
@click.option('--rounds', default=7, show_default=True, type=click.IntRange(min=1),
              help='Interleaved rounds (before, now, now, before, ...); medians.')
@click.option('--batches', 'n_batches', default=8, show_default=True,
              type=click.IntRange(min=1), help='Batches per measurement.')
@click.option('--write/--no_write', default=True, show_default=True,
              help='Write the table to BENCHMARKS.md.')
def main(device, rounds, n_batches, write):
    """Print images/s of the two host-cache paths per case and write them to BENCHMARKS.md."""
    device = resolve_device(device)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size, batch_size, what in CASES:
            count = max(1024, batch_size * 2)
            path = Path(folder) / f'cache_{size}.npy'
            cache = np.lib.format.open_memmap(path, mode='w+', dtype=np.uint8,
                                              shape=(count, 3, size, size))
            cache[:] = np.random.default_rng(0).integers(0, 256, (1, 3, size, size),
                                                         dtype=np.uint8)
            cache.flush()
            del cache
            images = np.load(path, mmap_mode='r')
            rng = np.random.default_rng(1)
            variants = {name: rate(stream, images, batch_size, n_batches, device, rng)
                        for name, stream in (('before', batches_before), ('now', batches))}
            for run in variants.values():  # warm-up: page cache, pinned allocations
                run()
            results = interleaved(variants, rounds)
            median = medians(results)
            rows.append((what, batch_size, median['before'], median['now'],
                         paired_ratio(results['now'], results['before'])))
            click.echo(f'{what}, batch {batch_size}: before {median["before"]:.0f} img/s, now '
                       f'{median["now"]:.0f} img/s, now/before {rows[-1][-1]:.2f}')
            path.unlink()
    table = ['| case | batch | before img/s | now img/s | now/before |',
             '| --- | ---: | ---: | ---: | ---: |']
    table += [f'| {w} | {b} | {x:.0f} | {y:.0f} | {r:.2f} |' for w, b, x, y, r in rows]
    command = ('python bench/bench_gather.py ' + ' '.join(sys.argv[1:])).strip()
    body = (f'Device: {device_name(device)}; torch {torch.__version__}; {today()}.\n'
            f'Command: `{command}`.\n\n' + '\n'.join(table) +
            f'\n\nA memory-mapped uint8 cache in the page cache, {n_batches} random batches per '
            f'measurement, {rounds} interleaved rounds, medians; now/before is the median of '
            'the per-round ratios.')
    click.echo('\n'.join(table))
    if write:
        kind = 'CPU' if device.type != 'cuda' else 'GPU ' + torch.cuda.get_device_name(
            device).replace('NVIDIA ', '').split()[0]
        replace_section(f'Batches from a host cache ({kind})', body)


if __name__ == '__main__':
    main()
