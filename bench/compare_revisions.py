#!/usr/bin/env python
"""bench_train.py on an older revision and on this checkout, side by side in one run.

    python bench/compare_revisions.py --old 8012f52 [--configs c_128_5x5_32_ram] [--rounds 3]

The old revision is checked out into a temporary git worktree; the two trees'
own `bench/bench_train.py` run in alternation (report.interleaved: old, new,
new, old, …) on the same device, so that machine noise hits both alike; each
figure is the median of the rounds and each ratio the median of the per-round
ratios.  On the CPU the augmentation (`prepare_batch` with random parameters)
of both trees is also timed alone, interleaved in one process.  Prints a table
of images/s and new/old ratios and writes it to BENCHMARKS.md ("Training and
feature extraction: <old> against this checkout").
"""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from report import interleaved, medians, paired_ratio, replace_section, today  # noqa: E402

LINE = re.compile(r'^(\S+): train ([\d.]+) img/s, bare ([\d.]+) img/s, overhead [-\d.]+%, '
                  r'features ([\d.]+) img/s$', re.M)


def run_bench(tree, configs, steps, device, batch_size):
    command = [sys.executable, str(tree / 'bench' / 'bench_train.py'), '--configs', configs,
               '--steps', str(steps), '--device', device, '--no_write']
    if batch_size:
        command += ['--batch_size', str(batch_size), '--test_batch_size', str(batch_size)]
    result = subprocess.run(command, cwd=tree, capture_output=True, text=True,
                            env={'PYTHONPATH': str(tree), 'PATH': '/usr/bin:/bin'})
    if result.returncode != 0:
        raise click.ClickException(f'{tree}: bench_train.py failed:\n{result.stderr[-2000:]}')
    return {m[0]: tuple(map(float, m[1:])) for m in LINE.findall(result.stdout)}


def augment_rates(old_tree, repeats=30):
    """Median images/s of `prepare_batch` (random parameters, 128 images of 128 px, one thread)
    for the old tree's retina/model/augment.py and this checkout's, interleaved in this process so
    that both see the same allocator, caches and neighbours."""
    import importlib.util
    import inspect
    import time

    import torch

    from retina.model import augment as new
    from retina.model import config as config_module
    spec = importlib.util.spec_from_file_location('old_augment',
                                                  old_tree / 'retina' / 'augment.py')
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = config_module.load('c_128_5x5_32_ram')
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (128, 3, 128, 128), dtype=torch.uint8, generator=generator)
    params = new.random_params(128, config.cnf['aug_params'], config.cnf['sigma'], generator)

    def rate(module):
        # The constants as each tree takes them: passed where it asks for them (never assumed
        # since the input spec), left to the old trees' Kaggle default before
        takes = 'constants' in inspect.signature(module.prepare_batch).parameters
        options = {'constants': new.constants_for(config.cnf)} if takes else {}

        def run():
            start = time.process_time()
            # In the network's layout, as training asks for it (old trees: a copy after).
            out = module.prepare_batch(images, config.input_size, params, **options)
            out.contiguous(memory_format=torch.channels_last)
            return 128 / (time.process_time() - start)
        return run
    rates = medians(interleaved({'old': rate(old), 'new': rate(new)}, repeats))
    torch.set_num_threads(threads)
    return rates


@click.command()
@click.option('--old', required=True, help='The git revision to compare against (hash, tag).')
@click.option('--configs', default='c_128_5x5_32_ram,c_128_4x4_32', show_default=True,
              help='Comma-separated config names.')
@click.option('--rounds', default=3, show_default=True, type=click.IntRange(min=1),
              help='Alternating runs of each tree; medians are reported.')
@click.option('--steps', default=3, show_default=True, type=click.IntRange(min=1),
              help='Timed steps per measurement (passed to bench_train.py).')
@click.option('--batch_size', type=click.IntRange(min=1),
              help="Batch size for training and features [default: the config's].")
@click.option('--device', default='cpu', show_default=True, help='cpu, cuda or cuda:N.')
@click.option('--write/--no_write', default=True, show_default=True,
              help='Write the table to BENCHMARKS.md.')
def main(old, configs, rounds, steps, batch_size, device, write):
    """Compare training/bare/feature images/s of revision OLD with this checkout."""
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / 'old'
        subprocess.run(['git', 'worktree', 'add', '--detach', '-f', str(old_tree), old],
                       cwd=REPO, check=True, capture_output=True)
        try:
            def bench(label, tree):
                def run():
                    rates = run_bench(tree, configs, steps, device, batch_size)
                    click.echo(f'{label}: {rates}')
                    return rates
                return run
            runs = interleaved({'old': bench('old', old_tree), 'new': bench('new', REPO)}, rounds)
            if device == 'cpu':
                augmentation = augment_rates(old_tree)
                click.echo(f'augmentation alone: {augmentation}')
        finally:
            subprocess.run(['git', 'worktree', 'remove', '--force', str(old_tree)], cwd=REPO,
                           capture_output=True)
    table = ['| config | train img/s old | new | new/old | bare old | new | new/old | '
             'features old | new | new/old |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for name in configs.split(','):
        cells = []
        for i in range(3):  # train, bare, features
            per_round = {label: [r[name][i] for r in runs[label]] for label in runs}
            o, n = medians(per_round).values()
            ratio = paired_ratio(per_round['new'], per_round['old'])
            cells.append(f'{o:.1f} | {n:.1f} | {ratio:.2f}')
        table.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    if device == 'cpu':
        o, n = augmentation['old'], augmentation['new']
        table.append(f'| augmentation alone (interleaved in one process, 1 thread, median of 30) | '
                     f'{o:.1f} | {n:.1f} | {n / o:.2f} | | | | | | |')
    click.echo('\n'.join(table))
    command = ('python bench/compare_revisions.py ' + ' '.join(sys.argv[1:])).strip()
    if write:
        replace_section(f'Training and feature extraction: {old} against this checkout',
                        f'Device: {device}; {today()}; medians of {rounds} interleaved rounds.\n'
                        f'Command: `{command}`.\n\n' + '\n'.join(table))


if __name__ == '__main__':
    main()
