"""JPEG bodies decoded, framed, resized and normalised on the model's device (issue 9).

On a GPU host every JPEG body costs the CPU a decode (2 ms for a 900x900 frame at
reduced DCT scale) and a resize + normalisation (about 1 ms), in the process that
also runs the HTTP server and the batch worker under one GIL: on an H200 one
service process stalled near 420 images/s while the device alone does 2,440
(README, GPU path). nvJPEG decodes a batch of 64 frames at 0.13 ms a frame on the
same host, so the service can hand the encoded bytes to the batch worker, which
decodes, frames, resizes and normalises them on the device in one go.

Only plain JPEGs take this way (`device_jpeg_size`): baseline or extended sequential
Huffman, grayscale or YCbCr, no EXIF rotation, no Adobe RGB transform, complete (ends
in EOI) and at most MAX_DEVICE_PIXELS. Anything else, and any frame the device
decoder refuses, takes the CPU path (app.core.images), whose rules and error
messages stay the one reference.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from app.core.framing import Box

# A bigger frame decodes at reduced DCT scale on the CPU for less than nvJPEG's full decode
# would hold on the device (3 bytes a pixel: 48 MB at 16 MP).
MAX_DEVICE_PIXELS = 16_000_000
# Decoded frames of one nvJPEG call together: 64 MP = 192 MB of uint8 on the device at once;
# each chunk is resized to the network size before the next is decoded.
CHUNK_PIXELS = 64_000_000

# Start-of-frame markers nvJPEG and libjpeg decode alike: baseline and extended sequential
# Huffman. Progressive, lossless and arithmetic-coded frames go to the CPU.
_SEQUENTIAL_SOF = (0xC0, 0xC1)
_ANY_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_END = b"\xff\xd9"


def _frame_marker(data: bytes) -> int | None:
    """The JPEG's start-of-frame marker (0xC0 ...), walking the segments up to it."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _ANY_SOF:
            return marker
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            position += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header: not a valid JPEG
            return None
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None


def device_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(H, W) of a JPEG the device decoder can take as it is, else None.

    Reads the header only. The caller has already checked the format and the pixel limit
    (`probe_image`); a None sends the body down the CPU path, which decides about it."""
    if data[:3] != b"\xff\xd8\xff" or not data.rstrip(b"\x00").endswith(_JPEG_END):
        return None  # not a JPEG, or cut short: the CPU decoder refuses it with a clear message
    if _frame_marker(data) not in _SEQUENTIAL_SOF:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None  # MPO, CMYK/YCCK
            if image.info.get("adobe") is not None and image.info.get("adobe_transform") == 0:
                return None  # RGB stored without the YCbCr transform
            if image.getexif().get(0x0112, 1) != 1:
                return None  # rotated by EXIF: the CPU path turns it upright
            width, height = image.size
    except Exception:  # noqa: BLE001 - an unreadable header is the CPU path's to refuse
        return None
    if width * height > MAX_DEVICE_PIXELS or width < 1 or height < 1:
        return None
    return int(height), int(width)


def probe(device: torch.device) -> str | None:
    """None when JPEGs decode on `device`, else why not (e.g. a torchvision built without
    nvJPEG). Decodes one small generated frame: run once at start, so a host whose device
    cannot decode never tries it per batch."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 60)).save(buffer, "JPEG", quality=90)
    try:
        [image] = _decode([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)], device)
    except Exception as exc:  # noqa: BLE001 - any failure means "not on this device"
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    if tuple(image.shape) != (3, 24, 32) or image.device.type != device.type:
        return f"decoded to {tuple(image.shape)} on {image.device}, not (3, 24, 32) on {device}"
    return None


def _decode(encoded: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; the call is
        # the same in every version this project allows (torchvision<=0.29.1).
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)
    return list(decoded) if isinstance(decoded, list | tuple) else [decoded]


def decode_to_network_input(
        jpegs: Sequence[tuple[bytes, tuple[int, int], Box | None]], device: torch.device,
        preprocess: Callable[..., torch.Tensor],
        chunk_pixels: int = CHUNK_PIXELS,
        shapes: Sequence[tuple[int, int]] | None = None) -> list[torch.Tensor | None]:
    """Decode JPEGs on `device` and turn each into the network input (3, h, w) there.

    jpegs: (encoded bytes, (H, W) from `device_jpeg_size`, framed box in original pixels
    or None). preprocess: the embedder's `preprocess_decoded`, called with each frame's
    input shape from `shapes` when given (aspect-kept framing). Frames are decoded in
    chunks of at most `chunk_pixels`; a chunk the decoder refuses is retried frame by
    frame, and a frame it still refuses (or that comes out at another size than its
    header said) gives None, for the caller to decode on the CPU.
    """
    results: list[torch.Tensor | None] = [None] * len(jpegs)
    start = 0
    while start < len(jpegs):
        stop, pixels = start, 0
        while stop < len(jpegs) and (stop == start or pixels + _pixels(jpegs[stop]) <= chunk_pixels):
            pixels += _pixels(jpegs[stop])
            stop += 1
        chunk = range(start, stop)
        encoded = [torch.frombuffer(bytearray(jpegs[i][0]), dtype=torch.uint8) for i in chunk]
        try:
            decoded: list[torch.Tensor | None] = list(_decode(encoded, device))
        except RuntimeError:
            decoded = []
            for tensor in encoded:  # one bad frame must not send its whole chunk to the CPU
                try:
                    decoded.append(_decode([tensor], device)[0])
                except RuntimeError:
                    decoded.append(None)
        for i, image in zip(chunk, decoded, strict=True):
            if image is not None and tuple(image.shape[-2:]) == jpegs[i][1]:
                results[i] = (preprocess(image, jpegs[i][2]) if shapes is None
                              else preprocess(image, jpegs[i][2], shapes[i]))
        del decoded, encoded
        start = stop
    return results


def _pixels(jpeg: tuple[bytes, tuple[int, int], Box | None]) -> int:
    return jpeg[1][0] * jpeg[1][1]
