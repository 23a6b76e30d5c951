"""Image decoding and conversion: any size and mode in, (H, W, 3) uint8 RGB out."""

from __future__ import annotations

import io
import math
import re
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from app.core.errors import ImageTooLarge, InvalidImage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# The one list of formats the service accepts, for predict, staging and builds alike
# (PIL's format names; MPO is the multi-picture JPEG some cameras write). Anything
# else (GIF, ICO, TGA, PCX, AVIF, ...) is refused, not half-supported.
ACCEPTED_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP")
SUFFIX_OF_FORMAT = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "BMP": ".bmp", "TIFF": ".tif",
                    "WEBP": ".webp"}
DEFAULT_MAX_PIXELS = 40_000_000


def probe_image(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header alone, for an accepted format; no pixel is decoded."""
    if len(data) == 0:
        raise InvalidImage("empty image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format or "", image.size
    except Image.DecompressionBombError as exc:  # 413 as from the decoders, not 400
        raise ImageTooLarge(f"image is too large to decode ({_reason(exc)})") from exc
    except Exception as exc:  # PIL raises many types for hostile headers
        raise InvalidImage(f"not a readable image ({_reason(exc)})") from exc
    _check_format(fmt)
    return fmt, int(width), int(height)


def _check_format(fmt: str) -> None:
    if fmt not in ACCEPTED_FORMATS:
        raise InvalidImage(f"unsupported image format {fmt or 'unknown'}: accepted are PNG, JPEG, "
                           "BMP, TIFF and WebP")


def _reason(exc: BaseException) -> str:
    """A decoder's complaint without object reprs or paths (PIL puts '<_io.BytesIO object at
    0x...>' into some messages); the class name when nothing useful is left."""
    text = str(exc)
    if "object at 0x" in text or "/" in text or not text:
        return type(exc).__name__
    return text[:200]


_PNG_END = b"IEND\xaeB`\x82"
_FAST_PNG_MODES = ("RGB", "RGBA", "L", "LA", "P")


def _read_bytes(data: bytes | Path | str) -> bytes:
    """The encoded image: given as bytes, or read from a file (named without its directory)."""
    if not isinstance(data, Path | str):
        return data
    path = Path(data)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidImage(f"cannot read image file {path.name!r}: {exc.strerror}") from exc


_XMP_KEY = b"XML:com.adobe.xmp"
# What Pillow's getexif reads from XMP when there is no EXIF orientation; 1 (and 0) rotate nothing.
_XMP_ROTATION = re.compile(rb'tiff:Orientation(?:="|>)([2-8])')


def _png_may_rotate(image: Image.Image, data: bytes) -> bool:
    """Whether Pillow's path would rotate this PNG (an EXIF orientation, or an XMP one).

    Chunks before the image data are in `image.info` at open; those after it (an eXIf or
    XMP chunk may follow IDAT) are looked for in the bytes after the last IDAT only. So the
    fast path and Pillow's, taken when another thread holds the decoder, always agree, and
    the XMP most files carry without an orientation (every MVTec image has one after IDAT)
    keeps the fast path (9 ms for a 900 px frame instead of Pillow's 20).
    """
    info = image.info
    if "exif" in info or "Raw profile type exif" in info:
        return True
    xmp = info.get("XML:com.adobe.xmp") or info.get("xmp")
    if xmp and _XMP_ROTATION.search(xmp.encode("utf-8", "replace") if isinstance(xmp, str) else xmp):
        return True
    tail = data[max(0, data.rfind(b"IDAT")):]
    if b"eXIf" in tail or b"Raw profile type exif" in tail:
        return True
    at = tail.find(_XMP_KEY)
    if at < 0:
        return False
    compressed = tail[at + len(_XMP_KEY) + 1:at + len(_XMP_KEY) + 2] != b"\x00"  # iTXt's flag: unreadable here
    return compressed or _XMP_ROTATION.search(tail, at) is not None


def decode_image(data: bytes | Path | str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image into an RGB array of shape (H, W, 3), dtype uint8.

    The pixel count is checked from the header, before any pixel is decoded, so
    a decompression bomb costs nothing. Truncated files are refused, not padded.
    """
    data = _read_bytes(data)
    if len(data) == 0:
        raise InvalidImage("empty image")
    try:
        with warnings.catch_warnings():
            # We do our own pixel check; PIL's warning would be noise (or an error under pytest).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                _check_format(image.format or "")
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLarge(
                        f"image is {width}x{height} = {width * height} pixels, "
                        f"more than the limit of {max_pixels}"
                    )
                if image.format == "PNG" and image.mode in _FAST_PNG_MODES and not _png_may_rotate(image, data):
                    fast = _decode_png_fast(bytes(data))
                    if fast is not None:
                        return fast
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                return to_rgb_array(image)
    except (ImageTooLarge, InvalidImage):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image is too large to decode ({_reason(exc)})") from exc
    except MemoryError:
        raise
    except Exception as exc:
        # Every decoder failure is the client's image, whatever PIL raises for it
        # (OSError, SyntaxError, ValueError, RuntimeError from the AVIF/WebP plugins, ...).
        raise InvalidImage(f"cannot decode image ({_reason(exc)})") from exc


def decode_for_model(data: bytes | Path | str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     min_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode for a model that only needs `min_side` pixels on the short side.

    Returns (RGB array (h, w, 3) uint8, ORIGINAL (H, W) after EXIF orientation). JPEGs
    are decoded at a reduced scale (1/2, 1/4 or 1/8) in the DCT domain (libjpeg via
    PIL's `draft`) when that keeps the short side >= `min_side`: a 900x900 frame for a
    224 px model decodes at 225x225, several times faster and with 16x less memory.
    Everything else (PNG included) decodes exactly as `decode_image`; min_side=None
    never reduces. The map of a reduced image must still be laid over the original
    size, which is why it is returned.
    """
    data = _read_bytes(data)
    if min_side is not None and data[:3] == b"\xff\xd8\xff":
        reduced = _decode_jpeg_reduced(data, max_pixels, int(min_side))
        if reduced is not None:
            return reduced
    array = decode_image(data, max_pixels=max_pixels)
    return array, (int(array.shape[0]), int(array.shape[1]))


# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_AXES = {5, 6, 7, 8}


def _decode_jpeg_reduced(data: bytes, max_pixels: int | None,
                         min_side: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    if len(data) == 0:
        raise InvalidImage("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format != "JPEG" or image.mode not in ("RGB", "L", "CMYK", "YCbCr"):
                    return None
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLarge(
                        f"image is {width}x{height} = {width * height} pixels, "
                        f"more than the limit of {max_pixels}"
                    )
                orientation = image.getexif().get(0x0112, 1)
                original = (width, height) if orientation in _SWAPS_AXES else (height, width)
                # draft() picks the largest DCT scale whose result is still >= the request
                # on both sides; asking for min_side on the short side keeps the aspect.
                short = min(width, height)
                if short >= 2 * min_side:
                    scale = short / min_side
                    image.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                return to_rgb_array(image), original
    except (ImageTooLarge, InvalidImage):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image is too large to decode ({_reason(exc)})") from exc
    except MemoryError:
        raise
    except Exception as exc:  # as decode_image: every decoder failure is the client's image
        raise InvalidImage(f"cannot decode image ({_reason(exc)})") from exc


# pyspng holds the GIL for the whole decode; Pillow releases it. Measured on 2 cores,
# 900x900 RGB: pyspng 10 ms a frame, 2 threads together no faster (0.92x); Pillow 20 ms,
# 2 threads 2.5x. So one decode at a time takes the fast serial path, and a decode that
# starts while it is busy goes to Pillow, which runs beside it: a lone request keeps
# libspng's latency, and under load the other decode threads add to it instead of
# queueing for the GIL (16-vCPU H200 host, 16 threads: 74 -> 145 PNG decodes/s;
# README, GPU path).
_SPNG_SLOT = threading.Lock()


def _decode_png_fast(data: bytes) -> np.ndarray | None:
    """8-bit PNGs through libspng (pyspng): same pixels as PIL, about 2x faster
    (measured 12.5 vs 25 ms for a 900x900 RGB frame). None when pyspng is absent or
    another thread is decoding with it, or when libspng refuses the file (the caller then
    decodes with PIL, whose verdict is the one every PNG gets: which decoder a file meets
    depends on load, and libspng refuses some files PIL reads, e.g. an unknown chunk, so the
    same upload was accepted or refused by chance)."""
    # libspng accepts a stream cut inside its trailer; a camera upload cut short must be
    # refused, whichever decoder this one gets. Bytes after IEND are not a cut.
    if _PNG_END not in data[-4096:] and _PNG_END not in data:
        raise InvalidImage("truncated PNG (no IEND chunk)")
    try:
        import pyspng
    except ImportError:
        return None
    if not _SPNG_SLOT.acquire(blocking=False):
        return None
    try:
        return np.ascontiguousarray(pyspng.load(data, format="RGB"))
    except Exception:
        return None
    finally:
        _SPNG_SLOT.release()


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F) to (H, W, 3) uint8 RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and 32-bit grayscale: rescale the sensor's range to 8 bits
        # instead of letting PIL clip everything above 255 to white.
        values = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        gray = np.clip(values * (255.0 / peak), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidImage(f"unsupported image shape {array.shape}")
    return np.ascontiguousarray(array)


def as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """Accept a PIL image or an array (H, W), (H, W, 1|3|4) and return (H, W, 3) uint8."""
    if isinstance(image, Image.Image):
        return to_rgb_array(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) == 0:
        raise InvalidImage(f"expected an image array (H, W[, C]), got shape {array.shape}")
    if array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise InvalidImage(f"expected uint8 or uint16 pixels, got {array.dtype}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def list_images(folder: Path | str) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_images(paths: Iterable[Path | str], max_pixels: int | None = None) -> list[np.ndarray]:
    return [decode_image(Path(p), max_pixels=max_pixels) for p in paths]
