from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request

from app.service.deps import ProductDep, ReadyPredictorDep
from app.service.inference import PredictOptions
from app.service.logging import request_id_var
from app.service.schemas import ERROR_RESPONSES, PredictResponse
from app.service.uploads import read_uploads

router = APIRouter(prefix="/v1", tags=["predict"])

_IMAGE_SCHEMA = {"type": "string", "format": "binary"}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "One or more images as multipart files (any field name), or one raw "
                       "image body with an image/* content type.",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {"files": {"type": "array", "items": _IMAGE_SCHEMA}},
            }},
            "image/png": {"schema": _IMAGE_SCHEMA},
            "image/jpeg": {"schema": _IMAGE_SCHEMA},
            "image/*": {"schema": _IMAGE_SCHEMA},
        },
    }
}

HeatmapOption = Annotated[
    Literal["none", "png", "overlay"],
    Query(description="png: colour-mapped anomaly map at the image size; overlay: blended "
                      "over the photo; none: no heatmap"),
]
RegionsOption = Annotated[
    bool, Query(description="connected regions above the threshold, with boxes and areas")]


@router.post("/products/{product}/predict", response_model=PredictResponse,
             responses=ERROR_RESPONSES, openapi_extra=PREDICT_BODY)
async def predict(product: ProductDep, request: Request, predictor: ReadyPredictorDep,
                  heatmap: HeatmapOption = "png", regions: RegionsOption = False) -> dict:
    """Score images against the product's active bank."""
    predictor.get(product)  # an unknown product answers 404 before the body is read
    uploads = await read_uploads(request, predictor.settings.max_images_per_request)
    return await predictor.predict(product, uploads, PredictOptions(heatmap, regions),
                                   client_gone=lambda: client_gone(request), request_id=request_id_var.get())


async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected.

    The body has been read, so the next ASGI message is `http.disconnect`: waiting for
    it costs nothing while the request queues. (Polling `request.is_disconnected()`
    every 20 ms cost each waiting request 50 wake-ups a second on the event loop.)"""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)  # not expected after the body; never spin
