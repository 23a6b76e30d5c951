"""Property-based mutation of real images in every format a camera might send
(hypothesis: truncation, byte flips, header edits): decoding either works or raises
the two client errors, and through HTTP the answer is always 200 or a 4xx, never 5xx."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from app.core.errors import ImageTooLarge, InvalidImage
from app.core.images import decode_image

from .conftest import serving

FORMATS = ["PNG", "JPEG", "TIFF", "WEBP", "BMP", "GIF"] + (["AVIF"] if features.check("avif") else [])


def _encoded(source: Path) -> dict[str, bytes]:
    """A real photo (a bottle from ../shared/data), small, in every format."""
    with Image.open(source) as image:
        small = image.convert("RGB").resize((96, 96))
    out = {}
    for fmt in FORMATS:
        buffer = io.BytesIO()
        small.save(buffer, format=fmt)
        out[fmt] = buffer.getvalue()
    return out


@pytest.fixture(scope="module")
def encoded(bottle_good) -> dict[str, bytes]:
    return _encoded(bottle_good[0])


@st.composite
def mutations(draw, originals: dict[str, bytes]) -> bytes:
    data = bytearray(originals[draw(st.sampled_from(list(originals)))])
    kind = draw(st.sampled_from(["truncate", "flip", "header", "zero_run", "splice"]))
    if kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 16))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
    elif kind == "header":
        # The first 64 bytes hold magic numbers, sizes and chunk lengths.
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, min(63, len(data) - 1)))] = draw(st.integers(0, 255))
    elif kind == "zero_run":
        start = draw(st.integers(0, len(data) - 1))
        length = draw(st.integers(1, 256))
        data[start:start + length] = bytes(min(length, len(data) - start))
    else:
        start = draw(st.integers(0, len(data) - 1))
        data[start:start] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def test_every_mutation_decodes_or_is_a_client_error(encoded):
    @given(data=mutations(encoded))
    @settings(max_examples=600, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(data: bytes) -> None:
        try:
            image = decode_image(data, max_pixels=4_000_000)
        except (InvalidImage, ImageTooLarge) as exc:
            assert "0x" not in str(exc) and "/" not in str(exc), str(exc)
            return
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3

    run()


def _post_mutations(http, originals: dict[str, bytes], examples: int, content_type: str,
                    params: dict[str, str]) -> dict[int, int]:
    """POST `examples` mutations of `originals` to the tile product; every answer must be 200 or
    one of the client errors. Returns the count of each status code."""
    outcomes: dict[int, int] = {}

    @given(data=mutations(originals))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(data: bytes) -> None:
        response = http.post("/v1/products/tile/predict", content=data,
                             headers={"Content-Type": content_type}, params=params)
        outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
        assert response.status_code == 200 or 400 <= response.status_code < 500, (
            response.status_code, response.text[:300])
        if response.status_code != 200:
            assert response.json()["error"]["code"] in ("invalid_image", "image_too_large", "empty_body")

    run()
    return outcomes


@pytest.mark.slow
def test_mutated_images_over_http_are_200_or_4xx(tmp_path, encoded, tile_bank):
    with serving(tmp_path, tile_bank) as live, live.client() as http:
        outcomes = _post_mutations(http, encoded, 300, "application/octet-stream",
                                   {"heatmap": "overlay", "regions": "true"})
        # The same keep-alive connection still serves.
        ok = http.post("/v1/products/tile/predict", content=encoded["PNG"],
                       headers={"Content-Type": "image/png"}, params={"heatmap": "none"})
        assert ok.status_code == 200
    print(f"mutated images over HTTP: {sorted(outcomes.items())}")
    assert outcomes.get(200, 0) + sum(v for k, v in outcomes.items() if 400 <= k < 500) == sum(outcomes.values())


@pytest.mark.slow
def test_mutated_jpegs_decoded_on_the_device_path_are_200_or_4xx(tmp_path, encoded, tile_bank):
    """The same over the device decode path (PATCHCORE_DEVICE_DECODE=always runs it on the CPU):
    a mutated JPEG that passes the header check reaches the batch worker's decoder, and a frame
    the decoder refuses goes to the CPU path. Never a 5xx."""
    with serving(tmp_path, tile_bank, device_decode="always") as live, live.client() as http:
        outcomes = _post_mutations(http, {"JPEG": encoded["JPEG"]}, 200, "image/jpeg", {"heatmap": "png"})
        assert live.state.predictor.device_decode == "always"
        ok = http.post("/v1/products/tile/predict", content=encoded["JPEG"],
                       headers={"Content-Type": "image/jpeg"}, params={"heatmap": "none"})
        assert ok.status_code == 200
    print(f"mutated JPEGs over the device path: {sorted(outcomes.items())}")
    assert outcomes.get(200, 0) > 0 and sum(v for k, v in outcomes.items() if 400 <= k < 500) > 0
