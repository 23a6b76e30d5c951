"""Camera-line simulator: N cameras stream images to the service at a fixed rate each.

Each camera is open-loop, like a real line camera: it fires a frame every
1 / rate seconds whether or not the previous answer has come back, with the
cameras' phases staggered. A camera holds at most `max_in_flight` requests;
a frame due while that many are unanswered is skipped and counted (the line
moved on), so a slow service cannot pile up unbounded work here. The run stops
by itself after `duration_s` or `total_requests` frames, whichever comes
first, then waits for the requests in flight (each bounded by the client's
timeout).

    python -m app simulate --url http://127.0.0.1:8000 --product demo \\
        --images app/demo/images/good --cameras 4 --rate 5 --duration 30

By default only loopback addresses are accepted as targets: a load generator
pointed at the wrong host is a denial of service. `allow_remote=True`
(`--allow-remote`) lifts that for a deliberate test of a deployed service.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import math
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MAX_CAMERAS = 256
MAX_RATE_PER_CAMERA = 1000.0
MAX_DURATION_S = 24 * 3600.0


class SimulationError(ValueError):
    """The simulation was asked for something it refuses to do (bad target, bad numbers)."""


@dataclass
class SimulationResult:
    """What a run did. `sent == ok + sum(errors.values())`; skipped frames were never sent."""

    cameras: int
    rate_per_camera: float
    # From the first frame to the last answer, but at least the frames' own time (each frame
    # stands for one period of its camera): N frames span N periods, not N - 1, so a short
    # run no longer reports more than the offered rate.
    duration_s: float
    sent: int = 0
    ok: int = 0
    anomalous: int = 0
    skipped: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)  # successful requests only

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput(self) -> float:
        """Successful predictions per second."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        """Latency quantile q in [0, 1] of successful requests (nearest rank), in ms."""
        if not self.latencies_s:
            return math.nan
        ordered = sorted(self.latencies_s)
        rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[rank] * 1000.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "cameras": self.cameras,
            "rate_per_camera": self.rate_per_camera,
            "offered_rate": self.cameras * self.rate_per_camera,
            "duration_s": round(self.duration_s, 3),
            "sent": self.sent,
            "ok": self.ok,
            "anomalous": self.anomalous,
            "failed": self.failed,
            "skipped": self.skipped,
            "errors": dict(sorted(self.errors.items())),
            "throughput_per_s": round(self.throughput, 3),
            "latency_ms": {
                name: None if math.isnan(v) else round(v, 2)
                for name, v in (
                    ("p50", self.latency_ms(0.50)),
                    ("p95", self.latency_ms(0.95)),
                    ("p99", self.latency_ms(0.99)),
                    ("max", self.latency_ms(1.0)),
                )
            },
        }

    def summary(self) -> str:
        lat = self.to_dict()["latency_ms"]
        lines = [
            f"cameras {self.cameras} x {self.rate_per_camera:g}/s "
            f"(offered {self.cameras * self.rate_per_camera:g}/s) for {self.duration_s:.1f} s",
            f"sent {self.sent}  ok {self.ok}  anomalous {self.anomalous}  failed {self.failed}  skipped {self.skipped}",
            f"throughput {self.throughput:.2f}/s",
            f"latency ms  p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}",
        ]
        if self.errors:
            lines.append("errors  " + "  ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())))
        return "\n".join(lines)


def check_target(base_url: str, allow_remote: bool = False) -> None:
    """Refuse a URL that is not http(s), or (unless allowed) not a loopback address."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SimulationError(f"expected an http(s) URL, got {base_url!r}")
    if allow_remote:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise SimulationError(f"cannot resolve {parts.hostname!r}: {exc}") from exc
    addresses = {info[4][0] for info in infos}
    if not addresses or not all(ipaddress.ip_address(a).is_loopback for a in addresses):
        raise SimulationError(
            f"{parts.hostname} is not a loopback address; pass allow_remote=True "
            "(--allow-remote) to load-test another host on purpose"
        )


def list_images(folder: Path) -> list[Path]:
    """Image files directly in folder, sorted (not below it: that is where masks live)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _error_key(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status > 0:
        code = getattr(exc, "code", None)
        return f"{status} {code}" if code else str(status)
    name = type(exc).__name__
    if "Timeout" in name or isinstance(exc, TimeoutError):
        return "timeout"
    if name in ("ConnectError", "ConnectTimeout", "RemoteProtocolError", "ReadError"):
        return "connection"
    return name


async def simulate(
    base_url: str,
    product: str,
    images: Sequence[Path | bytes],
    rate_per_camera: float,
    cameras: int,
    duration_s: float | None = None,
    total_requests: int | None = None,
    api_key: str | None = None,
    *,
    heatmap: str = "none",
    timeout: float = 30.0,
    max_in_flight: int = 4,
    allow_remote: bool = False,
    client: Any = None,
) -> SimulationResult:
    """Run the simulation in the current event loop; see the module docstring.

    `client`: an existing AsyncPatchCoreClient to use (it is not closed here);
    by default one is created for `base_url` and closed at the end.
    """
    if duration_s is None and total_requests is None:
        raise SimulationError("give duration_s or total_requests (or both)")
    if not 1 <= cameras <= MAX_CAMERAS:
        raise SimulationError(f"cameras must be in 1..{MAX_CAMERAS}")
    if not 0 < rate_per_camera <= MAX_RATE_PER_CAMERA:
        raise SimulationError(f"rate_per_camera must be in (0, {MAX_RATE_PER_CAMERA:g}]")
    if duration_s is not None and not 0 < duration_s <= MAX_DURATION_S:
        raise SimulationError(f"duration_s must be in (0, {MAX_DURATION_S:g}]")
    if total_requests is not None and total_requests < 1:
        raise SimulationError("total_requests must be at least 1")
    if max_in_flight < 1:
        raise SimulationError("max_in_flight must be at least 1")
    if not images:
        raise SimulationError("no images to send")
    check_target(base_url, allow_remote)
    payloads = [p if isinstance(p, bytes) else Path(p).read_bytes() for p in images]

    own_client = client is None
    if own_client:
        from app.client import AsyncPatchCoreClient

        client = AsyncPatchCoreClient(base_url, api_key=api_key, timeout=timeout)

    result = SimulationResult(cameras=cameras, rate_per_camera=rate_per_camera, duration_s=0.0)
    budget = total_requests if total_requests is not None else math.inf
    period = 1.0 / rate_per_camera
    loop = asyncio.get_running_loop()
    start = loop.time()
    scheduled = 0  # frames that came due across all cameras, sent or skipped

    async def send(payload: bytes) -> None:
        t0 = time.perf_counter()
        try:
            answer = await client.predict(product, payload, heatmap=heatmap)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is counted, none stops the line
            result.errors[_error_key(exc)] += 1
            return
        result.latencies_s.append(time.perf_counter() - t0)
        result.ok += 1
        if isinstance(answer, dict) and answer.get("is_anomalous"):
            result.anomalous += 1

    def frames_for(index: int, offset: float) -> int:
        """How many frames camera `index` may fire: those due before the deadline."""
        if duration_s is None:
            return math.ceil(budget / cameras)  # the shared budget stops it sooner
        return max(0, math.ceil((duration_s - offset) * rate_per_camera - 1e-9))

    async def camera(index: int) -> None:
        nonlocal scheduled
        in_flight: set[asyncio.Task[None]] = set()
        offset = period * index / cameras  # stagger the cameras evenly over one period
        # Bounded: a fixed number of frames, each due at an absolute time (no
        # drift), and the shared request budget can end it earlier.
        for frame in range(frames_for(index, offset)):
            delay = start + offset + frame * period - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if scheduled >= budget:
                break
            scheduled += 1
            in_flight = {t for t in in_flight if not t.done()}
            if len(in_flight) >= max_in_flight:
                result.skipped += 1
            else:
                payload = payloads[(index + frame * cameras) % len(payloads)]
                result.sent += 1
                in_flight.add(asyncio.create_task(send(payload)))
        if in_flight:
            await asyncio.gather(*in_flight)

    try:
        await asyncio.gather(*(camera(i) for i in range(cameras)))
    finally:
        result.duration_s = max(loop.time() - start, scheduled / (cameras * rate_per_camera))
        if own_client:
            closer = getattr(client, "aclose", None) or getattr(client, "close", None)
            if closer is not None:
                outcome = closer()
                if asyncio.iscoroutine(outcome):
                    await outcome
    return result


def run_simulation(
    base_url: str,
    product: str,
    images: Sequence[Path | bytes],
    rate_per_camera: float,
    cameras: int,
    duration_s: float | None = None,
    total_requests: int | None = None,
    api_key: str | None = None,
    **options: Any,
) -> SimulationResult:
    """Blocking entry point: runs `simulate` in a fresh event loop and returns its result."""
    return asyncio.run(
        simulate(
            base_url,
            product,
            images,
            rate_per_camera,
            cameras,
            duration_s,
            total_requests,
            api_key,
            **options,
        )
    )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `simulate` options; pass a subparser to add them to a larger CLI."""
    parser = parser or argparse.ArgumentParser(prog="python -m app simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    parser.add_argument("--product", default="demo", help="product to predict against")
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of images to stream (default: all packaged demo images)",
    )
    parser.add_argument("--cameras", type=int, default=4, help="concurrent cameras")
    parser.add_argument("--rate", type=float, default=2.0, help="frames per second per camera")
    parser.add_argument("--duration", type=float, default=None, help="seconds to run")
    parser.add_argument("--requests", type=int, default=None, help="total frames to send")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("PATCHCORE_API_KEY"),
        help="API key (default: $PATCHCORE_API_KEY)",
    )
    parser.add_argument("--heatmap", choices=("none", "png", "overlay"), default="none")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s")
    parser.add_argument("--max-in-flight", type=int, default=4, help="unanswered requests per camera")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback URL")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run a parsed `simulate` command line; exit status 0 when every sent request succeeded."""
    if args.duration is None and args.requests is None:
        args.duration = 10.0
    # httpx logs every request at INFO: thousands of lines that would bury the report.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
    if args.images is None:
        from app.demo import demo_defect_images, demo_nominal_images, demo_test_nominal_images

        images = demo_test_nominal_images() + demo_defect_images() + demo_nominal_images()
    elif args.images.is_dir():
        images = list_images(args.images)
    else:
        images = [args.images]
    if not images:
        print(f"no images directly in {args.images}", file=sys.stderr)
        return 2
    try:
        result = run_simulation(
            args.url,
            args.product,
            images,
            args.rate,
            args.cameras,
            args.duration,
            args.requests,
            args.api_key,
            heatmap=args.heatmap,
            timeout=args.timeout,
            max_in_flight=args.max_in_flight,
            allow_remote=args.allow_remote,
        )
    except SimulationError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0 if result.failed == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
