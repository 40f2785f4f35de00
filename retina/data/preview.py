"""convert.py --test: a few photographs beside their crops, the eye's box drawn, on screen or
written as pictures."""
import os
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from retina.core.atomic import save_image
from retina.data.crop import crop_to_eye, find_eye_box_fast, load_for_crop, scale_box
from retina.data.images import BadImage, image_name, list_images

PREVIEW_COUNT = 10        # how many images `--test` shows
PREVIEW_LEVEL = 1         # ... and of which level: mild DR, the hardest to see


def images_to_preview(directory, labels_file, count=PREVIEW_COUNT, level=PREVIEW_LEVEL):
    """The first `count` images of `level`; the first `count` images if there are no labels for them."""
    sources = list_images(directory)
    if not Path(labels_file).is_file():
        print(f'{labels_file} not found; previewing the first {count} images instead of level-{level} ones',
              file=sys.stderr)
        return sources[:count]
    from retina.data.labels import load_labels  # here: sklearn stays out of the convert workers
    levels = load_labels(labels_file)
    chosen = [src for src in sources if levels.get(image_name(src)) == level]
    if not chosen:
        print(f'{labels_file} lists no level-{level} image of {directory}; previewing the first {count} images',
              file=sys.stderr)
        return sources[:count]
    return chosen[:count]


def side_by_side(image, box, crop):
    """The photograph (scaled to the crop's height, the eye's box drawn in green) left of its crop."""
    height = crop.height
    scale = height / image.height
    original = image.resize((max(1, round(image.width * scale)), height), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(original)
    left, top, right, bottom = scale_box(box, image.size, original.size)
    draw.rectangle((left, top, right - 1, bottom - 1), outline=(0, 255, 0), width=max(1, height // 128))
    canvas = Image.new('RGB', (original.width + crop.width, height))
    canvas.paste(original, (0, 0))
    canvas.paste(crop, (original.width, 0))
    return canvas


def has_display():
    """Whether windows can be shown: a display is set and matplotlib's backend is interactive."""
    if sys.platform.startswith('linux') and not (os.environ.get('DISPLAY') or os.environ.get('WAYLAND_DISPLAY')):
        return False
    try:
        import matplotlib
        backend = matplotlib.get_backend().lower()
    except ImportError:
        return False
    return backend not in ('agg', 'pdf', 'ps', 'svg', 'pgf', 'cairo', 'template') and 'inline' not in backend


def preview_folder(directory, crop_size, labels_file, preview_dir, count=PREVIEW_COUNT):
    """Show the crops of a few level-1 images next to their originals (convert.py --test).

    With a display each pair is shown in a window (close it for the next);
    without one, each pair is written to `preview_dir` as {name}_preview.png.
    Returns (paths written, empty when shown on screen; messages of the images that failed).
    """
    sources = images_to_preview(directory, labels_file, count)
    show = has_display()
    written, failed = [], []
    for src in sources:
        try:
            image = load_for_crop(src, crop_size)
        except BadImage as error:
            print(f'failed: {error}', file=sys.stderr)
            failed.append(str(error))
            continue
        box = find_eye_box_fast(image)
        pair = side_by_side(image, box, crop_to_eye(image, crop_size, box))
        if show:
            _show(pair, f'{image_name(src)}: photograph and crop (close the window for the next)')
        else:
            path = Path(preview_dir) / f'{image_name(src)}_preview.png'
            save_image(path, pair)
            written.append(path)
    if written:
        print(f'no display: wrote {len(written)} previews (photograph with the box left, crop right) '
              f'to {preview_dir}/')
    return written, failed


def _show(image, title):
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(12, 5))
    axes.imshow(image)
    axes.set_title(title)
    axes.axis('off')
    plt.show()
    plt.close(figure)
