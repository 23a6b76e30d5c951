"""The service on the real local stand (scripts/cluster.sh): Ray head + S3 server + 2 replicas.

Skipped, with the reason, when Ray or the S3 server cannot start here. Kept short
(CI has 2 cores): one stand for the module, small banks from the demo images. The
timed figures (propagation, throughput) are measured by benchmarks/bench_cluster.py;
here they are printed, and the tests check what must always hold.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")

from app.client import PatchCoreClient  # noqa: E402
from tests.cluster.stand import (  # noqa: E402
    Stand,
    StandUnavailable,
    new_stand,
    predict_load,
    propagation,
    remove_stand_dir,
    replica_pids,
)

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "app" / "demo" / "images"
PRODUCT = "washer"


@pytest.fixture(scope="module")
def stand() -> Iterator[Stand]:
    if replica_pids():
        pytest.skip("another patchcore Ray stand runs on this machine: its replicas would mix with ours")
    stand = new_stand()
    try:
        try:
            stand.up(replicas=2)
        except StandUnavailable as exc:
            pytest.skip(f"the stand cannot start here: {exc}")
        yield stand
    finally:
        done = stand.down()
        remove_stand_dir(stand)
    assert done.returncode == 0, done.stderr  # "processes left behind" fails here


@pytest.fixture(scope="module")
def versions(stand: Stand) -> list[str]:
    """Two versions of one product built through the admin API on the cluster: the first active."""
    with stand.inside(), PatchCoreClient(stand.url, api_key=stand.api_key, timeout=120) as client:
        client.upload_nominal(PRODUCT, sorted((DEMO / "good").glob("*.png"))[:10])
        first = client.wait_for_job(client.start_build(PRODUCT, coreset_ratio=0.1, seed=0)["id"], timeout=300)
        assert first["state"] == "succeeded", first
        # The second one stays inactive: the swap test activates it.
        response = client._http.post(f"/v1/admin/products/{PRODUCT}/builds",
                                     json={"coreset_ratio": 0.1, "seed": 1, "activate": False})
        second = client.wait_for_job(response.json()["id"], timeout=300)
        assert second["state"] == "succeeded", second
        assert second["phase"] == "done" and second["progress"] == 100.0
        assert set(second["timings_s"]["phases"]) >= {"features", "coreset", "calibration"}
    return [first["version"], second["version"]]


def test_the_stand_is_isolated(stand: Stand) -> None:
    """In its namespace the stand has no interface but loopback; else its HTTP port is loopback-only."""
    if stand.netns:
        done = subprocess.run(["ip", "netns", "exec", stand.netns, "ip", "-o", "link"], capture_output=True,
                              text=True, check=True)
        assert [line.split(":")[1].strip() for line in done.stdout.splitlines()] == ["lo"]
        print(f"\nstand in network namespace {stand.netns}")
    else:
        print("\nno private network namespace here: stand on loopback")
    assert stand.url.startswith("http://127.0.0.1:")


def test_build_on_the_cluster_scores_like_the_single_process(stand: Stand, versions: list[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from app.service.settings import Settings
    from tests.service.conftest import start_server, stop_server

    images = [DEMO / "defect" / "scratch_000.png", DEMO / "good_test" / "000.png", DEMO / "defect" / "dent_000.png"]
    with stand.inside(), PatchCoreClient(stand.url) as client:
        remote = [client.predict(PRODUCT, image, heatmap="none") for image in images]
        assert client.product(PRODUCT)["versions"] == sorted(versions)
    assert {r["bank_version"] for r in remote} == {versions[0]}

    # The single process (uvicorn) on the same store and bank, in the stand's network (its
    # threads are created inside it, so they reach the stand's S3 server).
    for key, value in stand.store_settings().items():
        monkeypatch.setenv(key, value)
    with stand.inside():
        live = start_server(Settings(demo=False, device="cpu"))
        try:
            with PatchCoreClient(live.url) as local_client:
                local = [local_client.predict(PRODUCT, image, heatmap="none") for image in images]
        finally:
            stop_server(live)
    for r, one in zip(remote, local, strict=True):
        assert r["bank_version"] == one["bank_version"]
        assert abs(r["raw_score"] - one["raw_score"]) <= 1e-5, (r["raw_score"], one["raw_score"])
        assert r["is_anomalous"] == one["is_anomalous"]


def test_every_replica_lists_every_product(stand: Stand, versions: list[str]) -> None:
    """A replica loads banks on first use, yet its product listing names every product in the
    store: loaded there, or `stored` (before, a replica listed only the banks it held)."""
    seen: dict[str, str] = {}
    with stand.inside(), PatchCoreClient(stand.url) as client:
        for _ in range(12):
            response = client._http.get("/v1/products")
            listing = response.json()
            statuses = {p["name"]: p["status"] for p in listing["products"] + listing["stored"]}
            assert statuses.get(PRODUCT) in ("loaded", "stored"), listing
            seen[response.headers["x-patchcore-replica"]] = statuses[PRODUCT]
    assert len(seen) == 2, seen  # both replicas answered


def test_cancel_a_cluster_build(stand: Stand, versions: list[str]) -> None:
    with stand.inside(), PatchCoreClient(stand.url, api_key=stand.api_key) as client:
        job = client.start_build(PRODUCT, coreset_ratio=0.1, seed=2)
        cancelled = client._http.delete(f"/v1/admin/jobs/{job['id']}")
        assert cancelled.status_code == 202, cancelled.text
        final = client.wait_for_job(job["id"], timeout=120)
        assert final["state"] == "cancelled", final
        assert client.product(PRODUCT)["versions"] == sorted(versions)  # nothing was published
        missing = client._http.get("/v1/admin/jobs/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
        unknown = client._http.post("/v1/products/nope/predict", content=b"x", headers={"Content-Type": "image/png"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "product_not_found"
        assert all(f["name"] != "nope" for f in client.products()["failed"])


def test_new_version_reaches_every_replica_without_a_failed_request(stand: Stand, versions: list[str]) -> None:
    image = (DEMO / "defect" / "scratch_000.png").read_bytes()
    switched: dict[str, float] = {}

    def activate() -> None:
        with stand.inside(), PatchCoreClient(stand.url, api_key=stand.api_key) as client:
            switched["at"] = time.monotonic()
            client.activate(PRODUCT, versions[1])

    results = predict_load(stand.url, PRODUCT, image, seconds=8.0, clients=4, during=activate, during_at_s=3.0,
                           netns=stand.netns)
    failed = [r for r in results if not r.ok]
    assert not failed, failed[:5]
    per_replica = propagation(results, versions[1], switched["at"])
    print(f"\nswap propagation per replica (s): {per_replica}; {len(results)} requests, 0 failed")
    assert len(per_replica) == 2, per_replica  # both replicas answered
    assert all(t != float("inf") for t in per_replica.values()), per_replica  # both serve the new one
    last = results[-len(results) // 4:]
    assert {r.version for r in last} == {versions[1]}


def test_killed_replica_costs_no_request_with_retries_and_is_replaced(stand: Stand,
                                                                      versions: list[str]) -> None:
    image = (DEMO / "defect" / "scratch_000.png").read_bytes()
    before = replica_pids()
    assert len(before) == 2, before
    killed: dict[str, int] = {}

    def kill() -> None:
        killed["pid"] = before[0]
        os.kill(before[0], signal.SIGKILL)

    plain = {}
    retried = {}

    def run(out: dict, retries: int) -> None:
        out["results"] = predict_load(stand.url, PRODUCT, image, seconds=6.0, clients=2, retries=retries,
                                      during=kill if retries == 0 else None, during_at_s=2.0,
                                      netns=stand.netns)

    import threading

    other = threading.Thread(target=run, args=(retried, 3))
    other.start()
    run(plain, 0)
    other.join()
    plain_failed = [r for r in plain["results"] if not r.ok]
    retried_failed = [r for r in retried["results"] if not r.ok]
    print(f"\nreplica {killed['pid']} killed: without retry {len(plain_failed)} of {len(plain['results'])} "
          f"failed ({sorted({r.error for r in plain_failed})}); with retry {len(retried_failed)} of "
          f"{len(retried['results'])}")
    assert not retried_failed, retried_failed[:5]

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = replica_pids()
        if len(now) == 2 and killed["pid"] not in now:
            break
        time.sleep(1)
    assert len(replica_pids()) == 2 and killed["pid"] not in replica_pids(), replica_pids()
    # The new replica serves (it loads the bank on first use).
    with stand.inside(), PatchCoreClient(stand.url, retries=3) as client:
        seen = set()
        deadline = time.monotonic() + 120
        while len(seen) < 2 and time.monotonic() < deadline:
            response = client._http.post(f"/v1/products/{PRODUCT}/predict", params={"heatmap": "none"},
                                         content=image, headers={"Content-Type": "image/png"})
            if response.status_code == 200:
                seen.add(response.headers["x-patchcore-replica"])
        assert len(seen) == 2, seen


def test_feedback_by_request_id_finds_the_image_on_any_replica(stand: Stand, versions: list[str]) -> None:
    """Flagged images are kept once for the cluster (app.cluster.flagged): feedback by the
    request id of an answer stages the image whichever replica takes the feedback call, also
    when that is not the replica that flagged it. Last in the module: it stages an image."""
    image = (DEMO / "defect" / "scratch_000.png").read_bytes()
    crossed = []
    with stand.inside(), PatchCoreClient(stand.url, api_key=stand.api_key) as client:
        for _ in range(30):
            answer = client._http.post(f"/v1/products/{PRODUCT}/predict", params={"heatmap": "none"},
                                       content=image, headers={"Content-Type": "image/png"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["results"][0]["is_anomalous"]
            assert len(answer.headers.get_list("x-request-id")) == 1  # the proxy's id, not twice
            feedback = client._http.post(f"/v1/admin/products/{PRODUCT}/feedback",
                                         json={"request_id": answer.headers["x-request-id"], "index": 0})
            assert feedback.status_code == 201, feedback.text
            assert feedback.json()["source"] == "recent"
            if feedback.headers["x-patchcore-replica"] != answer.headers["x-patchcore-replica"]:
                crossed.append(answer.headers["x-request-id"])
                if len(crossed) == 2:
                    break
        assert crossed, "no feedback call reached the other replica in 30 tries"
        unknown = client._http.post(f"/v1/admin/products/{PRODUCT}/feedback",
                                    json={"request_id": "never-answered", "index": 0})
        assert unknown.status_code == 404, unknown.text


def test_a_product_deleted_while_its_build_saves_stays_deleted(stand: Stand, versions: list[str]) -> None:
    """The delete waits for its cancelled build to end, as the single process's does: a task
    that was already saving once finished after the delete and brought the product back."""
    product = "washer-deleted"
    with stand.inside(), PatchCoreClient(stand.url, api_key=stand.api_key, timeout=120) as client:
        client.upload_nominal(product, sorted((DEMO / "good").glob("*.png"))[:10])
        job = client.start_build(product, coreset_ratio=0.1, seed=0)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # aim the delete at the save (it also holds earlier or later)
            state = client._http.get(f"/v1/admin/jobs/{job['id']}").json()
            if state["phase"] == "saving" or state["state"] != "running" and state["state"] != "queued":
                break
            time.sleep(0.02)
        print(f"delete sent in phase {state['phase']!r}, state {state['state']!r}")
        deleted = client._http.delete(f"/v1/admin/products/{product}")
        assert deleted.status_code == 204, deleted.text
        final = client.wait_for_job(job["id"], timeout=120)
        assert final["state"] in ("succeeded", "cancelled"), final
        time.sleep(1.0)
        assert client._http.get(f"/v1/products/{product}").status_code == 404
        assert all(p["name"] != product for p in client.products()["products"] + client.products().get("stored", []))
