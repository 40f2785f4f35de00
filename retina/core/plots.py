"""Pictures people would rather look at than CSV: training curves and confusion matrices.

`training_curves` draws a run's log.csv rows (train/valid loss, valid kappa,
learning rate per epoch) and is called after every epoch, so the picture is
always current; `confusion_matrix` draws blend.py's validation table.  Both
draw with PIL: a few milliseconds a picture and no matplotlib import (which
took 0.7 s to start and 0.3 s per redraw, a second per short training run).
Files are written atomically, so a viewer that reloads the PNG never sees
half of it.
"""
import math

import numpy as np

from retina.core import atomic

LEVEL_NAMES = ('0 none', '1 mild', '2 moderate', '3 severe', '4 prolif.')


def _number(value):
    """A log cell as a float; empty, missing or unreadable cells are NaN (not plotted)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# --- training curves, drawn with PIL ------------------------------------------------------

PANEL = (400, 360)          # width, height of one panel in pixels
MARGIN = dict(left=70, right=16, top=34, bottom=40)
COLOURS = dict(train=(31, 119, 180), valid=(255, 127, 14), kappa=(44, 160, 44),
               lr=(148, 103, 189), axis=(60, 60, 60), grid=(225, 225, 225))
MARKERS_UP_TO = 40          # epochs drawn with a dot each; beyond, lines only


def _font(size=14):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def _ticks(low, high, count=5):
    """About `count` round values covering [low, high]."""
    if not high > low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + k * step for k in range(int((high - first) / step + 1e-9) + 1)]


def _panel(draw, origin, title, epochs, series, y_range=None, log_y=False, hline=None):
    """One chart: `series` is [(values, colour, label)], NaN values leave gaps."""
    x0, y0 = origin[0] + MARGIN['left'], origin[1] + MARGIN['top']
    x1, y1 = origin[0] + PANEL[0] - MARGIN['right'], origin[1] + PANEL[1] - MARGIN['bottom']
    font, small = _font(15), _font(12)
    draw.text(((x0 + x1) / 2, origin[1] + 8), title, fill=(0, 0, 0), font=font, anchor='mt')
    transform = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    values = [transform(v) for values, _, _ in series for v in values
              if math.isfinite(v) and (v > 0 or not log_y)]
    if y_range is not None:
        low, high = y_range
    elif values:
        low, high = min(values), max(values)
        pad = (high - low) * 0.05 or abs(high) * 0.1 or 1.0
        low, high = low - pad, high + pad
    else:
        low, high = 0.0, 1.0
    first, last = (min(epochs), max(epochs)) if epochs else (0, 1)
    span_x = max(last - first, 1)

    def to_xy(epoch, value):
        return (x0 + (epoch - first) / span_x * (x1 - x0),
                y1 - (value - low) / (high - low) * (y1 - y0))

    for tick in _ticks(low, high):
        y = to_xy(first, tick)[1]
        draw.line((x0, y, x1, y), fill=COLOURS['grid'])
        label = f'{10 ** tick:.0e}' if log_y else f'{tick:.3g}'
        draw.text((x0 - 6, y), label, fill=COLOURS['axis'], font=small, anchor='rm')
    for tick in _ticks(first, last, 6):
        if float(tick).is_integer():
            x = to_xy(tick, low)[0]
            draw.line((x, y0, x, y1), fill=COLOURS['grid'])
            draw.text((x, y1 + 6), f'{tick:.0f}', fill=COLOURS['axis'], font=small, anchor='mt')
    draw.text(((x0 + x1) / 2, y1 + 22), 'epoch', fill=COLOURS['axis'], font=small, anchor='mt')
    if hline is not None and low <= hline <= high:
        y = to_xy(first, hline)[1]
        for x in range(int(x0), int(x1), 8):
            draw.line((x, y, min(x + 4, x1), y), fill=(150, 150, 150))
    draw.rectangle((x0, y0, x1, y1), outline=COLOURS['axis'])
    for k, (values, colour, label) in enumerate(series):
        segment = []
        for epoch, value in zip(epochs, values):
            ok = math.isfinite(value) and (value > 0 or not log_y)
            if ok:
                segment.append(to_xy(epoch, transform(value)))
            if (not ok or epoch == epochs[-1]) and segment:
                if len(segment) > 1:
                    draw.line(segment, fill=colour, width=2)
                if len(epochs) <= MARKERS_UP_TO:
                    for x, y in segment:
                        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
                segment = []
        if label:
            ly = y0 + 10 + 18 * k
            draw.line((x1 - 70, ly, x1 - 50, ly), fill=colour, width=3)
            draw.text((x1 - 45, ly), label, fill=(0, 0, 0), font=small, anchor='lm')


def training_curves(rows, path, title=''):
    """Write `path` (PNG): losses, validation kappa and learning rate against the epoch.

    `rows` are log.csv rows (dicts with epoch, train_loss, valid_loss,
    valid_kappa, lr; numbers or strings, as written or read back).  Drawn with
    PIL in a few milliseconds, so redrawing it every epoch costs nothing.
    """
    from PIL import Image, ImageDraw

    column = {key: [_number(r.get(key)) for r in rows]
              for key in ('epoch', 'train_loss', 'valid_loss', 'valid_kappa', 'lr')}
    epochs = [e for e in column['epoch'] if math.isfinite(e)]
    rows_ok = [i for i, e in enumerate(column['epoch']) if math.isfinite(e)]
    column = {key: [values[i] for i in rows_ok] for key, values in column.items()}
    image = Image.new('RGB', (3 * PANEL[0], PANEL[1]), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    _panel(draw, (0, 0), f'{title}: loss (MSE)' if title else 'loss (MSE)', epochs,
           [(column['train_loss'], COLOURS['train'], 'train'),
            (column['valid_loss'], COLOURS['valid'], 'valid')])
    kappas = [k for k in column['valid_kappa'] if math.isfinite(k)]
    best = ''
    if kappas:
        best_epoch = epochs[column['valid_kappa'].index(max(kappas))]
        best = f' (best {max(kappas):.4f}, epoch {best_epoch:.0f})'
    _panel(draw, (PANEL[0], 0), f'valid kappa{best}', epochs,
           [(column['valid_kappa'], COLOURS['kappa'], '')],
           y_range=(min([0.0] + kappas) - 0.02, 1.02), hline=max(kappas) if kappas else None)
    _panel(draw, (2 * PANEL[0], 0), 'learning rate', epochs, [(column['lr'], COLOURS['lr'], '')],
           log_y=any(v > 0 for v in column['lr'] if math.isfinite(v)))
    with atomic.atomic_path(path) as tmp:
        image.save(tmp, format='PNG')
    return path


def confusion_matrix(confusion, path, title=''):
    """Write `path` (PNG): rows are the true level, columns the predicted one; each cell
    shows its count, shaded by its share of the true level's row (so rare levels show)."""
    from PIL import Image, ImageDraw

    confusion = np.asarray(confusion)
    n = confusion.shape[0]
    share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    names = LEVEL_NAMES[:n] if n <= len(LEVEL_NAMES) else [str(k) for k in range(n)]
    cell, left, top = 76, 120, 70
    image = Image.new('RGB', (left + n * cell + 20, top + n * cell + 60), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    draw.text((left + n * cell / 2, 10), title or 'confusion matrix', fill=(0, 0, 0), font=font,
              anchor='mt')
    draw.text((left + n * cell / 2, 34), 'predicted level', fill=COLOURS['axis'], font=small,
              anchor='mt')
    for i in range(n):
        y = top + i * cell
        draw.text((left - 8, y + cell / 2), names[i], fill=COLOURS['axis'], font=small,
                  anchor='rm')
        for j in range(n):
            x = left + j * cell
            if i == 0:
                draw.text((x + cell / 2, top - 6), names[j], fill=COLOURS['axis'], font=small,
                          anchor='mb')
            # White to dark blue with the row share.
            shade = tuple(int(round(a + (b - a) * share[i, j]))
                          for a, b in zip((247, 251, 255), (8, 48, 107)))
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=shade, outline=(255, 255, 255))
            draw.text((x + cell / 2, y + cell / 2), str(int(confusion[i, j])), font=font,
                      fill=(255, 255, 255) if share[i, j] > 0.5 else (0, 0, 0), anchor='mm')
    draw.text((12, top + n * cell + 14), 'rows: true level; shade: share of the row',
              fill=COLOURS['axis'], font=small)
    with atomic.atomic_path(path) as tmp:
        image.save(tmp, format='PNG')
    return path
