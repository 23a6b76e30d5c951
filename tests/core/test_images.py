import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

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


def test_png_decoded_beside_a_busy_libspng_goes_to_pillow_with_the_same_pixels(monkeypatch):
    """pyspng holds the GIL, so only one decode at a time uses it; one that starts while
    it is busy decodes with Pillow (which runs in parallel) instead of waiting."""
    import pyspng

    import app.core.images as images

    used = []
    real_load = pyspng.load
    monkeypatch.setattr(pyspng, "load", lambda *a, **k: used.append(1) or real_load(*a, **k))
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    png = _encode(image)
    alone = decode_image(png)
    assert used == [1]  # free: libspng
    with images._SPNG_SLOT:  # another thread is decoding with libspng
        beside = decode_image(png)
        with pytest.raises(InvalidImage, match="truncated"):  # the same rules either way
            decode_image(png[:-6])
    assert used == [1]  # busy: Pillow, without waiting for the slot
    np.testing.assert_array_equal(alone, beside)
    np.testing.assert_array_equal(alone, np.asarray(image))
    # Many threads at once: every result is the image, whichever decoder each one got.
    with ThreadPoolExecutor(4) as pool:
        for decoded in pool.map(lambda _: decode_image(png), range(24)):
            np.testing.assert_array_equal(decoded, alone)
    assert not images._SPNG_SLOT.locked()


def _png_rotated_by_xmp() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf='
                  '"http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff='
                  '"http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 100, 3), np.uint8)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def _png_with_exif_after_the_image_data() -> bytes:
    data = _encode(Image.fromarray(np.zeros((40, 100, 3), np.uint8)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    payload = exif.tobytes()
    chunk = (struct.pack(">I", len(payload)) + b"eXIf" + payload
             + struct.pack(">I", zlib.crc32(b"eXIf" + payload)))
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk + data[end:]


@pytest.mark.parametrize("png", [_png_rotated_by_xmp(), _png_with_exif_after_the_image_data()],
                         ids=["xmp", "exif-after-idat"])
def test_png_orientation_is_applied_whichever_decoder_runs(png):
    """The libspng path once skipped orientations in XMP or after IDAT, so the same upload
    was scored upright or rotated depending on whether another request held the decoder."""
    import app.core.images as images

    alone = decode_image(png)
    with images._SPNG_SLOT:
        beside = decode_image(png)
    assert alone.shape == beside.shape == (100, 40, 3)


def test_xmp_without_an_orientation_keeps_the_fast_decoder(shared_data, monkeypatch):
    """Every MVTec PNG carries XMP (licence text) after its image data: only an XMP
    orientation sends a PNG to Pillow's path (9 ms instead of 20 ms for bottle's frames)."""
    import pyspng

    path = sorted((shared_data / "bottle" / "test" / "good").glob("*.png"))[0]
    data = path.read_bytes()
    assert b"XML:com.adobe.xmp" in data[data.rfind(b"IDAT"):]
    used = []
    real_load = pyspng.load
    monkeypatch.setattr(pyspng, "load", lambda *a, **k: used.append(1) or real_load(*a, **k))
    decoded = decode_image(data)
    assert used == [1]
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(path).convert("RGB")))


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


# ------------------------------------------------------------------ decode_for_model
def _photo(height: int, width: int) -> Image.Image:
    """A smooth synthetic photo (JPEG-friendly) with some detail."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(x / 37.0), 128 + 100 * np.cos(y / 23.0),
                    128 + 60 * np.sin((x + y) / 51.0)], axis=-1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def test_jpeg_decodes_reduced_but_never_below_min_side():
    from app.core.images import decode_for_model

    data = _encode(_photo(900, 1200), "JPEG")
    array, original = decode_for_model(data, min_side=224)
    assert original == (900, 1200)
    assert array.shape == (225, 300, 3)  # 1/4 scale in the DCT domain: 225 >= 224
    array, original = decode_for_model(data, min_side=300)
    assert array.shape == (450, 600, 3) and original == (900, 1200)  # 1/4 would give 225 < 300
    full, original = decode_for_model(data)  # no min_side: never reduced
    assert full.shape == (900, 1200, 3) and original == (900, 1200)
    np.testing.assert_array_equal(full, decode_image(data))
    small = _encode(_photo(300, 400), "JPEG")
    assert decode_for_model(small, min_side=224)[0].shape == (300, 400, 3)  # 1/2 would go below 224


def test_reduced_jpeg_gives_the_model_nearly_the_same_input():
    from app.core.images import decode_for_model

    data = _encode(_photo(900, 900), "JPEG")
    reduced, _ = decode_for_model(data, min_side=224)
    size = (224, 224)
    via_reduced = np.asarray(Image.fromarray(reduced).resize(size, Image.Resampling.BILINEAR), np.float32)
    via_full = np.asarray(Image.fromarray(decode_image(data)).resize(size, Image.Resampling.BILINEAR), np.float32)
    assert np.abs(via_reduced - via_full).mean() < 2.0  # of 255 grey levels


def test_reduced_jpeg_keeps_exif_orientation_and_limits():
    from app.core.images import decode_for_model

    image = _photo(600, 1000)  # stored landscape, shown portrait (orientation 6 = rotate 90)
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    data = buffer.getvalue()
    array, original = decode_for_model(data, min_side=224)
    assert original == (1000, 600)
    assert array.shape == (500, 300, 3)  # rotated like decode_image, at 1/2 scale
    assert decode_image(data).shape == (1000, 600, 3)
    with pytest.raises(ImageTooLarge):
        decode_for_model(data, min_side=224, max_pixels=500_000)
    with pytest.raises(InvalidImage):
        decode_for_model(data[: len(data) // 2], min_side=224)


def test_png_goes_through_decode_image_unchanged():
    from app.core.images import decode_for_model

    data = _encode(_photo(500, 700), "PNG")
    array, original = decode_for_model(data, min_side=224)
    np.testing.assert_array_equal(array, decode_image(data))
    assert original == (500, 700)


# ------------------------------------------------------------------ stop 20 review fixes
def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _png(*extra: bytes, width: int = 8, height: int = 8, trailer: bytes = b"") -> bytes:
    rows = b"".join(b"\x00" + bytes(range(3 * width)) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + b"".join(extra) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"") + trailer)


def test_a_png_gets_one_verdict_whichever_decoder_is_free():
    """libspng refuses a PNG with an unknown chunk that Pillow reads; which one a decode got
    depended on load, so the same upload was refused alone and scored beside another."""
    import app.core.images as images

    data = _png(_chunk(b"ABCD", b"x"))
    alone = decode_image(data)
    with images._SPNG_SLOT:  # another decode holds libspng: this one goes to Pillow
        busy = decode_image(data)
    np.testing.assert_array_equal(alone, busy)


def test_bytes_after_iend_are_not_a_truncation():
    decoded = decode_image(_png(trailer=b"camera trailer \x00\x01"))
    assert decoded.shape == (8, 8, 3)
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(_png()[:-6])


def test_a_header_claiming_a_bomb_is_too_large_not_unreadable():
    """probe_image reads only the header: a PNG claiming 20000x20000 is 413, as a 5000x5000 one."""
    from app.core.images import probe_image

    header = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
              + _chunk(b"IDAT", zlib.compress(b"")))
    with pytest.raises(ImageTooLarge):
        probe_image(header)
