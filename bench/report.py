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


def today():
    return datetime.date.today().isoformat()


def replace_section(title, body, path=BENCHMARKS):
    """Put `## title` + body into BENCHMARKS.md, replacing that section only."""
    path = Path(path)
    text = path.read_text() if path.is_file() else '# Benchmarks\n'
    heading = f'## {title}'
    lines = text.splitlines()
    out, skipping = [], False
    for line in lines:
        if line.strip() == heading:
            skipping = True
            continue
        if skipping and line.startswith('## '):
            skipping = False
        if not skipping:
            out.append(line)
    new = '\n'.join(out).rstrip() + f'\n\n{heading}\n\n{body.strip()}\n'
    from retina.atomic import write_text
    write_text(path, new)
