import io

import numpy as np
import pytest
from PIL import Image

from app.core.errors import ImageTooLarge, InvalidImage
from app.core.images import as_rgb_array, decode_image


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "CMYK"])
def test_every_common_mode_becomes_rgb(mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (17, 23, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    decoded = decode_image(_encode(image, "TIFF" if mode == "CMYK" else "PNG"))
    assert decoded.shape == (17, 23, 3) and decoded.dtype == np.uint8
    if mode == "L":
        assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 0] == np.asarray(image)).all()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P"])
def test_fast_png_path_gives_pillows_pixels(mode, monkeypatch):
    import app.core.images as images

    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (31, 45, 3), dtype=np.uint8)).convert(mode)
    png = _encode(image)
    calls = []
    real = images._decode_png_fast
    monkeypatch.setattr(images, "_decode_png_fast", lambda data: calls.append(1) or real(data))
    fast = decode_image(png)
    assert calls, "8-bit PNGs should take the libspng path"
    np.testing.assert_array_equal(fast, np.asarray(image.convert("RGB")))
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(png[:-6])


def test_16_bit_grayscale_png_keeps_its_range():
    ramp = (np.arange(64, dtype=np.uint16) * 1024).reshape(8, 8)   # 0 .. 64512
    decoded = decode_image(_encode(Image.fromarray(ramp)))
    assert decoded.shape == (8, 8, 3)
    assert decoded[..., 0].max() >= 250 and decoded[..., 0].min() == 0
    assert (np.diff(decoded[..., 0].ravel().astype(int)) >= 0).all()  # monotone, not clipped to white


def test_not_an_image_and_empty_and_truncated_are_invalid():
    with pytest.raises(InvalidImage):
        decode_image(b"%PDF-1.4 definitely not an image")
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(b"")
    png = _encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(InvalidImage):
        decode_image(png[: len(png) // 2])


def test_decompression_bomb_is_refused_from_the_header():
    # 20000 x 20000 zeros compress to a few hundred KB; refusing must not decode them.
    bomb = _encode(Image.new("L", (20000, 20000)))
    with pytest.raises(ImageTooLarge, match="400000000 pixels"):
        decode_image(bomb, max_pixels=1_000_000)


def test_array_inputs():
    assert as_rgb_array(np.zeros((5, 7), np.uint8)).shape == (5, 7, 3)
    assert as_rgb_array(np.zeros((5, 7, 4), np.uint8)).shape == (5, 7, 3)
    assert as_rgb_array(np.full((5, 7), 65535, np.uint16)).max() == 255
    with pytest.raises(InvalidImage):
        as_rgb_array(np.zeros((5, 7, 2), np.uint8))
    with pytest.raises(InvalidImage):
        as_rgb_array(np.zeros((5, 7, 3), np.float64))
