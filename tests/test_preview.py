"""convert.py --test's preview (retina/data/preview.py): which photographs it picks, the picture
of a photograph beside its crop, and the files it writes when there is no display."""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from retina.data import preview


def fundus(path, width=600, height=400, radius=170):
    """A bright disc (the eye) on black, off centre, saved as JPEG."""
    image = Image.new('RGB', (width, height))
    draw = ImageDraw.Draw(image)
    centre = (width // 2 - 40, height // 2)
    draw.ellipse((centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius),
                 fill=(180, 90, 40))
    image.save(path, quality=95)
    return path


def folder_of(tmp_path, names):
    folder = tmp_path / 'train'
    folder.mkdir()
    for name in names:
        fundus(folder / f'{name}.jpeg')
    return folder


def test_level_one_photographs_are_picked_when_labels_name_them(tmp_path):
    folder = folder_of(tmp_path, ['1_left', '1_right', '2_left', '2_right'])
    labels = tmp_path / 'labels.csv'
    labels.write_text('image,level\n1_left,0\n1_right,1\n2_left,3\n2_right,1\n')
    chosen = preview.images_to_preview(folder, labels, count=10)
    assert sorted(Path(p).stem for p in chosen) == ['1_right', '2_right']
    assert len(preview.images_to_preview(folder, labels, count=1)) == 1


def test_without_labels_or_level_one_images_the_first_are_picked(tmp_path, capsys):
    folder = folder_of(tmp_path, ['1_left', '1_right', '2_left'])
    assert len(preview.images_to_preview(folder, tmp_path / 'missing.csv', count=2)) == 2
    assert 'missing.csv not found' in capsys.readouterr().err
    labels = tmp_path / 'labels.csv'
    labels.write_text('image,level\n1_left,0\n1_right,0\n2_left,2\n')
    assert len(preview.images_to_preview(folder, labels, count=5)) == 3
    assert 'no level-1 image' in capsys.readouterr().err


def test_side_by_side_puts_the_scaled_photograph_with_its_box_left_of_the_crop():
    image = Image.new('RGB', (400, 200), (10, 10, 10))
    crop = Image.new('RGB', (100, 100), (200, 0, 0))
    pair = preview.side_by_side(image, (100, 0, 300, 200), crop)
    assert pair.size == (200 + 100, 100)
    pixels = np.asarray(pair)
    assert (pixels[:, 200:] == (200, 0, 0)).all()           # the crop, right
    box_column = pixels[:, 50]                                 # the box's left edge, scaled by 1/2
    assert (box_column == (0, 255, 0)).all(axis=1).sum() > 50
    assert (pixels[50, 100] == (10, 10, 10)).all()             # inside the box: the photograph


def test_without_a_display_the_previews_are_written_as_pictures(tmp_path, monkeypatch):
    monkeypatch.delenv('DISPLAY', raising=False)
    monkeypatch.delenv('WAYLAND_DISPLAY', raising=False)
    folder = folder_of(tmp_path, ['1_left', '1_right'])
    (folder / '3_left.jpeg').write_bytes(b'not a photograph')
    written, failed = preview.preview_folder(folder, 128, tmp_path / 'none.csv', tmp_path / 'out')
    assert sorted(p.name for p in written) == ['1_left_preview.png', '1_right_preview.png']
    assert len(failed) == 1 and '3_left' in failed[0]
    for path in written:
        with Image.open(path) as picture:
            assert picture.height == 128 and picture.width > 128
