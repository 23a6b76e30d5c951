"""Per-product framing: which part of the camera frame the backbone sees.

    whole   the whole frame, resized to image_size x image_size (any aspect)
    centre  the central `fraction` of the frame's width and height (0.875 is the
            official code's resize-256-then-crop-224, for any aspect)
    roi     an explicit box (x0, y0, x1, y1) in ORIGINAL-image pixels, x1/y1 exclusive

Boxes are kept in original-image pixels, so an image that was decoded at a
reduced scale is cropped at box * (array size / original size), and the
anomaly map is pasted back onto the original frame (zero outside the box).

The framed box then goes to the network at one of two input shapes (`aspect`):

    keep     about S x S pixels in all, the box's own aspect kept (sides rounded to
             16 px, aspect capped at 4:1): a square box gets exactly S x S (the default
             since stop 21)
    squeeze  exactly S x S whatever the box's aspect (banks built before stop 21)

Squeezing stretches each frame's texture by its own aspect: magnetic_tile's tiles range
from 0.37 to 2.6 in aspect, and keeping it lifted their pixel AUROC (README, issue 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FRAMING_MODES = ("whole", "centre", "roi")
ASPECT_MODES = ("keep", "squeeze")
# Beyond 4:1 the box is squeezed to 4:1: a line-scan strip must not become a 32-px-high
# input with a hundred columns of patches (the input area stays about S x S either way).
MAX_ASPECT = 4.0
# The backbone's coarser stage has stride 16: sides in multiples of 16 keep its map aligned.
INPUT_SIDE_STEP = 16
# A centre crop keeps at least this share of each side: 5e-324 passed "> 0", built, and made
# every predict fail on an infinite decode size.
MIN_CENTRE_FRACTION = 0.05

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Framing:
    mode: str = "whole"
    fraction: float = 1.0                          # centre mode only
    roi: tuple[int, int, int, int] | None = None   # roi mode only: x0, y0, x1, y1 in original pixels
    aspect: str = "keep"                           # the network input's shape (module docstring)

    def validate(self) -> None:
        if self.mode not in FRAMING_MODES:
            raise ValueError(f"framing mode must be one of {', '.join(FRAMING_MODES)}, got {self.mode!r}")
        if self.aspect not in ASPECT_MODES:
            raise ValueError(f"aspect must be one of {', '.join(ASPECT_MODES)}, got {self.aspect!r}")
        if self.mode == "centre" and not MIN_CENTRE_FRACTION <= self.fraction <= 1.0:
            raise ValueError(f"centre-crop fraction must be in [{MIN_CENTRE_FRACTION:g}, 1], got {self.fraction!r}")
        if self.mode == "roi":
            if self.roi is None or len(self.roi) != 4:
                raise ValueError("roi framing needs a box x0,y0,x1,y1 in original-image pixels")
            x0, y0, x1, y1 = self.roi
            if min(x0, y0) < 0 or x1 <= x0 or y1 <= y0:
                raise ValueError(f"roi {self.roi} must satisfy 0 <= x0 < x1 and 0 <= y0 < y1")
        elif self.roi is not None:
            raise ValueError("a roi is only allowed with mode 'roi'")

    def box(self, height: int, width: int) -> Box:
        """The framed box (x0, y0, x1, y1) in the original image's pixels, clipped to it."""
        if self.mode == "centre":
            margin_x, margin_y = 0.5 * (1.0 - self.fraction) * width, 0.5 * (1.0 - self.fraction) * height
            return (margin_x, margin_y, width - margin_x, height - margin_y)
        if self.mode == "roi" and self.roi is not None:
            x0, y0, x1, y1 = (float(v) for v in self.roi)
            box = (min(x0, width), min(y0, height), min(x1, width), min(y1, height))
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                raise ValueError(f"roi {self.roi} lies outside the {width}x{height} image")
            return box
        return (0.0, 0.0, float(width), float(height))

    def scaled_box(self, array_size: tuple[int, int], original_size: tuple[int, int]) -> Box:
        """The framed box in the pixels of an array decoded at array_size (H, W) from an
        image of original_size (H, W), e.g. by a reduced-scale JPEG decode."""
        x0, y0, x1, y1 = self.box(*original_size)
        sy, sx = array_size[0] / original_size[0], array_size[1] / original_size[1]
        return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)

    def input_shape(self, box_height: float, box_width: float, size: int) -> tuple[int, int]:
        """(H, W) of the network input for a framed box of box_height x box_width pixels
        (any units: only its aspect counts), at image size S = `size`."""
        if self.aspect == "squeeze" or box_height <= 0 or box_width <= 0:
            return size, size
        ratio = min(max(box_width / box_height, 1.0 / MAX_ASPECT), MAX_ASPECT)
        return _input_side(size / math.sqrt(ratio)), _input_side(size * math.sqrt(ratio))

    def input_shape_for(self, original_size: tuple[int, int], size: int) -> tuple[int, int]:
        """The network input's (H, W) for a photo of original_size (H, W): from its framed box
        in original pixels, so a reduced-scale decode of the same photo gets the same shape."""
        if self.aspect == "squeeze":
            return size, size
        x0, y0, x1, y1 = self.box(int(original_size[0]), int(original_size[1]))
        return self.input_shape(y1 - y0, x1 - x0, size)

    def min_decode_side(self, network_side: int) -> int | None:
        """The short side a reduced-scale decode must keep for the framed box to still
        get `network_side` pixels; None = decode at full size (a roi's share of the
        frame is unknown before the image's size is). With the aspect kept the input's
        short side is at most `network_side`, so the same bound holds."""
        if self.mode == "roi":
            return None
        if self.mode == "centre":
            return int(-(-network_side // self.fraction))
        return network_side

    def is_whole(self) -> bool:
        return self.mode == "whole" or (self.mode == "centre" and self.fraction == 1.0)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "fraction": self.fraction, "roi": list(self.roi) if self.roi else None,
                "aspect": self.aspect}

    @classmethod
    def from_dict(cls, data: dict | None) -> Framing:
        """From a manifest or a request. Banks from before framing existed saw the whole
        frame, and banks from before stop 21 (no "aspect") saw it squeezed to S x S."""
        if not data:
            return cls(aspect="squeeze")
        roi = data.get("roi")
        framing = cls(mode=str(data.get("mode", "whole")), fraction=float(data.get("fraction", 1.0)),
                      roi=_box4(roi) if roi is not None else None, aspect=str(data.get("aspect", "squeeze")))
        framing.validate()
        return framing

    @classmethod
    def parse(cls, centre_crop: float | None = None, roi: str | None = None, aspect: str = "keep") -> Framing:
        """From CLI-style options: a centre fraction, or 'x0,y0,x1,y1'; neither = whole frame."""
        if centre_crop is not None and roi:
            raise ValueError("give either a centre-crop fraction or a roi, not both")
        if roi:
            try:
                values = tuple(int(v) for v in roi.split(","))
            except ValueError as exc:
                raise ValueError(f"roi must be x0,y0,x1,y1 in pixels, got {roi!r}") from exc
            if len(values) != 4:
                raise ValueError(f"roi must be x0,y0,x1,y1 in pixels, got {roi!r}")
            framing = cls(mode="roi", roi=_box4(values), aspect=aspect)
        elif centre_crop is not None and centre_crop != 1.0:
            framing = cls(mode="centre", fraction=float(centre_crop), aspect=aspect)
        else:
            framing = cls(aspect=aspect)
        framing.validate()
        return framing

    def describe(self) -> str:
        if self.mode == "centre":
            part = f"centre {self.fraction:g}"
        elif self.mode == "roi" and self.roi is not None:
            part = "roi " + ",".join(str(v) for v in self.roi)
        else:
            part = "whole frame"
        return part + (", aspect kept" if self.aspect == "keep" else ", squeezed")


def _input_side(side: float) -> int:
    return max(32, int(math.floor(side / INPUT_SIDE_STEP + 0.5)) * INPUT_SIDE_STEP)


def _box4(values) -> tuple[int, int, int, int]:
    if len(values) != 4:
        raise ValueError(f"roi must have 4 values x0,y0,x1,y1, got {values!r}")
    x0, y0, x1, y1 = (int(v) for v in values)
    return x0, y0, x1, y1


def paste_box(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer pixel box of the original image that a framed map is pasted onto."""
    x0, y0, x1, y1 = box
    ix0, iy0 = max(0, int(round(x0))), max(0, int(round(y0)))
    ix1, iy1 = min(width, max(ix0 + 1, int(round(x1)))), min(height, max(iy0 + 1, int(round(y1))))
    return ix0, iy0, ix1, iy1
