"""The local Ray Serve stand (scripts/cluster.sh) for the tests and benchmarks/bench_cluster.py:
bring it up and down, find its replica processes, and drive load against it.

Where the machine allows it (root, `ip netns`), the stand runs in a private network
namespace: Ray's gRPC servers listen on every interface, and there the only one is the
namespace's loopback. Clients reach it from a thread that entered the namespace
(`stand.inside()`: setns(2) on the calling thread only; its sockets stay in the namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO_ROOT / "scripts" / "cluster.sh"
REPLICA_TITLE = b"ray::ServeReplica:patchcore:PatchCoreReplica"
REPLICA_HEADER = "x-patchcore-replica"
UP_TIMEOUT_S = 420
DOWN_TIMEOUT_S = 120


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def inside(netns: str | None) -> Iterator[None]:
    """Run the block's network calls in the stand's namespace (this thread only)."""
    if not netns:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the stand's network namespace failed")
        yield
    finally:
        _libc.setns(own, CLONE_NEWNET)
        os.close(own)
        os.close(target)


class StandUnavailable(Exception):
    """Ray or the S3 server could not start here (the tests skip with this reason)."""


@dataclass
class Stand:
    directory: Path
    api_key: str
    state: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.state["URL"]

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHON": sys.executable, "PATCHCORE_STAND_DIR": str(self.directory),
               "PATCHCORE_ADMIN_API_KEY": self.api_key}
        if "RAY_AUTH_TOKEN_PATH" in self.state:  # a Ray client of the stand (a redeploy)
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.state["RAY_AUTH_TOKEN_PATH"])
        return env

    @property
    def netns(self) -> str | None:
        return self.state.get("NETNS") or None

    def inside(self) -> contextlib.AbstractContextManager[None]:
        return inside(self.netns)

    def up(self, replicas: int = 2, netns: bool | None = None) -> None:
        """`netns`: None = a private namespace where the machine allows it, else loopback."""
        env = {**self.env(), "PATCHCORE_STAND_REPLICAS": str(replicas)}
        want = netns if netns is not None else os.environ.get("PATCHCORE_STAND_NETNS", "1") != "0"
        done = None
        if want:
            done = subprocess.run(["bash", str(CLUSTER_SH), "up", "--netns"], env=env, capture_output=True,
                                  text=True, timeout=UP_TIMEOUT_S, check=False)
            if done.returncode == 5 and netns is None:
                done = None  # no namespace here: loopback
        if done is None:
            done = subprocess.run(["bash", str(CLUSTER_SH), "up"], env=env, capture_output=True, text=True,
                                  timeout=UP_TIMEOUT_S, check=False)
        if done.returncode in (3, 4):
            raise StandUnavailable(done.stderr.strip()[-1500:])
        if done.returncode != 0:
            raise RuntimeError(f"cluster.sh up failed ({done.returncode}): {done.stderr[-3000:]}")
        for line in (self.directory / "stand.env").read_text().splitlines():
            key, _, value = line.partition("=")
            self.state[key] = value.strip('"')

    def down(self) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(CLUSTER_SH), "down"], env=self.env(), capture_output=True,
                              text=True, timeout=DOWN_TIMEOUT_S, check=False)

    def store_settings(self) -> dict[str, str]:
        """PATCHCORE_* settings that open the stand's bank store from this process."""
        out = {"PATCHCORE_MODELS_DIR": self.state["MODELS_DIR"], "PATCHCORE_STORE": self.state["STORE"]}
        if self.state["STORE"] == "s3":
            out.update(PATCHCORE_S3_ENDPOINT_URL=f"http://127.0.0.1:{self.state['S3_PORT']}",
                       PATCHCORE_S3_BUCKET="banks", PATCHCORE_S3_PREFIX=self.state["S3_PREFIX"],
                       AWS_ACCESS_KEY_ID=self.state["AWS_ACCESS_KEY_ID"],
                       AWS_SECRET_ACCESS_KEY=self.state["AWS_SECRET_ACCESS_KEY"],
                       AWS_DEFAULT_REGION="us-east-1")
        return out


def new_stand() -> Stand:
    # Short path: Ray's unix sockets live under it (108-byte limit).
    return Stand(Path(tempfile.mkdtemp(prefix="pcs-", dir="/tmp")), secrets.token_urlsafe(24))


def remove_stand_dir(stand: Stand) -> None:
    shutil.rmtree(stand.directory, ignore_errors=True)


def replica_pids() -> list[int]:
    """Pids of the patchcore Serve replicas on this machine (Ray names the process after the actor)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                if handle.read().startswith(REPLICA_TITLE):
                    pids.append(int(name))
        except OSError:
            continue
    return sorted(pids)


@dataclass
class Result:
    sent: float  # time.monotonic() when sent
    done: float
    ok: bool
    replica: str | None = None
    version: str | None = None
    error: str | None = None
    score: float | None = None


def predict_load(url: str, product: str, image: bytes, *, seconds: float, clients: int,
                 retries: int = 0, during: Callable[[], None] | None = None,
                 during_at_s: float = 0.0, netns: str | None = None) -> list[Result]:
    """`clients` threads predict back to back for `seconds`; `during` runs once after `during_at_s`.

    With `retries`, a request lost on its way (connection error, the gateway's 5xx) is sent again,
    as app/client.py does; the result counts as failed only when every try failed.
    """
    from app.client import RETRY_BACKOFF_S, _lost_on_the_way

    results: list[Result] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def one(http: httpx.Client) -> Result:
        sent = time.monotonic()
        error = None
        for attempt in range(retries + 1):
            try:
                response = http.post(f"/v1/products/{product}/predict", params={"heatmap": "none"},
                                     content=image, headers={"Content-Type": "image/png"})
            except httpx.TransportError as exc:
                error = type(exc).__name__
            else:
                if response.status_code == 200:
                    body = response.json()["results"][0]
                    return Result(sent, time.monotonic(), True, response.headers.get(REPLICA_HEADER),
                                  body["bank_version"], score=body["raw_score"])
                error = f"{response.status_code} {response.text[:100]}"
                if not _lost_on_the_way(response):
                    break
            time.sleep(RETRY_BACKOFF_S * (attempt + 1))
        return Result(sent, time.monotonic(), False, error=error)

    def client() -> None:
        with inside(netns), httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < stop_at:
                result = one(http)
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    if during is not None:
        time.sleep(during_at_s)
        during()
    for thread in threads:
        thread.join(timeout=seconds + 120)
    return sorted(results, key=lambda r: r.sent)


def propagation(results: list[Result], new_version: str, switched_at: float) -> dict[str, float]:
    """Per replica: seconds after `switched_at` until it answered only `new_version`
    (the send time of its last answer on another version; 0 if none after the switch)."""
    out: dict[str, float] = {}
    for replica in {r.replica for r in results if r.ok and r.replica}:
        answers = [r for r in results if r.ok and r.replica == replica]
        old = [r.sent for r in answers if r.version != new_version and r.sent >= switched_at]
        out[replica] = max(old) - switched_at if old else 0.0
        if not any(r.version == new_version for r in answers):
            out[replica] = float("inf")
    return out
