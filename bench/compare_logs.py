#!/usr/bin/env python
"""Two or more training runs side by side: their log.csv as one table and one picture.

    python bench/compare_logs.py bf16=data/real/weights/c_128_5x5_32_ram/log.csv \\
        fp32=data/real/fp32cmp/weights/c_128_5x5_32_ram/log.csv --epochs 30 \\
        --picture bench/precision_curves.png --section 'CPU bf16 against fp32: what the net learns'

Per run: the training loss and validation kappa every `--every` epochs up to `--epochs`, the
best validation kappa and the mean of the last 10 epochs' kappas; the picture draws the
training and validation losses and the kappa of every run over the epochs.
"""
import csv
import sys
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from report import replace_section, today  # noqa: E402


def read(path, epochs):
    with open(path, newline='') as f:
        rows = [r for r in csv.DictReader(f) if int(r['epoch']) <= epochs]
    return {key: [float(r[key]) for r in rows] for key in ('epoch', 'train_loss', 'valid_loss',
                                                          'valid_kappa', 'images_per_s')}


@click.command()
@click.argument('runs', nargs=-1, required=True, metavar='NAME=LOG.CSV...')
@click.option('--epochs', default=30, show_default=True, type=click.IntRange(min=1))
@click.option('--every', default=5, show_default=True, type=click.IntRange(min=1))
@click.option('--picture', type=click.Path(dir_okay=False), help='PNG of the curves.')
@click.option('--section', default='', help='Write the table to this BENCHMARKS.md section.')
@click.option('--note', default='', help='A sentence above the table (command, machine).')
def main(runs, epochs, every, picture, section, note):
    """Compare the log.csv of training runs, epoch by epoch."""
    logs = {}
    for spec in runs:
        name, _, path = spec.partition('=')
        if not path or not Path(path).is_file():
            raise click.UsageError(f'{spec}: expected NAME=path/to/log.csv of a run')
        logs[name] = read(path, epochs)
    shortest = min(len(log['epoch']) for log in logs.values())
    names = list(logs)
    head = '| epoch | ' + ' | '.join(f'{n}: train loss | {n}: valid kappa' for n in names) + ' |'
    lines = [head, '| ---: |' + ' ---: | ---: |' * len(names)]
    for i in range(every - 1, shortest, every):
        lines.append(f'| {i + 1} | ' + ' | '.join(
            f'{logs[n]["train_loss"][i]:.3f} | {logs[n]["valid_kappa"][i]:.3f}' for n in names)
            + ' |')
    for label, value in (('best valid kappa', lambda log: max(log['valid_kappa'][:shortest])),
                         ('mean valid kappa, last 10 epochs',
                          lambda log: sum(log['valid_kappa'][shortest - 10:shortest]) / 10),
                         ('median images/s', lambda log: sorted(
                             log['images_per_s'][:shortest])[shortest // 2])):
        lines.append(f'| {label} | ' + ' | '.join(f'| {value(logs[n]):.3f}' if 'kappa' in label
                                                  else f'| {value(logs[n]):.0f}'
                                                  for n in names) + ' |')
    table = '\n'.join(lines)
    click.echo(table)
    if picture:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        figure, (losses, kappas) = plt.subplots(1, 2, figsize=(10, 4))
        for n in names:
            log = logs[n]
            line, = losses.plot(log['epoch'][:shortest], log['train_loss'][:shortest],
                                label=f'{n} train')
            losses.plot(log['epoch'][:shortest], log['valid_loss'][:shortest], '--',
                        color=line.get_color(), label=f'{n} valid')
            kappas.plot(log['epoch'][:shortest], log['valid_kappa'][:shortest], label=n)
        losses.set(xlabel='epoch', ylabel='MSE', title='loss')
        kappas.set(xlabel='epoch', ylabel='quadratic kappa', title='validation kappa')
        losses.legend()
        kappas.legend()
        figure.tight_layout()
        figure.savefig(picture, dpi=80)
        click.echo(f'wrote {picture}')
    if section:
        command = ('python bench/compare_logs.py ' + ' '.join(runs) + f' --epochs {epochs}'
                   + (f' --picture {picture}' if picture else ''))
        replace_section(section, f'{note} {today()}.\nCommand: `{command}`.\n\n{table}'
                        + (f'\n\n![curves]({Path(picture).resolve().relative_to(REPO)})'
                           if picture and Path(picture).resolve().is_relative_to(REPO) else ''))


if __name__ == '__main__':
    main()
