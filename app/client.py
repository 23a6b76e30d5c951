"""Python client for the PatchCore service (httpx): sync `PatchCoreClient`, async
`AsyncPatchCoreClient`. Every non-2xx answer raises `PatchCoreAPIError`.

    with PatchCoreClient("http://127.0.0.1:8000", api_key="...") as client:
        result = client.predict("bottle", Path("photo.png"), heatmap="none")
"""

from __future__ import annotations

import asyncio
import mimetypes
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

ImageInput = bytes | Path | str


class PatchCoreAPIError(Exception):
    """An error answer from the service: HTTP status, stable code, message."""

    def __init__(self, status: int, code: str, message: str,
                 retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    code, message = "http_error", response.text[:500]
    try:
        error = response.json().get("error", {})
        code = str(error.get("code", code))
        message = str(error.get("message", message))
    except (ValueError, AttributeError):
        pass
    retry = response.headers.get("retry-after")
    raise PatchCoreAPIError(response.status_code, code, message,
                            float(retry) if retry and retry.isdigit() else None)


def _lost_on_the_way(response: httpx.Response) -> bool:
    """A 5xx that the service did not write (no error JSON): a gateway's answer, e.g. Ray Serve's
    proxy when the replica died mid-request, or 502/503/504 from a load balancer."""
    if response.status_code not in (500, 502, 503, 504):
        return False
    try:
        return not isinstance(response.json().get("error"), dict)
    except (ValueError, AttributeError):
        return True


# Connection refused/reset, a dropped keep-alive connection, a read cut short.
_RETRIABLE = (httpx.TransportError,)
RETRY_BACKOFF_S = 0.05


def _json(response: httpx.Response) -> Any:
    _raise_for(response)
    return None if response.status_code == 204 or not response.content else response.json()


def _file_part(image: ImageInput, index: int) -> tuple[str, tuple[str, bytes, str]]:
    if isinstance(image, bytes | bytearray):
        return "files", (f"image{index}", bytes(image), "application/octet-stream")
    path = Path(image)
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return "files", (path.name, path.read_bytes(), kind)


def _raw_image(image: ImageInput) -> tuple[bytes, str]:
    if isinstance(image, bytes | bytearray):
        return bytes(image), "application/octet-stream"
    path = Path(image)
    kind = mimetypes.guess_type(path.name)[0]
    return path.read_bytes(), kind if kind and kind.startswith("image/") else \
        "application/octet-stream"


def _predict_params(heatmap: str, regions: bool) -> dict[str, str]:
    return {"heatmap": heatmap, "regions": "true" if regions else "false"}


def _build_body(coreset_ratio: float | None, backbone: str | None, seed: int | None,
                mode: str = "full", base_version: str | None = None, until: str = "size",
                options: dict[str, Any] | None = None) -> dict:
    # options: the other BuildRequest fields (image_size, centre_crop, roi, false_alarm_rate, ...)
    body: dict[str, Any] = {k: v for k, v in (options or {}).items() if v is not None}
    body.update({"mode": mode, "until": until})
    if base_version is not None:
        body["base_version"] = base_version
    if coreset_ratio is not None:
        body["coreset_ratio"] = coreset_ratio
    if backbone is not None:
        body["backbone"] = backbone
    if seed is not None:
        body["seed"] = seed
    return body


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


_TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")


class PatchCoreClient:
    """Synchronous client. `transport` lets tests pass an in-process transport.

    `retries`: predictions are idempotent, so `predict`/`predict_many` send again (up to
    `retries` more times, short backoff) after a connection error or a gateway's 5xx
    (a replica lost mid-request). Service errors (4xx, the service's own 5xx) never retry.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None, retries: int = 0):
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport,
                                  headers=_headers(api_key))
        self.retries = retries

    def _post_idempotent(self, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.post(url, **kwargs)
            except _RETRIABLE:
                if last:
                    raise
            else:
                if last or not _lost_on_the_way(response):
                    return response
            time.sleep(RETRY_BACKOFF_S * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PatchCoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- predictions
    def predict(self, product: str, image: ImageInput, heatmap: str = "png",
                regions: bool = False) -> dict:
        """Score one image (sent as a raw body); returns its result."""
        data, kind = _raw_image(image)
        response = self._post_idempotent(f"/v1/products/{product}/predict", content=data,
                                         headers={"Content-Type": kind},
                                         params=_predict_params(heatmap, regions))
        return _json(response)["results"][0]

    def predict_many(self, product: str, images: Sequence[ImageInput], heatmap: str = "png",
                     regions: bool = False) -> list[dict]:
        """Score several images in one multipart request; results in input order."""
        files = [_file_part(image, i) for i, image in enumerate(images)]
        response = self._post_idempotent(f"/v1/products/{product}/predict", files=files,
                                         params=_predict_params(heatmap, regions))
        return _json(response)["results"]

    # ---------------------------------------------------------------- products
    def products(self) -> dict:
        return _json(self._http.get("/v1/products"))

    def product(self, name: str) -> dict:
        return _json(self._http.get(f"/v1/products/{name}"))

    # ---------------------------------------------------------------- admin
    def upload_nominal(self, product: str, files: Iterable[ImageInput]) -> dict:
        """Add images (or one .zip) to the product's staging set."""
        parts = [_file_part(f, i) for i, f in enumerate(files)]
        return _json(self._http.post(f"/v1/admin/products/{product}/nominal", files=parts))

    def list_nominal(self, product: str) -> dict:
        return _json(self._http.get(f"/v1/admin/products/{product}/nominal"))

    def clear_nominal(self, product: str) -> dict:
        return _json(self._http.delete(f"/v1/admin/products/{product}/nominal"))

    def start_build(self, product: str, coreset_ratio: float | None = None,
                    backbone: str | None = None, seed: int | None = None, *, mode: str = "full",
                    base_version: str | None = None, until: str = "size", **options: Any) -> dict:
        """mode="append": extend base_version (default: the active one) with the new staged images.
        `options`: the other BuildRequest fields (image_size, centre_crop, roi, false_alarm_rate)."""
        return _json(self._http.post(
            f"/v1/admin/products/{product}/builds",
            json=_build_body(coreset_ratio, backbone, seed, mode, base_version, until, options)))

    def send_feedback(self, product: str, image: ImageInput | None = None, *, request_id: str | None = None,
                      index: int | None = None) -> dict:
        """Stage a confirmed false alarm: the image, or a recent prediction's by its X-Request-ID."""
        if image is not None:
            data, kind = _raw_image(image)
            return _json(self._http.post(f"/v1/admin/products/{product}/feedback", content=data,
                                         headers={"Content-Type": kind}))
        return _json(self._http.post(f"/v1/admin/products/{product}/feedback",
                                     json={"request_id": request_id, "index": index}))

    def get_job(self, job_id: str) -> dict:
        return _json(self._http.get(f"/v1/admin/jobs/{job_id}"))

    def list_jobs(self) -> list[dict]:
        return _json(self._http.get("/v1/admin/jobs"))["jobs"]

    def cancel_job(self, job_id: str) -> dict:
        return _json(self._http.delete(f"/v1/admin/jobs/{job_id}"))

    def wait_for_job(self, job_id: str, timeout: float = 600.0,
                     poll_interval: float = 0.5) -> dict:
        """Poll until the job succeeds, fails or is cancelled; TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["state"] in _TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout:g} s")
            time.sleep(poll_interval)

    def activate(self, product: str, version: str) -> dict:
        return _json(self._http.post(f"/v1/admin/products/{product}/activate",
                                     json={"version": version}))

    def delete_product(self, product: str) -> None:
        _json(self._http.delete(f"/v1/admin/products/{product}"))

    # ---------------------------------------------------------------- health
    def health_live(self) -> dict:
        return _json(self._http.get("/health/live"))

    def health_ready(self) -> dict:
        return _json(self._http.get("/health/ready"))


class AsyncPatchCoreClient:
    """Asynchronous client with the same methods as PatchCoreClient."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None, retries: int = 0):
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport,
                                       headers=_headers(api_key))
        self.retries = retries

    async def _post_idempotent(self, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = await self._http.post(url, **kwargs)
            except _RETRIABLE:
                if last:
                    raise
            else:
                if last or not _lost_on_the_way(response):
                    return response
            await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncPatchCoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def predict(self, product: str, image: ImageInput, heatmap: str = "png",
                      regions: bool = False) -> dict:
        data, kind = _raw_image(image)
        response = await self._post_idempotent(f"/v1/products/{product}/predict", content=data,
                                               headers={"Content-Type": kind},
                                               params=_predict_params(heatmap, regions))
        return _json(response)["results"][0]

    async def predict_many(self, product: str, images: Sequence[ImageInput],
                           heatmap: str = "png", regions: bool = False) -> list[dict]:
        files = [_file_part(image, i) for i, image in enumerate(images)]
        response = await self._post_idempotent(f"/v1/products/{product}/predict", files=files,
                                               params=_predict_params(heatmap, regions))
        return _json(response)["results"]

    async def products(self) -> dict:
        return _json(await self._http.get("/v1/products"))

    async def product(self, name: str) -> dict:
        return _json(await self._http.get(f"/v1/products/{name}"))

    async def upload_nominal(self, product: str, files: Iterable[ImageInput]) -> dict:
        parts = [_file_part(f, i) for i, f in enumerate(files)]
        return _json(await self._http.post(f"/v1/admin/products/{product}/nominal",
                                           files=parts))

    async def list_nominal(self, product: str) -> dict:
        return _json(await self._http.get(f"/v1/admin/products/{product}/nominal"))

    async def clear_nominal(self, product: str) -> dict:
        return _json(await self._http.delete(f"/v1/admin/products/{product}/nominal"))

    async def start_build(self, product: str, coreset_ratio: float | None = None,
                          backbone: str | None = None, seed: int | None = None, *, mode: str = "full",
                          base_version: str | None = None, until: str = "size", **options: Any) -> dict:
        return _json(await self._http.post(
            f"/v1/admin/products/{product}/builds",
            json=_build_body(coreset_ratio, backbone, seed, mode, base_version, until, options)))

    async def send_feedback(self, product: str, image: ImageInput | None = None, *,
                            request_id: str | None = None, index: int | None = None) -> dict:
        if image is not None:
            data, kind = _raw_image(image)
            return _json(await self._http.post(f"/v1/admin/products/{product}/feedback", content=data,
                                               headers={"Content-Type": kind}))
        return _json(await self._http.post(f"/v1/admin/products/{product}/feedback",
                                           json={"request_id": request_id, "index": index}))

    async def get_job(self, job_id: str) -> dict:
        return _json(await self._http.get(f"/v1/admin/jobs/{job_id}"))

    async def list_jobs(self) -> list[dict]:
        return _json(await self._http.get("/v1/admin/jobs"))["jobs"]

    async def cancel_job(self, job_id: str) -> dict:
        return _json(await self._http.delete(f"/v1/admin/jobs/{job_id}"))

    async def wait_for_job(self, job_id: str, timeout: float = 600.0,
                           poll_interval: float = 0.5) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get_job(job_id)
            if job["state"] in _TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout:g} s")
            await asyncio.sleep(poll_interval)

    async def activate(self, product: str, version: str) -> dict:
        return _json(await self._http.post(f"/v1/admin/products/{product}/activate",
                                           json={"version": version}))

    async def delete_product(self, product: str) -> None:
        _json(await self._http.delete(f"/v1/admin/products/{product}"))

    async def health_live(self) -> dict:
        return _json(await self._http.get("/health/live"))

    async def health_ready(self) -> dict:
        return _json(await self._http.get("/health/ready"))
