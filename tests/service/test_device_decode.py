"""JPEG bodies decoded by the batch worker on the model's device (PATCHCORE_DEVICE_DECODE).

A GPU host takes this path by default ("auto"); here "always" runs the same code on the
CPU, through real HTTP and the real bottle bank."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from app.core.errors import InvalidImage
from app.core.images import decode_image
from app.service.inference import prepare, score_prepared

from .conftest import metric_value

pytestmark = pytest.mark.slow


def _jpeg(path) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(decode_image(path)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _unreadable_jpeg(data: bytes) -> bytes:
    """Complete, with a plain baseline header, but a Huffman table no decoder can read."""
    return data.replace(b"\xff\xc4", b"\xff\xc4\x00\x03\x00", 1)


@contextlib.contextmanager
def _device_decode(server, mode: str) -> Iterator[None]:
    predictor = server.state.predictor
    before, predictor.device_decode = predictor.device_decode, mode
    try:
        yield
    finally:
        predictor.device_decode = before


def test_auto_decodes_on_the_device_only_for_cuda(server, bottle_job):
    predictor = server.state.predictor
    bottle = predictor.get("bottle")
    assert predictor.device_decode == "auto"
    assert predictor.decodes_on_device(bottle) is (bottle.embedder.device.type == "cuda")
    with _device_decode(server, "always"):
        assert predictor.decodes_on_device(bottle)
    with _device_decode(server, "off"):
        assert not predictor.decodes_on_device(bottle)


def test_a_batch_of_device_and_cpu_images_scores_each_as_its_png(server, bottle_job, bottle_good,
                                                                 bottle_defect):
    bottle = server.state.predictor.get("bottle")
    paths = [bottle_good[0], bottle_defect[0], bottle_defect[1]]
    pngs = score_prepared([prepare(bottle, p.read_bytes(), 10_000_000, False) for p in paths])
    jpegs = [_jpeg(p) for p in paths]
    items = [prepare(bottle, data, 10_000_000, False, device_decode=True) for data in jpegs]
    items.append(prepare(bottle, paths[0].read_bytes(), 10_000_000, False, device_decode=True))  # PNG
    items.append(prepare(bottle, _unreadable_jpeg(jpegs[0]), 10_000_000, False, device_decode=True))
    assert [item.encoded is not None for item in items] == [True, True, True, False, True]
    results = score_prepared(items)
    for png, on_device in zip(pngs, results[:3], strict=True):
        # The full-size decode + antialiased resize is close to the build's own pipeline: on the
        # whole bottle test set the device path moved scores from the PNG's by 1.7% at most, the
        # CPU path's reduced-scale decode by 7.2% (benchmarks/jpeg_auroc.py).
        assert on_device.raw_score == pytest.approx(png.raw_score, rel=0.02)
        assert on_device.is_anomalous == png.is_anomalous
        assert on_device.normalised_map.shape == png.normalised_map.shape == (900, 900)
    assert results[3].raw_score == pytest.approx(pngs[0].raw_score, rel=1e-4)
    assert isinstance(results[4], InvalidImage), "refused by the device and the CPU: fails alone"


def test_device_decoded_jpegs_through_http(server, http, bottle_job, bottle_good, bottle_defect):
    good, defect = _jpeg(bottle_good[0]), _jpeg(bottle_defect[0])
    with _device_decode(server, "off"):
        on_cpu = http.post("/v1/products/bottle/predict?heatmap=none", content=defect,
                           headers={"Content-Type": "image/jpeg"}).json()["results"][0]
    png = http.post("/v1/products/bottle/predict?heatmap=none", content=bottle_defect[0].read_bytes(),
                    headers={"Content-Type": "image/png"}).json()["results"][0]
    with _device_decode(server, "always"):
        response = http.post("/v1/products/bottle/predict?regions=true", content=defect,
                             headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        assert result["raw_score"] == pytest.approx(png["raw_score"], rel=0.02)
        assert result["is_anomalous"] and on_cpu["is_anomalous"]
        assert (result["width"], result["height"]) == (900, 900)
        heatmap = Image.open(io.BytesIO(_b64(result["heatmap"]["data"])))
        assert heatmap.size == (900, 900) and result["regions"]

        # Several images in one request; one of them the decoders cannot read.
        files = [("files", ("good.jpg", good, "image/jpeg")),
                 ("files", ("bad.jpg", _unreadable_jpeg(good), "image/jpeg"))]
        response = http.post("/v1/products/bottle/predict", files=files)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_image"
        assert "bad.jpg" in response.json()["error"]["message"]

        # A JPEG cut short never reaches the device: the CPU path refuses it as before.
        response = http.post("/v1/products/bottle/predict", content=good[: len(good) // 2],
                             headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_image"

        # An overlay needs the photo on the CPU: that request decodes there.
        response = http.post("/v1/products/bottle/predict?heatmap=overlay", content=good,
                             headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200
        assert response.json()["results"][0]["heatmap"]["kind"] == "overlay"

        ok = http.post("/v1/products/bottle/predict?heatmap=none", content=good,
                       headers={"Content-Type": "image/jpeg"})
        assert ok.status_code == 200 and not ok.json()["results"][0]["is_anomalous"]

    # Operators see which way JPEG bodies went: the unreadable one fell back to the CPU.
    text = http.get("/metrics").text
    assert metric_value(text, "patchcore_device_decoded_images_total") >= 3
    assert metric_value(text, "patchcore_device_decode_fallbacks_total") >= 1


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def test_a_region_of_interest_frames_device_decoded_jpegs(server, bottle_job, bottle_good):
    """The framed box is cut from the full-size frame on the device as on the CPU."""
    import dataclasses

    from app.core.framing import Framing

    bottle = server.state.predictor.get("bottle")
    framed = dataclasses.replace(bottle, model=_framed_model(bottle.model,
                                                             Framing(mode="roi", roi=(100, 80, 820, 860))))
    data = _jpeg(bottle_good[1])
    on_cpu, on_device = score_prepared([prepare(framed, data, 10_000_000, False),
                                        prepare(framed, data, 10_000_000, False, device_decode=True)])
    assert on_device.raw_score == pytest.approx(on_cpu.raw_score, rel=0.03)
    assert on_device.box == on_cpu.box == (100.0, 80.0, 820.0, 860.0)
    outside = np.asarray(on_device.normalised_map)[:, :100]
    assert np.all(outside == 0), "the map is zero outside the region of interest"


def _framed_model(model, framing):
    import copy

    framed = copy.copy(model)
    framed.framing = framing
    return framed


def test_a_device_that_fails_the_start_probe_leaves_jpegs_on_the_cpu(server, bottle_job, monkeypatch, caplog):
    from app.core import device_decode

    predictor = server.state.predictor
    bottle = predictor.get("bottle")
    with _device_decode(server, "always"):
        with caplog.at_level("INFO", logger="app.service.predictor"):
            predictor._check_device_decode(bottle.embedder.device)
        assert predictor.device_decode == "always", "the CPU passes the probe"
        assert "JPEG bodies decode on the cpu device" in caplog.text
        monkeypatch.setattr(device_decode, "_decode", lambda encoded, device: [])
        predictor._check_device_decode(bottle.embedder.device)
        assert predictor.device_decode == "off" and not predictor.decodes_on_device(bottle)
        assert "JPEG bodies decode on the CPU" in caplog.text


def test_a_region_of_interest_outside_the_frame_is_refused_as_on_the_cpu(server, bottle_job, bottle_good):
    import dataclasses

    from app.core.framing import Framing

    bottle = server.state.predictor.get("bottle")
    framed = dataclasses.replace(bottle, model=_framed_model(bottle.model, Framing(mode="roi",
                                                                                   roi=(950, 950, 999, 999))))
    data = _jpeg(bottle_good[0])  # 900x900: the region lies outside it
    with pytest.raises(InvalidImage) as on_cpu:
        prepare(framed, data, 10_000_000, False)
    with pytest.raises(InvalidImage) as on_device:
        prepare(framed, data, 10_000_000, False, device_decode=True)
    assert str(on_device.value) == str(on_cpu.value)
