"""The Python client (sync and async) against the real service over HTTP."""

from __future__ import annotations

import asyncio

import pytest

from app.client import AsyncPatchCoreClient, PatchCoreAPIError, PatchCoreClient

from .conftest import ADMIN_KEY

pytestmark = pytest.mark.slow


def test_sync_client(server, bottle_job, bottle_good, bottle_defect, tile_train):
    with PatchCoreClient(server.url, api_key=ADMIN_KEY) as client:
        assert client.health_live()["status"] == "alive"
        assert client.health_ready()["status"] == "ready"
        one = client.predict("bottle", bottle_defect[0], heatmap="none", regions=True)
        assert one["is_anomalous"] and one["regions"]
        from_bytes = client.predict("bottle", bottle_defect[0].read_bytes(), heatmap="none")
        assert from_bytes["score"] == pytest.approx(one["score"], rel=1e-4)
        many = client.predict_many("bottle", [bottle_good[0], bottle_defect[0]], heatmap="none")
        assert many[1]["is_anomalous"] and many[1]["score"] > many[0]["score"]
        assert "bottle" in [p["name"] for p in client.products()["products"]]
        assert client.product("bottle")["version"]
        with pytest.raises(PatchCoreAPIError) as info:
            client.predict("nosuchproduct", bottle_good[0])
        assert (info.value.status, info.value.code) == (404, "product_not_found")
        # Admin round trip: stage, list, build, wait, delete.
        assert client.upload_nominal("clientprod", tile_train[:4])["added"] == 4
        assert client.list_nominal("clientprod")["count"] == 4
        job = client.start_build("clientprod", coreset_ratio=0.1, seed=3)
        done = client.wait_for_job(job["id"], timeout=300, poll_interval=0.2)
        assert done["state"] == "succeeded", done
        assert client.get_job(job["id"])["version"] == done["version"]
        assert client.send_feedback("clientprod", tile_train[4])["added"] == 1
        appended = client.wait_for_job(client.start_build("clientprod", mode="append")["id"], timeout=300,
                                       poll_interval=0.2)
        assert appended["state"] == "succeeded" and appended["image_count"] == 1, appended
        assert appended["params"]["base_version"] == done["version"]
        assert client.activate("clientprod", done["version"])["version"] == done["version"]
        assert client.clear_nominal("clientprod")["removed"] == 5
        client.delete_product("clientprod")
        with pytest.raises(PatchCoreAPIError) as info:
            client.product("clientprod")
        assert info.value.status == 404
    with PatchCoreClient(server.url, api_key="wrong-wrong-wrong-wrong") as bad, \
            pytest.raises(PatchCoreAPIError) as info:
        bad.list_nominal("bottle")
    assert (info.value.status, info.value.code) == (403, "forbidden")


def test_async_client(server, bottle_job, bottle_good, bottle_defect):
    async def main():
        async with AsyncPatchCoreClient(server.url, api_key=ADMIN_KEY) as client:
            assert (await client.health_ready())["status"] == "ready"
            results = await asyncio.gather(
                *(client.predict("bottle", p, heatmap="none") for p in bottle_good + bottle_defect))
            many = await client.predict_many("bottle", bottle_defect[:2], heatmap="png")
            products = await client.products()
            with pytest.raises(PatchCoreAPIError) as info:
                await client.get_job("missing")
            return results, many, products, info.value

    results, many, products, error = asyncio.run(main())
    # Broken bottles score above every good one.
    assert min(r["score"] for r in results[3:]) > max(r["score"] for r in results[:3])
    assert all(r["is_anomalous"] for r in results[3:])
    assert all(r["heatmap"]["kind"] == "png" for r in many)
    assert products["products"]
    assert error.status == 404 and error.code == "job_not_found"
