#!/usr/bin/env python
"""Does the training's JPEG augmentation damage a converted image as much as a compressed
photograph does?  (issue 32: compression)

    python bench/bench_jpeg_domain.py [--set NAME=FOLDER ...] [--limit 25] [--crop_size 256]

The nets learn on converted images (cropped, resized, `--enhance local_contrast`) and the
training augmentation re-encodes *those* as JPEG (`retina.data.jpeg.jpeg_batch`).  A user's
photograph is compressed *before* conversion: its blocks are then resized with the eye and
its detail rescaled per channel by the local-contrast look (a gain of 24 / the channel's
spread, large for the dark blue channel of a raw photograph).  If that made the deployed error
much larger than the augmented one, the augmentation would teach the wrong invariance.

Per set and quality: the RMS difference per channel (inside the eye) between the clean
converted image (stored as convert.py stores it) and (a) the photograph re-saved with PIL at
that quality and then converted, as predict.py converts it, (b) the clean converted image
through the training augmentation's encoder at that quality.  Their ratio a / b is printed.
"""
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

from bench_compression import test_split  # noqa: E402
from report import cpu_model, today  # noqa: E402

from retina.core.errors import UserError  # noqa: E402
from retina.data import crop, preprocess  # noqa: E402
from retina.data.jpeg import jpeg_batch  # noqa: E402

QUALITIES = (75, 50, 30, 20)
SHARED = REPO.parent / 'shared' / 'data'


def converted(path, crop_size, box=None):
    """(the image as predict.py converts and stores it, the eye's box)."""
    image = crop.load_for_crop(path, crop_size)
    box = crop.find_eye_box_fast(image) if box is None else box
    rgb = preprocess.local_contrast(np.asarray(crop.crop_to_eye(image, crop_size, box)))
    return crop.as_stored(rgb, crop.ENCODINGS[1]), box


def rms(a, b, mask):
    return np.sqrt(((a.astype(np.float64) - b)[mask] ** 2).mean(axis=0))


@click.command()
@click.option('--set', 'sets', multiple=True, show_default=True,
              default=(f'eyepacs256={SHARED / "eyepacs256"}',
                       f'eyepacs_raw={SHARED / "eyepacs_raw"}'),
              help='NAME=FOLDER: train/ (or the photographs) beside trainLabels.csv, as '
                   'bench_compression.py takes it; repeatable.')
@click.option('--limit', default=25, show_default=True, help='Test-split photographs per set.')
@click.option('--hold_out', default=0.15, show_default=True, help='The test split (train_nn.py).')
@click.option('--crop_size', default=256, show_default=True, help='The converted size.')
def main(sets, limit, hold_out, crop_size):
    start = time.time()
    print(f'{today()}, {cpu_model()}; crop {crop_size}, --enhance local_contrast')
    print('| set (photographs) | quality | RMS, photograph compressed (R G B) | '
          'RMS, augmentation (R G B) | ratio (R G B) |')
    print('| --- | --- | --- | --- | --- |')
    for spec in sets:
        name, _, folder = spec.partition('=')
        try:
            paths = test_split(folder, hold_out, limit)
        except (UserError, FileNotFoundError) as error:
            raise click.BadParameter(str(error), param_hint='--set') from None
        if not paths:
            raise click.BadParameter(f'{folder}: no test-split photographs', param_hint='--set')
        deployed = {q: [] for q in QUALITIES}
        augmented = {q: [] for q in QUALITIES}
        with tempfile.TemporaryDirectory() as tmp:
            for path in paths:
                clean, box = converted(path, crop_size)
                mask = clean.max(axis=2) > 0
                photo = Image.open(path).convert('RGB')
                batch = torch.from_numpy(clean.copy()).permute(2, 0, 1)[None].repeat(len(QUALITIES), 1, 1, 1)
                aug = jpeg_batch(batch, torch.tensor(QUALITIES, dtype=torch.float32))
                for i, quality in enumerate(QUALITIES):
                    copy = Path(tmp) / f'q{quality}.jpeg'
                    photo.save(copy, 'JPEG', quality=quality)
                    # the same box: the error of the pixels, not of a moved crop
                    deployed[quality].append(rms(converted(copy, crop_size, box)[0], clean, mask))
                    augmented[quality].append(rms(aug[i].permute(1, 2, 0).numpy(), clean, mask))
        for quality in QUALITIES:
            a, b = np.mean(deployed[quality], axis=0), np.mean(augmented[quality], axis=0)
            print(f'| {name} ({len(paths)}) | {quality} | {" ".join(f"{v:.1f}" for v in a)} | '
                  f'{" ".join(f"{v:.1f}" for v in b)} | {" ".join(f"{v:.2f}" for v in a / b)} |',
                  flush=True)
    print(f'{time.time() - start:.0f} s')


if __name__ == '__main__':
    main()
