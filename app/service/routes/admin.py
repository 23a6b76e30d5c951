from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Request, Response, status
from starlette.concurrency import run_in_threadpool

from app.service.deps import AdminDep, CatalogDep, JobsDep, PredictorDep, ProductDep, SettingsDep, StagingDep
from app.service.errors import InvalidUpload, JobConflict, ProductNotFound
from app.service.jobs import BuildParams
from app.service.schemas import (
    ERROR_RESPONSES,
    ActivateRequest,
    BuildRequest,
    FeedbackAdded,
    FeedbackRequest,
    JobInfo,
    JobList,
    ProductInfo,
    StagingAdded,
    StagingCleared,
    StagingList,
)
from app.service.staging import ZIP_TYPES, StagingArea
from app.service.uploads import media_type, read_uploads

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[AdminDep],
                   responses=ERROR_RESPONSES)

_FILE = {"type": "string", "format": "binary"}
NOMINAL_BODY = {
    "requestBody": {
        "required": True,
        "description": "Nominal images as multipart files, or one zip archive (as a multipart "
                       "file or a raw application/zip body).",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "properties": {"files": {"type": "array", "items": _FILE}}}},
            "application/zip": {"schema": _FILE},
            "image/*": {"schema": _FILE},
        },
    }
}


@router.post("/products/{product}/nominal", response_model=StagingAdded,
             status_code=status.HTTP_201_CREATED, openapi_extra=NOMINAL_BODY)
async def add_nominal(product: ProductDep, request: Request, staging: StagingDep,
                      settings: SettingsDep) -> dict:
    """Add nominal images to the product's staging set."""
    uploads = await read_uploads(request, settings.max_images_per_request * 16,
                                 raw_types=ZIP_TYPES, allow_zip=True)
    added = await run_in_threadpool(staging.add, product, uploads)
    count = len(await run_in_threadpool(staging.list, product))
    return {"product": product, "added": len(added), "count": count}


@router.get("/products/{product}/nominal", response_model=StagingList)
async def list_nominal(product: ProductDep, staging: StagingDep) -> dict:
    """List the product's staged nominal images."""
    images = await run_in_threadpool(staging.list, product)
    return {"product": product, "count": len(images), "images": [i.describe() for i in images]}


@router.delete("/products/{product}/nominal", response_model=StagingCleared)
async def clear_nominal(product: ProductDep, staging: StagingDep, jobs: JobsDep) -> dict:
    """Clear the product's staging set (409 while a build of the product is reading it)."""
    busy = await run_in_threadpool(jobs.busy_with, product)
    if busy is not None:
        raise JobConflict(f"build {busy.id} of {product!r} is {busy.state} and reads the staging set; "
                          "cancel it (DELETE /v1/admin/jobs/{id}) or wait for it, then clear")
    return {"product": product, "removed": await run_in_threadpool(staging.clear, product)}


@router.post("/products/{product}/builds", response_model=JobInfo,
             status_code=status.HTTP_202_ACCEPTED)
async def start_build(product: ProductDep, staging: StagingDep, jobs: JobsDep, response: Response,
                      params: Annotated[BuildRequest | None, Body()] = None) -> dict:
    """Build a new bank from the staging set in the background; returns the job.

    mode "append" extends a stored version (default: the active one) with the staged
    images it does not already descend from, instead of building from scratch."""
    params = params or BuildRequest()
    paths = await run_in_threadpool(staging.paths, product)
    job = await run_in_threadpool(
        jobs.submit, product,
        BuildParams(params.coreset_ratio, params.backbone, params.seed, params.activate,
                    mode=params.mode, base_version=params.base_version, until=params.until,
                    image_size=params.image_size, framing=params.framing(),
                    false_alarm_rate=params.false_alarm_rate, map_sigma=params.map_sigma,
                    patch_size=params.patch_size, stage_dim=params.stage_dim,
                    stage_balance=params.stage_balance, normalisation=params.normalisation),
        lambda: paths, image_count=len(paths))
    response.headers["Location"] = f"/v1/admin/jobs/{job.id}"
    return job.describe()


FEEDBACK_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image of a confirmed false alarm: uploaded (one raw image/* body or "
                       "multipart files), or as JSON naming a recent prediction by the X-Request-ID "
                       "of its answer (kept in memory, bounded: PATCHCORE_FEEDBACK_CACHE_MB; one memory "
                       "for all replicas on a Ray cluster).",
        "content": {
            "image/*": {"schema": _FILE},
            "multipart/form-data": {"schema": {
                "type": "object", "properties": {"files": {"type": "array", "items": _FILE}}}},
            "application/json": {"schema": FeedbackRequest.model_json_schema()},
        },
    }
}


@router.post("/products/{product}/feedback", response_model=FeedbackAdded,
             status_code=status.HTTP_201_CREATED, openapi_extra=FEEDBACK_BODY)
async def add_feedback(product: ProductDep, request: Request, staging: StagingDep, catalog: CatalogDep,
                       predictor: PredictorDep, settings: SettingsDep) -> dict:
    """Stage a confirmed false alarm (a good part the service flagged) for the next append build.

    Only images that decode within the limits are staged; nothing else is written."""
    if not await run_in_threadpool(catalog.exists, product):
        raise ProductNotFound(f"no product named {product!r}")
    if media_type(request) == "application/json":
        try:
            body = FeedbackRequest.model_validate_json(await request.body())
        except ValueError as exc:
            raise InvalidUpload(f"feedback JSON must be {{\"request_id\": ..., \"index\": ...}}: {exc}") from exc
        # In a thread: on a cluster the image is fetched from the replicas' shared memory.
        uploads = [await run_in_threadpool(predictor.recent.get, product, body.request_id, body.index)]
        source = "recent"
    else:
        uploads = await read_uploads(request, settings.max_images_per_request)
        source = "upload"
    if any(StagingArea.is_zip(u) for u in uploads):
        raise InvalidUpload("feedback takes images, not archives; stage archives with POST .../nominal")
    added = await run_in_threadpool(staging.add, product, uploads)
    count = len(await run_in_threadpool(staging.list, product))
    return {"product": product, "added": len(added), "count": count, "source": source}


@router.get("/jobs", response_model=JobList)
async def list_jobs(jobs: JobsDep) -> dict:
    """Recent build jobs, newest first."""
    return {"jobs": [job.describe() for job in jobs.list()]}


@router.get("/jobs/{job_id}", response_model=JobInfo)
async def get_job(job_id: str, jobs: JobsDep) -> dict:
    """A build job's state, phase, progress, timings and error."""
    return jobs.get(job_id).describe()


@router.delete("/jobs/{job_id}", response_model=JobInfo, status_code=status.HTTP_202_ACCEPTED)
async def cancel_job(job_id: str, jobs: JobsDep) -> dict:
    """Cancel a queued or running build."""
    return jobs.cancel(job_id).describe()


@router.post("/products/{product}/activate", response_model=ProductInfo)
async def activate(product: ProductDep, body: ActivateRequest, catalog: CatalogDep) -> dict:
    """Serve another version of the product's bank (roll back or forward)."""
    loaded = await run_in_threadpool(catalog.activate, product, body.version)
    return loaded.describe()


@router.delete("/products/{product}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_product(product: ProductDep, catalog: CatalogDep, jobs: JobsDep) -> Response:
    """Remove a product: its banks in the store, its staging set, and its serving model."""
    await run_in_threadpool(jobs.cancel_product, product)  # on Ray it waits for a save in progress
    await run_in_threadpool(catalog.delete, product)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
