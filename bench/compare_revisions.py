#!/usr/bin/env python
"""bench_train.py on an older revision and on this checkout, side by side in one run.

    python bench/compare_revisions.py --old 8012f52 [--configs c_128_5x5_32_ram] [--rounds 3]

The old revision is checked out into a temporary git worktree; the two trees'
own `bench/bench_train.py` run in alternation (old, new, old, new, …) on the
same device, so that machine noise hits both alike, and the best of the rounds
is kept.  On the CPU the augmentation (`prepare_batch` with random
parameters) is also timed alone.  Prints a table of images/s and new/old ratios and writes it to
BENCHMARKS.md ("Training and feature extraction: <old> against this checkout").
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

from report import replace_section, today  # noqa: E402

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


AUGMENT_SNIPPET = '''
import time, torch
torch.set_num_threads(1)  # one thread and CPU time: less exposed to the machine's other work
from retina import config as C
from retina.augment import prepare_batch, random_params
cfg = C.load('c_128_5x5_32_ram')
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (128, 3, 128, 128), dtype=torch.uint8, generator=g)
times = []
for _ in range(25):
    start = time.process_time()
    p = random_params(128, cfg.cnf['aug_params'], cfg.cnf['sigma'], g)
    prepare_batch(images, cfg.input_size, p)
    times.append(time.process_time() - start)
print(128 / sorted(times)[len(times) // 2])
'''


def run_augment(tree):
    """Median images/s of augmentation alone (128 images of 128 px, one thread) in `tree`."""
    result = subprocess.run([sys.executable, '-c', AUGMENT_SNIPPET], cwd=tree,
                            capture_output=True, text=True,
                            env={'PYTHONPATH': str(tree), 'PATH': '/usr/bin:/bin'})
    if result.returncode != 0:
        raise click.ClickException(f'{tree}: augmentation timing failed:\n{result.stderr[-2000:]}')
    return float(result.stdout.split()[-1])


@click.command()
@click.option('--old', required=True, help='The git revision to compare against (hash, tag).')
@click.option('--configs', default='c_128_5x5_32_ram,c_128_4x4_32', show_default=True,
              help='Comma-separated config names.')
@click.option('--rounds', default=3, show_default=True, type=click.IntRange(min=1),
              help='Alternating runs of each tree; the best is kept.')
@click.option('--steps', default=3, show_default=True, type=click.IntRange(min=1),
              help='Timed steps per measurement (passed to bench_train.py).')
@click.option('--batch_size', type=click.IntRange(min=1),
              help="Batch size for training and features [default: the config's].")
@click.option('--device', default='cpu', show_default=True, help='cpu, cuda or cuda:N.')
@click.option('--write/--no_write', default=True, show_default=True,
              help='Write the table to BENCHMARKS.md.')
def main(old, configs, rounds, steps, batch_size, device, write):
    """Compare training/bare/feature images/s of revision OLD with this checkout."""
    best = {'old': {}, 'new': {}}
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / 'old'
        subprocess.run(['git', 'worktree', 'add', '--detach', '-f', str(old_tree), old],
                       cwd=REPO, check=True, capture_output=True)
        try:
            for round_ in range(rounds):
                for label, tree in (('old', old_tree), ('new', REPO)):
                    rates = run_bench(tree, configs, steps, device, batch_size)
                    if device == 'cpu':
                        rates['augmentation'] = (run_augment(tree), 0, 0)
                    click.echo(f'round {round_ + 1} {label}: {rates}')
                    for name, values in rates.items():
                        previous = best[label].get(name, (0, 0, 0))
                        best[label][name] = tuple(max(a, b) for a, b in zip(previous, values))
        finally:
            subprocess.run(['git', 'worktree', 'remove', '--force', str(old_tree)], cwd=REPO,
                           capture_output=True)
    table = ['| config | train img/s old | new | new/old | bare old | new | new/old | '
             'features old | new | new/old |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for name in configs.split(','):
        o, n = best['old'][name], best['new'][name]
        cells = [f'{o[i]:.1f} | {n[i]:.1f} | {n[i] / o[i]:.2f}' for i in range(3)]
        table.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    if 'augmentation' in best['new']:
        o, n = best['old']['augmentation'][0], best['new']['augmentation'][0]
        table.append(f'| augmentation alone (128 × 128 px, 1 thread, CPU time, median of 25) | {o:.1f} | {n:.1f} | '
                     f'{n / o:.2f} | | | | | | |')
    click.echo('\n'.join(table))
    command = ('python bench/compare_revisions.py ' + ' '.join(sys.argv[1:])).strip()
    if write:
        replace_section(f'Training and feature extraction: {old} against this checkout',
                        f'Device: {device}; {today()}; best of {rounds} alternating rounds.\n'
                        f'Command: `{command}`.\n\n' + '\n'.join(table))


if __name__ == '__main__':
    main()
