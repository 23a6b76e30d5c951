"""PatchCore: build a memory bank from nominal images, then score new images.

    build_bank(images) : embed -> greedy coreset (Sec. 3.2) -> calibrate on held-out nominals
    PatchCoreModel.predict(images) : embed -> kNN to the bank (Sec. 3.3) -> score, decision, map
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from app import __version__
from app.core.bank import MemoryBank
from app.core.calibration import Calibration, calibrate_f1, calibrate_from_nominal
from app.core.coreset import coreset_size_for, greedy_coreset
from app.core.embedding import EmbedderConfig, PatchEmbedder
from app.core.errors import BankIncompatible, BuildCancelled, InvalidImage, NotEnoughImages
from app.core.framing import Box, Framing
from app.core.images import as_rgb_array, decode_image
from app.core.knn import SearchBackend, SearchIndex, SearchPrecision, create_index
from app.core.scoring import score_patches, smoothed_maps, to_original_size

ImageSource = Path | str | np.ndarray
ProgressFn = Callable[[str, float], None]


@dataclass(frozen=True)
class PatchCoreConfig:
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    coreset_ratio: float = 0.1          # fraction of all nominal patches kept (paper: 1-25%)
    coreset_size: int | None = None     # absolute size; overrides the ratio
    projection_dim: int | None = 128    # random projection for coreset selection (official: 128)
    num_starts: int = 10                # random starting centres of the greedy selection
    reweight_neighbours: int = 0        # b of Eq. 7; 0 = plain max-distance score
    top_k: int = 1                      # image score = mean of the top_k patch scores (1 = max, Eq. 6)
    framing: Framing = field(default_factory=Framing)  # which part of the frame the backbone sees
    gaussian_sigma: float = 4.0         # anomaly map smoothing (paper: 4)
    holdout_fraction: float = 0.1       # nominal images kept out of the bank for calibration
    min_holdout: int = 5
    false_alarm_rate: float = 0.01      # target rate of good parts flagged, for the threshold
    threshold_tail_margin: float = 0.25  # threshold >= max held-out + margin * (max - median)
    batch_size: int = 8                 # images per backbone pass while building (peak memory)
    seed: int = 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["embedder"] = self.embedder.to_dict()
        data["framing"] = self.framing.to_dict()
        return data


@dataclass
class Prediction:
    raw_score: float              # max patch distance to the bank (Euclidean), optionally Eq. 7
    score: float                  # normalised: 0 = median nominal, 0.5 = threshold, clipped to [0, 1]
    threshold: float              # raw threshold
    is_anomalous: bool
    calibration: Calibration
    smoothed_map: torch.Tensor    # (S, S) smoothed patch distances at the network input size
    size: tuple[int, int]         # original (H, W)
    box: Box | None = None        # framed box in original pixels (None = whole frame); map is 0 outside

    # The full-size maps are computed on first use: the service renders them in its
    # thread pool, off the device worker, and not at all when no heatmap is asked for.
    @cached_property
    def anomaly_map(self) -> np.ndarray:
        """(H, W) float32 raw distances at the original image size."""
        return to_original_size(self.smoothed_map, self.size, self.box)

    @cached_property
    def normalised_map(self) -> np.ndarray:
        """(H, W) float32 with the same normalisation as `score` (0.5 = threshold)."""
        return self.calibration.normalise(self.anomaly_map).astype(np.float32)

    def normalised_map_at(self, size: tuple[int, int]) -> np.ndarray:
        """The normalised map laid over the photo scaled to `size` (H, W): the service
        renders at a bounded size, so a 40 MP photo never costs a 40 MP float map."""
        if tuple(size) == tuple(self.size):
            return self.normalised_map
        box = None
        if self.box is not None:  # the framed box, from original pixels to the map's
            sy, sx = size[0] / self.size[0], size[1] / self.size[1]
            box = (self.box[0] * sx, self.box[1] * sy, self.box[2] * sx, self.box[3] * sy)
        return self.calibration.normalise(to_original_size(self.smoothed_map, size, box)).astype(np.float32)


def _as_array(source: ImageSource) -> np.ndarray:
    return decode_image(Path(source), max_pixels=None) if isinstance(source, Path | str) else as_rgb_array(source)


def _batches(sources: Sequence[ImageSource], size: int) -> Iterator[list[np.ndarray]]:
    for start in range(0, len(sources), size):
        yield [_as_array(s) for s in sources[start:start + size]]


def _split_holdout(count: int, config: PatchCoreConfig) -> tuple[np.ndarray, np.ndarray]:
    if count < 2:
        raise NotEnoughImages(f"need at least 2 nominal images (one for the bank, one to calibrate), got {count}")
    holdout = int(round(count * config.holdout_fraction))
    holdout = min(max(holdout, config.min_holdout), count // 2)
    order = np.random.default_rng(config.seed).permutation(count)
    return np.sort(order[holdout:]), np.sort(order[:holdout])


def framed_boxes(framing: Framing, arrays: Sequence[np.ndarray],
                 original_sizes: Sequence[tuple[int, int]] | None = None) -> list[Box | None]:
    """The framed box of each array in its own pixels (None = whole frame). An array
    decoded at a reduced scale has its original (H, W) in original_sizes."""
    if framing.is_whole():
        return [None] * len(arrays)
    sizes = original_sizes if original_sizes is not None else [a.shape[:2] for a in arrays]
    try:
        return [framing.scaled_box(a.shape[:2], (int(s[0]), int(s[1])))
                for a, s in zip(arrays, sizes, strict=True)]
    except ValueError as exc:  # an image too small for the product's region of interest
        raise InvalidImage(str(exc)) from exc


def embed_images(embedder: PatchEmbedder, sources: Sequence[ImageSource], batch_size: int,
                 progress: Callable[[float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 framing: Framing | None = None) -> np.ndarray:
    """Stream images through the backbone into one preallocated (N * h * w, D) float32 array.

    Only one batch of decoded images is in memory at a time.
    """
    per_image = embedder.grid_size ** 2
    out = np.empty((len(sources) * per_image, embedder.feature_dim), dtype=np.float32)
    row = 0
    for done, batch in enumerate(_batches(sources, batch_size)):
        if should_stop is not None and should_stop():
            raise BuildCancelled("feature extraction cancelled")
        features = embedder.embed(embedder.preprocess(batch, framed_boxes(framing or Framing(), batch))).numpy()
        out[row:row + features.shape[0] * per_image] = features.reshape(-1, features.shape[-1])
        row += features.shape[0] * per_image
        if progress is not None:
            progress(min(1.0, (done + 1) * batch_size / len(sources)))
    return out


def build_bank(
    images: Sequence[ImageSource],
    config: PatchCoreConfig,
    embedder: PatchEmbedder,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    validation: tuple[Sequence[ImageSource], Sequence[int]] | None = None,
) -> MemoryBank:
    """Build a calibrated memory bank from nominal images.

    `validation` = (images, labels with 1 = defective) switches the threshold to F1-optimal.
    progress(phase, fraction) is called with phases features, coreset, calibration.
    """
    if embedder.config != config.embedder:
        raise BankIncompatible(f"embedder {embedder.config} does not match the config's {config.embedder}")
    report = progress or (lambda phase, fraction: None)
    timings: dict[str, float] = {}
    fit_ids, holdout_ids = _split_holdout(len(images), config)

    start = time.perf_counter()
    fit_sources = [images[i] for i in fit_ids]
    config.framing.validate()
    features = embed_images(embedder, fit_sources, config.batch_size,
                            lambda f: report("features", f), should_stop, config.framing)
    timings["features_s"] = time.perf_counter() - start

    start = time.perf_counter()
    size = coreset_size_for(features.shape[0], config.coreset_ratio, config.coreset_size)
    selected = greedy_coreset(features, size, projection_dim=config.projection_dim,
                              num_starts=config.num_starts, seed=config.seed, device=embedder.device,
                              progress=lambda f: report("coreset", f), should_stop=should_stop)
    bank_features = np.ascontiguousarray(features[np.sort(selected)])
    total_patches = features.shape[0]
    del features
    timings["coreset_s"] = time.perf_counter() - start

    start = time.perf_counter()
    index = create_index(bank_features, embedder.device)
    holdout_sources = [images[i] for i in holdout_ids]
    nominal_scores = _score_sources(embedder, index, holdout_sources, config, should_stop)
    calibration = calibrate_from_nominal(nominal_scores, config.false_alarm_rate, config.threshold_tail_margin)
    if validation is not None:
        val_scores = _score_sources(embedder, index, list(validation[0]), config, should_stop)
        calibration = calibrate_f1(val_scores, np.asarray(validation[1]), nominal_scores)
    report("calibration", 1.0)
    timings["calibration_s"] = time.perf_counter() - start

    manifest = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "software_version": __version__,
        "embedder": {**config.embedder.to_dict(), "feature_dim": embedder.feature_dim,
                     "stage_channels": list(embedder.stage_channels)},
        "framing": config.framing.to_dict(),
        "config": config.to_dict(),
        "coreset": {"ratio": config.coreset_ratio, "size": int(bank_features.shape[0]),
                    "total_patches": int(total_patches), "projection_dim": config.projection_dim,
                    "seed": config.seed},
        "images": {"fit": len(fit_ids), "holdout": len(holdout_ids)},
        "calibration": calibration.to_dict(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "distance": "euclidean",
    }
    return MemoryBank(features=bank_features, nominal_scores=nominal_scores, manifest=manifest)


def _score_sources(embedder: PatchEmbedder, index: SearchIndex, sources: Sequence[ImageSource],
                   config: PatchCoreConfig, should_stop: Callable[[], bool] | None) -> np.ndarray:
    scores = []
    for batch in _batches(sources, config.batch_size):
        if should_stop is not None and should_stop():
            raise BuildCancelled("calibration cancelled")
        embeddings = embedder.embed(embedder.preprocess(batch, framed_boxes(config.framing, batch))).numpy()
        scores.append(score_patches(index, embeddings, config.reweight_neighbours, config.top_k)[1])
    return np.concatenate(scores) if scores else np.zeros(0)


class PatchCoreModel:
    """One product's bank, ready to score. Holds no process-global state, so many
    products (or replicas) can live side by side."""

    def __init__(self, bank: MemoryBank, embedder: PatchEmbedder, search_backend: SearchBackend = "auto",
                 search_precision: SearchPrecision = "auto"):
        stored = EmbedderConfig.from_dict(bank.embedder)
        if stored != embedder.config:
            raise BankIncompatible(f"bank was built with {stored}, the embedder is {embedder.config}")
        if bank.features.shape[1] != embedder.feature_dim:
            raise BankIncompatible(
                f"bank features have {bank.features.shape[1]} dims, the embedder gives {embedder.feature_dim}")
        self.bank = bank
        self.embedder = embedder
        config = bank.manifest.get("config", {})
        self.reweight_neighbours = int(config.get("reweight_neighbours", 0))
        self.top_k = int(config.get("top_k", 1))
        self.framing = Framing.from_dict(bank.manifest.get("framing"))
        self.gaussian_sigma = float(config.get("gaussian_sigma", 4.0))
        self.calibration = Calibration.from_dict(bank.calibration)
        # Exact search on the embedder's device (app.core.knn.create_index picks faiss or torch).
        self.index = create_index(bank.features, embedder.device, search_backend, search_precision)

    @property
    def embedder_config(self) -> EmbedderConfig:
        return self.embedder.config

    def predict(self, images: Sequence[ImageSource],
                original_sizes: Sequence[tuple[int, int]] | None = None) -> list[Prediction]:
        """Score a batch of images of any sizes; one Prediction per image, maps at original size.

        `original_sizes` (H, W) per image: where the maps go when the arrays were decoded
        at a reduced scale (images.decode_for_model); default: each array's own size.
        """
        arrays = [_as_array(image) for image in images]
        if not arrays:
            return []
        if original_sizes is not None and len(original_sizes) != len(arrays):
            raise ValueError(f"{len(original_sizes)} original sizes for {len(arrays)} images")
        embeddings = self.embedder.embed(self.preprocess(arrays, original_sizes))
        sizes = original_sizes if original_sizes is not None else [a.shape[:2] for a in arrays]
        return self.predict_embeddings(embeddings, sizes)

    def preprocess(self, arrays: Sequence[np.ndarray],
                   original_sizes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Decoded images -> the backbone's input, framed as this product's bank was.

        An array decoded at a reduced scale passes its original (H, W) in
        original_sizes, so the framed box (original pixels) is scaled onto it.
        """
        return self.embedder.preprocess(arrays, framed_boxes(self.framing, arrays, original_sizes))

    def predict_embeddings(self, embeddings: torch.Tensor | np.ndarray,
                           original_sizes: Sequence[tuple[int, int]]) -> list[Prediction]:
        """embeddings (B, h, w, D) from this model's embedder -> predictions."""
        array = embeddings.numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
        if array.ndim != 4 or array.shape[0] != len(original_sizes):
            raise ValueError(f"embeddings must be (B, h, w, D) with B = {len(original_sizes)}, got {array.shape}")
        patch_scores, image_scores = score_patches(self.index, array, self.reweight_neighbours, self.top_k)
        maps = smoothed_maps(patch_scores, self.embedder.config.image_size, self.gaussian_sigma)
        threshold = self.calibration.threshold
        return [
            Prediction(
                raw_score=float(raw), score=float(self.calibration.normalise(raw)), threshold=threshold,
                is_anomalous=bool(raw > threshold), calibration=self.calibration,
                smoothed_map=maps[i], size=(int(size[0]), int(size[1])),
                box=None if self.framing.is_whole() else self.framing.box(int(size[0]), int(size[1])),
            )
            for i, (raw, size) in enumerate(zip(image_scores, original_sizes, strict=True))
        ]


@dataclass(frozen=True)
class BatchItem:
    """One preprocessed image for `predict_batch`, with the model that scores it."""

    model: PatchCoreModel
    tensor: torch.Tensor          # (3, S, S) float32, from model.preprocess (framed)
    size: tuple[int, int]         # original (H, W)


def predict_batch(items: Sequence[BatchItem]) -> list[Prediction | Exception]:
    """Score images of many products in one call: one backbone pass per embedder
    (products built with the same EmbedderConfig share it), then each model's kNN
    on its slice. A failure fails only the items it touched: their entry is the
    exception, the others are Predictions."""
    results: list[Prediction | Exception | None] = [None] * len(items)
    by_embedder: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        by_embedder.setdefault(id(item.model.embedder), []).append(index)
    for indices in by_embedder.values():
        embedder = items[indices[0]].model.embedder
        try:
            features = embedder.embed(torch.stack([items[i].tensor for i in indices]))
        except Exception as exc:
            for i in indices:
                results[i] = exc
            continue
        by_model: dict[int, list[int]] = {}
        for position, i in enumerate(indices):
            by_model.setdefault(id(items[i].model), []).append(position)
        for positions in by_model.values():
            model = items[indices[positions[0]]].model
            predictions: Sequence[Prediction | Exception]
            try:
                predictions = model.predict_embeddings(
                    features[positions], [items[indices[p]].size for p in positions])
                if len(predictions) != len(positions):
                    raise RuntimeError("predict_embeddings returned the wrong number of results")
            except Exception as exc:
                predictions = [exc] * len(positions)
            for p, prediction in zip(positions, predictions, strict=True):
                results[indices[p]] = prediction
    return [r if r is not None else RuntimeError("item was not scored") for r in results]
