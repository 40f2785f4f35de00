"""retina.images and retina.data.cache: decompression bombs, EXIF orientation, a truncated image cache."""
import numpy as np
import pytest

from retina.core.errors import UserError


def _png_claiming(path, width, height):
    """A tiny PNG whose header claims width × height (what a decompression bomb looks like)."""
    import io
    import struct
    import zlib
    from PIL import Image
    buffer = io.BytesIO()
    Image.new('L', (1, 1)).save(buffer, 'PNG')
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b'IHDR')
    data[ihdr + 4:ihdr + 12] = struct.pack('>II', width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack('>I', zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize('width, height', [(20000, 20000), (12000, 10000)])
def test_an_image_over_100_megapixels_is_refused_by_name(tmp_path, width, height):
    from retina.data import cache
    from retina.data.images import BadImage, load_rgb
    path = _png_claiming(tmp_path / 'bomb_left.png', width, height)
    for read in (load_rgb, lambda p: cache.image_size_of([p])):
        with pytest.raises(UserError, match='bomb_left.png: too many pixels .* limit is 100 MP'):
            read(path)
    with pytest.raises(BadImage):
        load_rgb(path)


def test_exif_orientation_turns_the_photo_upright(tmp_path):
    from PIL import Image
    from retina.data.crop import load_for_crop
    from retina.data.images import load_rgb
    array = np.zeros((32, 64, 3), np.uint8)
    array[:, :32] = 255  # left half white: upright (orientation 6 turns it clockwise) on top
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / 'side.jpeg', exif=exif.tobytes(), quality=95)
    for upright in (load_rgb(tmp_path / 'side.jpeg'), load_for_crop(tmp_path / 'side.jpeg', 8)):
        pixels = np.asarray(upright).mean(axis=(1, 2))
        assert upright.size[0] < upright.size[1]
        assert pixels[:len(pixels) // 2].mean() > 200 and pixels[len(pixels) // 2:].mean() < 50


def test_a_truncated_image_cache_is_built_again(tmp_path, capsys):
    from PIL import Image
    from retina.data import cache
    folder = tmp_path / 'train'
    folder.mkdir()
    for i in range(3):
        Image.new('RGB', (16, 16), (i * 50, 0, 0)).save(folder / f'{i}_left.png')
    images = sorted(folder.iterdir())
    first = np.array(cache.load_images(images, cache_dir=tmp_path / 'cache', progress=False))
    (cached,) = (tmp_path / 'cache').iterdir()
    cached.write_bytes(cached.read_bytes()[:-100])
    again = cache.load_images(images, cache_dir=tmp_path / 'cache', progress=False)
    assert np.array_equal(first, again)
    assert 'is damaged' in capsys.readouterr().err
