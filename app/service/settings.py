"""Service configuration: one pydantic-settings class read from PATCHCORE_* variables.

Built by the cached `get_settings()`, never at import time, so tests and the
CLI can construct their own `Settings(...)` and hand it to `create_app`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_ADMIN_KEY_LENGTH = 16
# The one name for a local backbone weights file, read by the service and the CLI alike.
WEIGHTS_ENV = "PATCHCORE_WEIGHTS_PATH"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PATCHCORE_", extra="ignore", frozen=True)

    # ------------------------------------------------------------------ storage and models
    models_dir: Path = Path("models")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Optional local weights file for the default backbone (offline deployments).
    weights_path: Path | None = None  # env: WEIGHTS_ENV
    # Build the "demo" bank from the packaged demo images at startup when missing.
    demo: bool = True
    # Load every stored product's bank at start (one process). A Ray replica loads banks on
    # first use instead (an LRU per replica), so 500 products need not fit in one replica.
    preload_banks: bool = True
    # Seconds between checks of each loaded product's active pointer in the store; 0 = off.
    # On when other processes (other replicas, build tasks, the CLI) can move the pointer.
    watch_interval_s: float = Field(default=0.0, ge=0.0, le=3600.0)

    # ------------------------------------------------------------------ bank store (app/storage.py)
    # "local": banks under models_dir; "s3": an S3-compatible bucket (credentials from the usual AWS_* variables).
    store: Literal["local", "s3"] = "local"
    s3_endpoint_url: str | None = None        # unset = AWS S3; e.g. http://127.0.0.1:8333 for SeaweedFS
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_region: str | None = None
    # Local read-through cache of bank files (default models_dir/.s3-cache), least recently used out first.
    s3_cache_dir: Path | None = None
    s3_cache_max_mb: float = Field(default=2048.0, gt=0.0)

    # ------------------------------------------------------------------ admin access
    admin_api_key: SecretStr | None = None
    environment: Literal["production", "development"] = "production"
    # Development only: leave the admin API open when no key is configured.
    dev_open_admin: bool = False

    # ------------------------------------------------------------------ micro-batching
    max_batch_size: int = Field(default=8, ge=1, le=512)
    max_wait_ms: float = Field(default=5.0, ge=0.0, le=10_000.0)
    queue_size: int = Field(default=64, ge=1, le=100_000)
    request_timeout_s: float = Field(default=30.0, gt=0.0)
    # Threads that decode, validate and resize images before the queue.
    decode_threads: int = Field(default=4, ge=1, le=64)
    # JPEG bodies decoded, resized and normalised by the batch worker on the model's device
    # (nvJPEG) instead of by the decode threads: "auto" on a CUDA device, "off" never,
    # "always" also on a CPU device (torchvision's libjpeg decode at full size: slower than
    # the CPU path's reduced-scale decode there; for tests and comparisons).
    device_decode: Literal["auto", "off", "always"] = "auto"

    # ------------------------------------------------------------------ input limits
    max_upload_mb: float = Field(default=32.0, gt=0.0)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_images_per_request: int = Field(default=16, ge=1)
    # Decoded pixels of all images of one predict request together (checked from the
    # headers before anything is decoded): with max_image_pixels it bounds a request's memory.
    max_request_pixels: int = Field(default=100_000_000, ge=1)
    # Heatmaps, overlays and region boxes are computed on the photo scaled to fit this
    # side (aspect kept); boxes are given in the photo's own pixels.
    max_heatmap_side: int = Field(default=1024, ge=64, le=8192)
    # Decoding memory for the whole process: decodes wait while their images' estimated
    # footprint (7 bytes per pixel) would pass this, so concurrency cannot multiply it.
    decode_memory_mb: int = Field(default=512, ge=64)
    # A client must deliver each chunk of its body within this time (slow-body guard).
    body_read_timeout_s: float = Field(default=30.0, gt=0.0)
    max_staging_images: int = Field(default=5_000, ge=1)
    # Zip uploads: total uncompressed bytes and per-member compression ratio.
    max_zip_uncompressed_mb: float = Field(default=512.0, gt=0.0)
    max_zip_ratio: float = Field(default=200.0, gt=1.0)

    # ------------------------------------------------------------------ jobs and logs
    max_finished_jobs: int = Field(default=100, ge=1)
    # Recently flagged images kept (encoded, in memory) so a confirmed false alarm can be
    # staged by request id (POST .../feedback); 0 keeps none.
    feedback_cache_mb: float = Field(default=64.0, ge=0.0)
    # Fewer nominal images than this make a bank that cannot be calibrated honestly
    # (at least 5 are held out to set the threshold).
    min_build_images: int = Field(default=10, ge=2)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: object) -> object:
        # uvicorn and most tools take "warning"; refusing it would only stop a start.
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        key = self.admin_api_key.get_secret_value() if self.admin_api_key else None
        if key is not None and len(key) < MIN_ADMIN_KEY_LENGTH:
            raise ValueError(
                f"PATCHCORE_ADMIN_API_KEY must be at least {MIN_ADMIN_KEY_LENGTH} characters"
            )
        if self.store == "s3" and not self.s3_bucket:
            raise ValueError("PATCHCORE_STORE=s3 needs PATCHCORE_S3_BUCKET")
        if self.dev_open_admin and self.environment != "development":
            raise ValueError(
                "PATCHCORE_DEV_OPEN_ADMIN=true needs PATCHCORE_ENVIRONMENT=development"
            )
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def staging_dir(self) -> Path:
        # A dot folder: never a valid product name, so the bank store ignores it.
        return self.models_dir / ".staging"

    @property
    def jobs_dir(self) -> Path:
        return self.models_dir / ".jobs"

    @property
    def admin_open(self) -> bool:
        return self.admin_api_key is None and self.dev_open_admin


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
