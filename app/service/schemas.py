"""Response models: they document the API in the OpenAPI schema."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from app.core.calibration import MIN_FALSE_ALARM_RATE
from app.core.embedding import MAX_PATCH_SIZE, check_patch_size
from app.core.framing import MIN_CENTRE_FRACTION, Framing
from app.core.patchcore import MAX_MAP_SIGMA


class ErrorDetail(BaseModel):
    code: str = Field(examples=["product_not_found"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class BBox(BaseModel):
    """In the photo's own pixels, whatever the heatmap's size."""

    x: int
    y: int
    width: int
    height: int


class Region(BaseModel):
    bbox: BBox
    area: int = Field(description="pixels above the threshold in the region")
    max_score: float = Field(description="peak normalised score (0.5 = threshold)")


class Heatmap(BaseModel):
    kind: Literal["png", "overlay"]
    media_type: Literal["image/png"] = "image/png"
    width: int = Field(description="the heatmap's own width: the photo's, scaled (aspect kept) so "
                                   "that the longer side is at most PATCHCORE_MAX_HEATMAP_SIDE")
    height: int
    data: str = Field(description="base64-encoded PNG; stretched to the photo's width x height it "
                                  "lies exactly over it")


class ImageTimings(BaseModel):
    decode_ms: float = Field(description="decode, validate and resize, before the queue (a JPEG "
                                         "decoded on the GPU: its header check only)")
    queued_ms: float = Field(description="waiting in the queue for a batch")
    compute_ms: float = Field(description="the batch's backbone + kNN time (with the device decode "
                                          "of its JPEGs, PATCHCORE_DEVICE_DECODE)")
    render_ms: float
    batch_size: int


class ImageResult(BaseModel):
    index: int
    filename: str | None
    width: int
    height: int
    raw_score: float
    score: float = Field(description="normalised: 0.5 = the product's threshold")
    threshold: float = Field(description="raw-score threshold the product was calibrated to")
    is_anomalous: bool
    bank_version: str
    heatmap: Heatmap | None = None
    regions: list[Region] | None = None
    timings: ImageTimings


class PredictResponse(BaseModel):
    product: str
    results: list[ImageResult]


class ProductInfo(BaseModel):
    name: str
    status: Literal["loaded", "failed", "stored"] = Field(description="loaded: served by the "
                                                        "process that answered; failed: its bank did not "
                                                        "load; stored: in the bank store, not loaded by "
                                                        "that process (a Ray replica loads on first use)")
    version: str | None = Field(default=None, description="the served version (absent when "
                                "no version could be loaded)")
    backbone: str | None = None
    image_size: int | None = None
    patch_size: int | None = Field(default=None, description="neighbourhood each patch feature aggregates "
                                   "(paper: 3; a build option)")
    framing: FramingInfo | None = Field(default=None, description="which part of each photo the bank sees")
    false_alarm_rate: float | None = Field(default=None, description="the threshold's false-alarm budget")
    map_sigma: float | None = Field(default=None, description="anomaly-map smoothing (Gaussian sigma, "
                                    "network-input pixels)")
    stage_balance: bool | None = Field(default=None, description="each backbone stage scaled to an equal "
                                       "measured share of the distance (a build option)")
    normalisation: str | None = Field(default=None, description="pixel normalisation before the backbone: "
                                      "dataset or image (each image at one reference exposure)")
    bank_size: int | None = None
    feature_dim: int | None = None
    threshold: float | None = None
    created_at: str | float | None = None
    loaded_at: float | None = None
    versions: list[str] | None = None
    active_version: str | None = Field(default=None, description="the store's active pointer")
    reason: str | None = None
    error_code: str | None = None


class ProductList(BaseModel):
    products: list[ProductInfo]
    failed: list[ProductInfo]
    stored: list[ProductInfo] | None = Field(
        default=None, description="products in the bank store that the answering process has not "
                                  "loaded (absent while the store cannot be read)")


class StagedImageInfo(BaseModel):
    name: str
    size_bytes: int


class StagingList(BaseModel):
    product: str
    count: int
    images: list[StagedImageInfo]


class StagingAdded(BaseModel):
    product: str
    added: int
    count: int


class StagingCleared(BaseModel):
    product: str
    removed: int


class BuildRequest(BaseModel):
    mode: Literal["full", "append"] = Field(
        default="full", description="full: a new bank from the whole staging set; append: the base "
        "version plus the staged images it does not already descend from (its backbone and "
        "feature settings are kept)")
    base_version: str | None = Field(default=None, max_length=128,
                                     description="append: the version to extend (default: the active one)")
    until: Literal["size", "radius"] = Field(
        default="size", description="append: grow to coreset_ratio of all patches seen (size), or stop "
        "once the new patches are covered as well as the base's own (radius)")
    coreset_ratio: float | None = Field(default=None, gt=0.0, le=1.0,
                                        description="default 0.1; append: the base's")
    backbone: str | None = Field(default=None, max_length=64, description="full builds only")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    activate: bool = Field(default=True, description="serve the new bank as soon as it is built")
    image_size: int | None = Field(default=None, ge=32, le=1024, multiple_of=16,
                                   description="network input side in pixels (default 224)")
    centre_crop: float | None = Field(default=None, ge=MIN_CENTRE_FRACTION, le=1.0,
                                      description="frame the central fraction of width and height "
                                      "(0.875 = resize 256, crop 224); default: the whole frame")
    roi: list[int] | None = Field(default=None, min_length=4, max_length=4,
                                  description="frame this box [x0, y0, x1, y1] in original-image pixels")
    aspect: Literal["keep", "squeeze"] | None = Field(
        default=None, description="network input of each framed box: about image_size x image_size pixels "
        "with its own aspect kept (keep, the default), or exactly image_size x image_size (squeeze)")
    false_alarm_rate: float | None = Field(default=None, ge=MIN_FALSE_ALARM_RATE, lt=0.5,
                                           description="false-alarm budget on good parts for the "
                                           "nominal-only threshold (0.001 = 1 in 1,000; default 0.01)")
    map_sigma: float | None = Field(default=None, ge=0.0, le=MAX_MAP_SIGMA,
                                    description="anomaly-map smoothing, Gaussian sigma in network-input "
                                    "pixels (default 4, the paper's; larger suits large, low-contrast defects)")
    patch_size: int | None = Field(
        default=None, ge=1, le=MAX_PATCH_SIZE, description="neighbourhood each patch feature aggregates, "
        "odd (default 3, the paper's; 5 suited transistor-like parts, README)")
    stage_dim: int | None = Field(
        default=None, ge=8, le=1024, description="values kept per backbone stage (default 64; 32 halves "
        "the search's arithmetic at a small cost on textures, README)")
    stage_balance: bool | None = Field(
        default=None, description="scale each backbone stage to an equal share of the distance, measured on "
        "the nominal images (default false; better image scores and coarser maps on textures, README)")
    normalisation: Literal["dataset", "image"] | None = Field(
        default=None, description="pixel normalisation: image (default: each image first brought to one "
        "reference exposure, against lighting drift) or dataset (the backbone's statistics only; README)")

    @model_validator(mode="after")
    def _options_are_valid(self) -> BuildRequest:
        self.framing()  # raises ValueError -> 422 with the reason
        if self.patch_size is not None:
            check_patch_size(self.patch_size)  # the engine's rule, answered here as a 422
        return self

    def framing(self) -> Framing | None:
        """The requested framing; None keeps the default."""
        if self.centre_crop is None and self.roi is None and self.aspect is None:
            return None
        return Framing.parse(self.centre_crop, ",".join(str(v) for v in self.roi) if self.roi else None,
                             self.aspect or Framing().aspect)


class FramingInfo(BaseModel):
    mode: Literal["whole", "centre", "roi"]
    fraction: float = Field(description="centre mode: the central fraction of width and height")
    roi: list[int] | None = Field(default=None, description="roi mode: [x0, y0, x1, y1] in original pixels")
    aspect: Literal["keep", "squeeze"] = Field(
        description="keep: each framed box reaches the network with its own aspect (about image_size x "
        "image_size pixels); squeeze: at exactly image_size x image_size (banks built before keep existed)")


class FeedbackRequest(BaseModel):
    """A recent prediction's image, by the X-Request-ID its answer carried."""

    request_id: str = Field(min_length=1, max_length=128)
    index: int | None = Field(default=None, ge=0, description="the image's index in that request "
                              "(may be left out when the request held one image)")


class FeedbackAdded(BaseModel):
    product: str
    added: int = Field(description="0 when the image was already staged")
    count: int = Field(description="images now in the staging set")
    source: Literal["upload", "recent"]


class ActivateRequest(BaseModel):
    version: str = Field(min_length=1, max_length=128)


class JobInfo(BaseModel):
    id: str
    product: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
    phase: str
    progress: float = Field(description="percent, 0-100")
    params: dict
    source: str
    image_count: int | None
    version: str | None
    error: ErrorDetail | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    timings_s: dict
    cancel_requested: bool


class JobList(BaseModel):
    jobs: list[JobInfo]


class Health(BaseModel):
    status: str
    checks: dict[str, bool] = {}
    detail: str | None = None


ERROR_RESPONSES: dict[int | str, dict] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429,
                                                 503, 504)
}
