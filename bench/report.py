"""Shared by the benchmarks: naming the device and writing a section of BENCHMARKS.md."""
import datetime
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / 'BENCHMARKS.md'


def cpu_model():
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def device_name(device):
    import os

    import torch
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads'


def interleaved(variants, rounds):
    """Run each of `variants` (name -> function returning a measurement) once per round, in
    turn: A, B, C in the first round, C, B, A in the next, and so on.

    On a shared machine the load from other jobs comes and goes over seconds; variants measured
    one after another can see different machines and their ratio swings by 2x.  Interleaved,
    every variant sees the same spread of load, and the median of each (see `medians`) and
    their ratio hold.  Returns name -> list of the measurements, in round order.
    """
    results = {name: [] for name in variants}
    order = list(variants)
    for round_ in range(rounds):
        for name in (order if round_ % 2 == 0 else order[::-1]):
            results[name].append(variants[name]())
    return results


def medians(results):
    """name -> median of its measurements (the `interleaved` result)."""
    import statistics
    return {name: statistics.median(values) for name, values in results.items()}


def paired_ratio(numerators, denominators):
    """The median over rounds of numerator / denominator, each pair measured in the same round
    (steadier than the ratio of the medians when the load drifts during the run)."""
    import statistics
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def today():
    return datetime.date.today().isoformat()


def replace_section(title, body, path=BENCHMARKS):
    """Put `## title` + body into BENCHMARKS.md: in place of that section where the page has it
    (the page is ordered by question, with a table of contents), at its end where it is new."""
    path = Path(path)
    text = path.read_text() if path.is_file() else '# Benchmarks\n'
    heading = f'## {title}'
    section = [heading, '', *body.strip().splitlines(), '']
    out, skipping, placed = [], False, False
    for line in text.splitlines():
        if line.strip() == heading:
            skipping = True
            if not placed:
                out += section
                placed = True
            continue
        if skipping and line.startswith('## '):
            skipping = False
        if not skipping:
            out.append(line)
    if not placed:
        out = [*'\n'.join(out).rstrip().splitlines(), '', *section]
    from retina.core.atomic import write_text
    write_text(path, '\n'.join(out).rstrip() + '\n')
