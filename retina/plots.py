"""Pictures people would rather look at than CSV: training curves and confusion matrices.

`training_curves` draws a run's log.csv rows (train/valid loss, valid kappa,
learning rate per epoch) and is called after every epoch, so the picture is
always current; `confusion_matrix` draws blend.py's validation table.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas, never
pyplot: no display is needed, no global figure state leaks between calls
(the trainer calls this once per epoch for hours), and a call costs about a
tenth of a second.  Files are written atomically, so a viewer that reloads
the PNG never sees half of it.
"""
import math

import numpy as np

from retina import atomic

LEVEL_NAMES = ('0 none', '1 mild', '2 moderate', '3 severe', '4 prolif.')


def _number(value):
    """A log cell as a float; empty, missing or unreadable cells are NaN (not plotted)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _save(figure, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(figure)
    with atomic.atomic_path(path) as tmp:
        figure.savefig(tmp, format='png', dpi=100)


def training_curves(rows, path, title=''):
    """Write `path` (PNG): losses, validation kappa and learning rate against the epoch.

    `rows` are log.csv rows (dicts with epoch, train_loss, valid_loss,
    valid_kappa, lr; numbers or strings, as written or read back).
    """
    from matplotlib.figure import Figure

    column = {key: np.array([_number(r.get(key)) for r in rows])
              for key in ('epoch', 'train_loss', 'valid_loss', 'valid_kappa', 'lr')}
    epoch = column['epoch']
    figure = Figure(figsize=(11, 3.4))
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.14, top=0.88, wspace=0.3)
    loss, kappa, lr = figure.subplots(1, 3)
    style = '.-' if len(rows) <= 40 else '-'  # markers only while they can be told apart
    loss.plot(epoch, column['train_loss'], style, label='train')
    loss.plot(epoch, column['valid_loss'], style, label='valid')
    loss.set(title=f'{title}: loss (MSE)' if title else 'loss (MSE)', xlabel='epoch')
    loss.legend()
    kappa.plot(epoch, column['valid_kappa'], style, color='tab:green')
    finite = column['valid_kappa'][np.isfinite(column['valid_kappa'])]
    if finite.size:
        best = int(np.nanargmax(column['valid_kappa']))
        kappa.axhline(finite.max(), color='grey', lw=0.6, ls=':')
        kappa.set_title(f'valid kappa (best {finite.max():.4f}, epoch {epoch[best]:.0f})')
    else:
        kappa.set_title('valid kappa')
    kappa.set(xlabel='epoch', ylim=(min(0.0, *finite) if finite.size else 0.0, 1.0))
    lr.plot(epoch, column['lr'], style, color='tab:purple')
    if np.any(column['lr'] > 0):
        lr.set_yscale('log')
    lr.set(title='learning rate', xlabel='epoch')
    for axes in (loss, kappa, lr):
        axes.grid(alpha=0.3)
        if epoch.size and np.all(np.isfinite(epoch)):
            axes.set_xlim(epoch.min() - 0.5, epoch.max() + 0.5)
    _save(figure, path)
    return path


def confusion_matrix(confusion, path, title=''):
    """Write `path` (PNG): rows are the true level, columns the predicted one; each cell
    shows its count, coloured by its share of the true level's row (so rare levels show)."""
    from matplotlib.figure import Figure

    confusion = np.asarray(confusion)
    share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(5.2, 4.6), layout='constrained')
    axes = figure.subplots()
    image = axes.imshow(share, cmap='Blues', vmin=0, vmax=1)
    n = confusion.shape[0]
    for i in range(n):
        for j in range(n):
            axes.text(j, i, str(int(confusion[i, j])), ha='center', va='center',
                      color='white' if share[i, j] > 0.6 else 'black')
    names = LEVEL_NAMES[:n] if n <= len(LEVEL_NAMES) else [str(k) for k in range(n)]
    axes.set_xticks(range(n), names, rotation=30)
    axes.set_yticks(range(n), names)
    axes.set(xlabel='predicted level', ylabel='true level', title=title or 'confusion matrix')
    figure.colorbar(image, ax=axes, label='share of the true level')
    _save(figure, path)
    return path
