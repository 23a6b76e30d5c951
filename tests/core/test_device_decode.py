"""JPEG decoding on the model's device (app.core.device_decode), run here on the CPU:
the same code takes nvJPEG on a CUDA device (tests/test_cuda.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.core import device_decode
from app.core.device_decode import decode_to_network_input, device_jpeg_size
from app.core.images import decode_image

CPU = torch.device("cpu")


def _jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=95, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def frame(shared_data) -> np.ndarray:
    return decode_image(sorted((shared_data / "bottle" / "test" / "broken_small").glob("*.png"))[0])


def test_only_plain_complete_jpegs_go_to_the_device(frame, shared_data):
    plain = _jpeg(frame)
    assert device_jpeg_size(plain) == (900, 900)
    tile = sorted((shared_data / "magnetic_tile" / "test" / "good").glob("*.jpg"))[0]
    with Image.open(tile) as image:
        assert image.mode == "L"
        width, height = image.size
    assert device_jpeg_size(tile.read_bytes()) == (height, width)  # grayscale: decoded as RGB
    wide = _jpeg(np.ascontiguousarray(frame[:300]))
    assert device_jpeg_size(wide) == (300, 900)

    png = io.BytesIO()
    Image.fromarray(frame).save(png, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the CPU path turns it upright
    refused = {
        "progressive": _jpeg(frame, progressive=True),
        "cut short": plain[: len(plain) * 2 // 3],
        "cmyk": _jpeg_cmyk(frame),
        "exif-rotated": _jpeg(frame, exif=exif),
        "png": png.getvalue(),
        "not an image": b"\xff\xd8\xff" + bytes(100) + b"\xff\xd9",
    }
    for name, data in refused.items():
        assert device_jpeg_size(data) is None, name


def _jpeg_cmyk(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).convert("CMYK").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_frames_over_the_device_pixel_limit_stay_on_the_cpu(frame, monkeypatch):
    monkeypatch.setattr(device_decode, "MAX_DEVICE_PIXELS", 900 * 900 - 1)
    assert device_jpeg_size(_jpeg(frame)) is None


def test_device_input_matches_the_cpu_preprocessing_of_the_same_pixels(frame, lite0):
    data = _jpeg(frame)
    pixels = decode_image(data)  # PIL's full-size decode: the same libjpeg-turbo
    decoded = device_decode._decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)], CPU)[0]
    assert decoded.dtype == torch.uint8 and tuple(decoded.shape) == (3, 900, 900)
    assert float((decoded.permute(1, 2, 0).float() - torch.tensor(pixels).float()).abs().mean()) < 0.5

    [network_input] = decode_to_network_input([(data, (900, 900), None)], CPU, lite0.preprocess_decoded)
    want = lite0.preprocess_one(pixels)
    assert network_input.shape == want.shape == (3, 224, 224)
    # One grey level is 1/128 of the normalised scale; the CPU path box-reduces 2x first.
    assert float((network_input - want).abs().mean()) < 0.01

    box = (100.4, 50.6, 700.2, 850.8)
    framed = decode_to_network_input([(data, (900, 900), box)], CPU, lite0.preprocess_decoded)[0]
    # 0.011 measured with the default exposure normalisation: the CPU path's sub-pixel box moves
    # the frame's mean and spread a little, and every pixel with them (under 0.01 with "dataset").
    assert float((framed - lite0.preprocess_one(pixels, box)).abs().mean()) < 0.02


def test_device_input_keeps_the_aspect_as_the_cpu_path_does(frame, lite0):
    """An aspect-kept product (framing) gets each frame at its own input shape on both paths."""
    from app.core.framing import Framing

    wide = np.ascontiguousarray(frame[:300])
    data = _jpeg(wide)
    shape = Framing().input_shape_for((300, 900), 224)
    assert shape == (128, 384)
    [network_input] = decode_to_network_input([(data, (300, 900), None)], CPU, lite0.preprocess_decoded,
                                              shapes=[shape])
    want = lite0.preprocess_one(decode_image(data), None, shape)
    assert network_input.shape == want.shape == (3, *shape)
    assert float((network_input - want).abs().mean()) < 0.01


def test_device_input_with_image_normalisation_matches_the_cpu_path(frame):
    from app.core.embedding import EmbedderConfig, create_embedder

    embedder = create_embedder(EmbedderConfig(image_size=128, normalisation="image"), device="cpu")
    data = _jpeg(frame)
    pixels = decode_image(data)
    box = (100.4, 50.6, 700.2, 850.8)
    for frame_box in (None, box):
        [network_input] = decode_to_network_input([(data, (900, 900), frame_box)], CPU,
                                                  embedder.preprocess_decoded)
        # Measured at 128 px: 0.0025 whole, 0.010 framed (0.0014 / 0.0047 with "dataset"): the CPU
        # path's sub-pixel box moves the frame's mean and spread a little, and every pixel with them.
        assert float((network_input - embedder.preprocess_one(pixels, frame_box)).abs().mean()) < 0.02


def test_a_frame_the_decoder_refuses_fails_alone(frame, lite0, monkeypatch):
    good, bad = _jpeg(frame), _jpeg(np.ascontiguousarray(frame[::-1]))
    real = device_decode._decode
    calls: list[int] = []

    def decode(encoded, device):
        calls.append(len(encoded))
        if any(bytes(t.numpy()) == bad for t in encoded):
            raise RuntimeError("nvjpegDecode failed")  # as nvJPEG reports a frame it cannot take
        return real(encoded, device)

    monkeypatch.setattr(device_decode, "_decode", decode)
    results = decode_to_network_input([(good, (900, 900), None), (bad, (900, 900), None),
                                       (good, (900, 900), None)], CPU, lite0.preprocess_decoded)
    assert calls == [3, 1, 1, 1], "the chunk fails, then each frame is tried alone"
    assert results[1] is None
    assert results[0] is not None and torch.equal(results[0], results[2])


def test_a_frame_decoded_at_another_size_than_its_header_is_refused(frame, lite0):
    data = _jpeg(frame)
    [result] = decode_to_network_input([(data, (900, 901), None)], CPU, lite0.preprocess_decoded)
    assert result is None


def test_chunks_bound_the_pixels_decoded_at_once(frame, lite0, monkeypatch):
    jpegs = [(_jpeg(frame), (900, 900), None)] * 5
    real = device_decode._decode
    calls: list[int] = []

    def decode(encoded, device):
        calls.append(len(encoded))
        return real(encoded, device)

    monkeypatch.setattr(device_decode, "_decode", decode)
    whole = decode_to_network_input(jpegs, CPU, lite0.preprocess_decoded)
    chunked = decode_to_network_input(jpegs, CPU, lite0.preprocess_decoded, chunk_pixels=2 * 900 * 900)
    assert calls == [5, 2, 2, 1]
    for a, b in zip(whole, chunked, strict=True):
        assert a is not None and b is not None and torch.equal(a, b)


def test_the_start_probe_says_why_a_device_cannot_decode(monkeypatch):
    assert device_decode.probe(CPU) is None

    def broken(encoded, device):
        raise RuntimeError("torchvision not compiled with nvJPEG support")

    monkeypatch.setattr(device_decode, "_decode", broken)
    assert "nvJPEG" in device_decode.probe(CPU)
