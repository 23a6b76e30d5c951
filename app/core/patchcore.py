"""PatchCore: build a memory bank from nominal images, then score new images.

    build_bank(images) : embed -> greedy coreset (Sec. 3.2) -> calibrate on held-out nominals
    append_to_bank(bank, images) : embed new images -> continue the coreset from the bank -> recalibrate
    PatchCoreModel.predict(images) : embed -> kNN to the bank (Sec. 3.3) -> score, decision, map
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app import __version__
from app.core.bank import MemoryBank
from app.core.calibration import MIN_FALSE_ALARM_RATE, Calibration, calibrate_f1, calibrate_from_nominal
from app.core.coreset import continue_coreset, coreset_size_for, projection_matrix, select_coreset
from app.core.embedding import EmbedderConfig, PatchEmbedder, group_by_shape
from app.core.errors import BankIncompatible, BuildCancelled, InvalidImage, NotEnoughImages
from app.core.framing import Box, Framing
from app.core.images import as_rgb_array, decode_image
from app.core.knn import SearchBackend, SearchIndex, SearchPrecision, create_index
from app.core.scoring import input_size_of, score_patches, smoothed_maps, to_original_size

ImageSource = Path | str | np.ndarray
ProgressFn = Callable[[str, float], None]


# Map smoothing beyond this (in network-input pixels) blurs a 224 px map into one blob.
MAX_MAP_SIGMA = 32.0


def check_map_sigma(sigma: float) -> float:
    """The map smoothing sigma, or ValueError outside [0, MAX_MAP_SIGMA] (NaN included)."""
    if not 0.0 <= sigma <= MAX_MAP_SIGMA:
        raise ValueError(f"must be between 0 and {MAX_MAP_SIGMA:g} px, got {sigma}")
    return sigma


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
    gaussian_sigma: float = 4.0         # anomaly map smoothing, px at the input size (paper: 4)
    stage_balance: bool = False         # scale each stage to an equal measured share (per product; README)
    holdout_fraction: float = 0.1       # nominal images kept out of the bank for calibration
    min_holdout: int = 5
    false_alarm_rate: float = 0.01      # target rate of good parts flagged, for the threshold
    threshold_tail_margin: float = 0.25  # threshold >= max held-out + margin * (max - median)
    batch_size: int = 8                 # images per backbone pass while building (peak memory)
    seed: int = 0

    def validate(self) -> None:
        """ValueError for settings no caller should be able to build a bank with (the CLI and the
        admin schema check the same bounds first, with their own messages)."""
        self.embedder.validate()
        self.framing.validate()
        try:
            check_map_sigma(self.gaussian_sigma)
        except ValueError as exc:
            raise ValueError(f"gaussian_sigma {exc}") from None
        if self.top_k < 1:
            raise ValueError("top_k must be at least 1")
        if self.reweight_neighbours < 0 or self.reweight_neighbours == 1:
            # N_b(m*) holds m*'s own nearest row, so with b = 1 Eq. 7's weight is 1 - 1 = 0 for every image.
            raise ValueError("reweight_neighbours must be 0 (off) or at least 2")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError("coreset_ratio must be in (0, 1]")
        if self.coreset_size is not None and self.coreset_size < 1:
            raise ValueError("coreset_size must be at least 1")
        if not 0.0 <= self.holdout_fraction < 1.0 or self.min_holdout < 1:
            raise ValueError("holdout_fraction must be in [0, 1) and min_holdout at least 1")
        if not MIN_FALSE_ALARM_RATE <= self.false_alarm_rate < 0.5:
            raise ValueError(f"false_alarm_rate must be in [{MIN_FALSE_ALARM_RATE:g}, 0.5)")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["embedder"] = self.embedder.to_dict()
        data["framing"] = self.framing.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PatchCoreConfig:
        """The config a bank was built with (its manifest's "config"); unknown keys are ignored.
        A config without framing saw the whole frame squeezed (Framing.from_dict), never the
        default of today's builds."""
        known = {f.name for f in dataclasses.fields(cls)} - {"embedder", "framing"}
        values = {k: v for k, v in data.items() if k in known}
        framing = Framing.from_dict(data.get("framing"))
        return cls(embedder=EmbedderConfig.from_dict(data["embedder"]), framing=framing, **values)


@dataclass
class Prediction:
    raw_score: float              # max patch distance to the bank (Euclidean), optionally Eq. 7
    score: float                  # normalised: 0 = median nominal, 0.5 = threshold, clipped to [0, 1]
    threshold: float              # raw threshold
    is_anomalous: bool
    calibration: Calibration
    smoothed_map: torch.Tensor    # (h, w) smoothed patch distances at the network input's size
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

    def raw_map_at(self, size: tuple[int, int]) -> np.ndarray:
        """The raw distance map laid over the photo scaled to `size` (H, W)."""
        if tuple(size) == tuple(self.size):
            return self.anomaly_map
        box = None
        if self.box is not None:  # the framed box, from original pixels to the map's
            sy, sx = size[0] / self.size[0], size[1] / self.size[1]
            box = (self.box[0] * sx, self.box[1] * sy, self.box[2] * sx, self.box[3] * sy)
        return to_original_size(self.smoothed_map, size, box)

    def normalised_map_at(self, size: tuple[int, int]) -> np.ndarray:
        """The normalised map laid over the photo scaled to `size` (H, W): the service
        renders at a bounded size, so a 40 MP photo never costs a 40 MP float map."""
        if tuple(size) == tuple(self.size):
            return self.normalised_map
        return self.calibration.normalise(self.raw_map_at(size)).astype(np.float32)


# Stage balancing reads the spread of each stage from this many nominal images (evenly
# spaced over the fit set): factors within 0.1% (bottle, 188 fit images) and 0.7%
# (magnetic_tile, 685) of those from every fit image.
STAGE_BALANCE_IMAGES = 64


def stage_balance_factors(features: np.ndarray, stage_dims: Sequence[int]) -> list[float]:
    """One factor per stage that gives every stage the same share of the expected squared
    distance between two nominal patches (E||x - y||^2 = 2 x the sum of the per-value
    variances), keeping the total.

    The default weight, 1/sqrt(width) per stage (the official code's equal-width pooling),
    assumes the stages' values spread alike. Lite0's stride-8 values spread about twice as
    wide as its stride-16 ones, so the deeper, more semantic stage counts a quarter as much
    in the distance. Balanced, it lifts a texture's detection and coarsens the map (README,
    issue 8: magnetic_tile up, bottle's small defects down), hence a per-product option.
    A stage without any spread (identical images) keeps factor 1.
    """
    bounds = np.cumsum([0, *stage_dims])
    shares = np.array([features[:, lo:hi].astype(np.float64).var(axis=0).sum()
                       for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)])
    if not np.all(np.isfinite(shares)) or shares.min() <= 0.0:
        return [1.0] * len(stage_dims)
    return [float(f) for f in np.sqrt(shares.mean() / shares)]


def feature_scale(factors: Sequence[float], stage_dims: Sequence[int]) -> np.ndarray:
    """Per-stage factors -> one factor per feature value (D,) float32."""
    return np.repeat(np.asarray(factors, dtype=np.float32), list(stage_dims))


def bank_feature_scale(manifest: dict, stage_dims: Sequence[int]) -> np.ndarray | None:
    """The per-value scale a stage-balanced bank's rows were stored in (None: not balanced).
    Queries must be scaled alike before they are searched."""
    stored = manifest.get("stage_balance")
    if stored is None:
        return None
    factors = stored.get("factors") if isinstance(stored, dict) else None
    if (not isinstance(factors, list) or len(factors) != len(stage_dims)
            or not all(isinstance(f, int | float) and not isinstance(f, bool) and 0.0 < f < float("inf")
                       for f in factors)):
        raise BankIncompatible(f"the bank's stage balance {stored!r} is unusable: "
                               f"expected {len(stage_dims)} positive factors")
    return feature_scale(factors, stage_dims)


def _as_array(source: ImageSource) -> np.ndarray:
    if not isinstance(source, Path | str):
        return as_rgb_array(source)
    try:
        return decode_image(Path(source), max_pixels=None)
    except InvalidImage as exc:  # one bad file among hundreds: say which
        raise InvalidImage(f"{Path(source).name}: {exc}") from exc


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


def input_shapes(framing: Framing, arrays: Sequence[np.ndarray], size: int,
                 original_sizes: Sequence[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """The network input's (H, W) for each array: S x S, or with the aspect kept from its
    framed box in original pixels (an array decoded at a reduced scale has its original
    (H, W) in original_sizes)."""
    sizes = original_sizes if original_sizes is not None else [a.shape[:2] for a in arrays]
    try:
        return [framing.input_shape_for((int(s[0]), int(s[1])), size) for s in sizes]
    except ValueError as exc:  # an image too small for the product's region of interest
        raise InvalidImage(str(exc)) from exc


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
                 framing: Framing | None = None, projection: np.ndarray | None = None,
                 scale: np.ndarray | None = None, grids: list[tuple[int, int]] | None = None) -> np.ndarray:
    """Stream images through the backbone into one (sum of h * w, D) float32 array of rows,
    image after image.

    Only one batch of decoded images is in memory at a time. With `projection` (D, d)
    each batch is projected as it comes and only the (rows, d) projection is kept.
    `scale` (D,) multiplies every feature first (a stage-balanced bank's space).
    `grids`, when given, gets each image's patch grid (h, w) appended: with the aspect
    kept (framing), images of other aspects give other grids.
    """
    width = embedder.feature_dim if projection is None else projection.shape[1]
    # Preallocated for S x S inputs; an aspect-kept input holds about as many patches
    # (area about S x S, sides rounded to 16 px), and the array grows if it holds more.
    out = np.empty((len(sources) * embedder.grid_size ** 2, width), dtype=np.float32)
    row = 0
    for done, batch in enumerate(_batches(sources, batch_size)):
        if should_stop is not None and should_stop():
            raise BuildCancelled("feature extraction cancelled")
        per_image = _framed_features(embedder, batch, framing, scale)
        features = _as_rows(per_image)
        rows = features.shape[0]
        if row + rows > out.shape[0]:
            remaining = len(sources) - done * batch_size - len(batch)
            grown = np.empty((row + rows + remaining * embedder.grid_size ** 2 * 5 // 4, width), dtype=np.float32)
            grown[:row] = out[:row]
            out = grown
        if projection is None:
            out[row:row + rows] = features
        else:
            np.matmul(features, projection, out=out[row:row + rows])
        row += rows
        if grids is not None:
            grids.extend((int(f.shape[0]), int(f.shape[1])) for f in per_image)
        if progress is not None:
            progress(min(1.0, (done + 1) * batch_size / len(sources)))
    return out[:row] if row < out.shape[0] else out


def _framed_features(embedder: PatchEmbedder, batch: Sequence[np.ndarray], framing: Framing | None,
                     scale: np.ndarray | None = None) -> list[np.ndarray]:
    """One batch of decoded images -> each one's patch features (h, w, D) float32, framed
    as the product frames them (box and input shape) and scaled as its bank is (stage
    balancing), as a query will be."""
    framing = framing or Framing()
    tensors = embedder.preprocess_each(batch, framed_boxes(framing, batch),
                                       input_shapes(framing, batch, embedder.config.image_size))
    features = [f.numpy() for f in embedder.embed_all(tensors)]
    if scale is not None:
        for f in features:
            f *= scale
    return features


def _as_rows(features: Sequence[np.ndarray]) -> np.ndarray:
    """Per-image patch features (h, w, D) -> their rows (sum of h * w, D), image after image."""
    return np.concatenate([f.reshape(-1, f.shape[-1]) for f in features])


def image_scores_of(index: SearchIndex, features: Sequence[np.ndarray], reweight_neighbours: int = 0,
                    top_k: int = 1) -> np.ndarray:
    """Image scores of per-image patch features (h, w, D) of any grids, in their order:
    one search per distinct grid."""
    scores = np.empty(len(features), dtype=np.float64)
    for indices in group_by_shape(features).values():
        scores[indices] = score_patches(index, np.stack([features[i] for i in indices]), reweight_neighbours,
                                        top_k)[1]
    return scores


def split_rows(rows: np.ndarray, grids: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Rows of images laid one after another (embed_images) -> each image's (h, w, D)."""
    ends = np.cumsum([h * w for h, w in grids])
    return [part.reshape(h, w, -1) for part, (h, w) in zip(np.split(rows, ends[:-1]), grids, strict=True)]


def collect_rows(embedder: PatchEmbedder, sources: Sequence[ImageSource], batch_size: int, rows: np.ndarray,
                 grids: Sequence[tuple[int, int]], should_stop: Callable[[], bool] | None = None,
                 framing: Framing | None = None, scale: np.ndarray | None = None) -> np.ndarray:
    """The patch features of the given rows (sorted, of the array that `embed_images`
    returned with these `grids`), embedding again only the images that hold one."""
    starts = np.concatenate([[0], np.cumsum([h * w for h, w in grids])]).astype(np.int64)
    out = np.empty((len(rows), embedder.feature_dim), dtype=np.float32)
    owner = np.searchsorted(starts, rows, side="right") - 1
    wanted = np.unique(owner)
    written = 0
    for start in range(0, len(wanted), batch_size):
        if should_stop is not None and should_stop():
            raise BuildCancelled("feature extraction cancelled")
        images = wanted[start:start + batch_size]
        per_image = _framed_features(embedder, [_as_array(sources[i]) for i in images], framing, scale)
        if [f.shape[:2] for f in per_image] != [tuple(grids[i]) for i in images]:
            raise RuntimeError("an image gave another patch grid than when it was first embedded")
        features = _as_rows(per_image)
        # Rows of these images, as positions in this batch's features.
        lo, hi = np.searchsorted(rows, [starts[images[0]], starts[images[-1] + 1]])
        chosen = rows[lo:hi]
        batch_starts = np.concatenate([[0], np.cumsum([starts[i + 1] - starts[i] for i in images])])
        image_of = np.searchsorted(images, owner[lo:hi])
        position = batch_starts[image_of] + (chosen - starts[owner[lo:hi]])
        out[written:written + len(chosen)] = features[position]
        written += len(chosen)
    return out


def build_bank(
    images: Sequence[ImageSource],
    config: PatchCoreConfig,
    embedder: PatchEmbedder,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    validation: tuple[Sequence[ImageSource], Sequence[int]] | None = None,
    image_ids: Sequence[str] | None = None,
) -> MemoryBank:
    """Build a calibrated memory bank from nominal images.

    `image_ids` (e.g. content hashes of the images) go into the lineage, so that a
    later append can skip images the bank already descends from.

    `validation` = (images, labels with 1 = defective) switches the threshold to F1-optimal.
    progress(phase, fraction) is called with phases features, coreset, calibration.
    """
    if embedder.config != config.embedder:
        raise BankIncompatible(f"embedder {embedder.config} does not match the config's {config.embedder}")
    config.validate()
    report = progress or (lambda phase, fraction: None)
    timings: dict[str, float] = {}
    fit_ids, holdout_ids = _split_holdout(len(images), config)

    start = time.perf_counter()
    fit_sources = [images[i] for i in fit_ids]
    scale, balance = None, None
    if config.stage_balance:
        sample = [fit_sources[i] for i in np.unique(np.linspace(0, len(fit_sources) - 1,
                                                                STAGE_BALANCE_IMAGES).round().astype(int))]
        factors = stage_balance_factors(embed_images(embedder, sample, config.batch_size, None, should_stop,
                                                     config.framing), embedder.stage_dims)
        scale = feature_scale(factors, embedder.stage_dims)
        balance = {"factors": factors, "sample_images": len(sample)}
    # With a projection for the coreset, only the projected features are kept while
    # selecting (a half or less of the full ones: magnetic_tile's 537k x 256 features
    # are 0.55 GB), and the chosen rows are embedded again afterwards.
    projection = (None if config.projection_dim is None
                  else projection_matrix(embedder.feature_dim, config.projection_dim, config.seed))
    grids: list[tuple[int, int]] = []
    features = embed_images(embedder, fit_sources, config.batch_size,
                            lambda f: report("features", f), should_stop, config.framing, projection, scale, grids)
    timings["features_s"] = time.perf_counter() - start

    start = time.perf_counter()
    size = coreset_size_for(features.shape[0], config.coreset_ratio, config.coreset_size)
    selection = select_coreset(features, size, projection_dim=config.projection_dim,
                               num_starts=config.num_starts, seed=config.seed, device=embedder.device,
                               progress=lambda f: report("coreset", f), should_stop=should_stop,
                               projected=projection is not None)
    chosen = np.sort(selection.indices)
    total_patches = features.shape[0]
    if projection is None:
        bank_features = np.ascontiguousarray(features[chosen])
    del features
    timings["coreset_s"] = time.perf_counter() - start
    if projection is not None:
        start = time.perf_counter()
        bank_features = collect_rows(embedder, fit_sources, config.batch_size, chosen, grids, should_stop,
                                     config.framing, scale)
        timings["features_s"] += time.perf_counter() - start

    start = time.perf_counter()
    index = create_index(bank_features, embedder.device)
    holdout_sources = [images[i] for i in holdout_ids]
    nominal_scores = _score_sources(embedder, index, holdout_sources, config, should_stop, scale)
    calibration = calibrate_from_nominal(nominal_scores, config.false_alarm_rate, config.threshold_tail_margin)
    if validation is not None:
        val_scores = _score_sources(embedder, index, list(validation[0]), config, should_stop, scale)
        calibration = calibrate_f1(val_scores, np.asarray(validation[1]), nominal_scores)
    report("calibration", 1.0)
    timings["calibration_s"] = time.perf_counter() - start

    created_at = datetime.now(UTC).isoformat(timespec="seconds")
    manifest = {
        "created_at": created_at,
        "software_version": __version__,
        "embedder": {**config.embedder.to_dict(), "feature_dim": embedder.feature_dim,
                     "stage_channels": list(embedder.stage_channels)},
        "framing": config.framing.to_dict(),
        "stage_balance": balance,
        "config": config.to_dict(),
        # coverage_radius: in the selection space (projection_dim, seed); an append build
        # with until="radius" selects until its new patches are covered as well.
        "coreset": {"ratio": config.coreset_ratio, "size": int(bank_features.shape[0]),
                    "total_patches": int(total_patches), "projection_dim": config.projection_dim,
                    "seed": config.seed, "coverage_radius": selection.radius},
        "images": {"fit": len(fit_ids), "holdout": len(holdout_ids)},
        "lineage": {"images": len(images), "images_in_bank": len(fit_ids), "total_patches": int(total_patches),
                    "base_versions": [], "image_ids": list(image_ids or []),
                    "steps": [{"mode": "full", "created_at": created_at, "fit": len(fit_ids),
                               "holdout": len(holdout_ids), "patches": int(total_patches)}]},
        "calibration": calibration.to_dict(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "distance": "euclidean",
    }
    return MemoryBank(features=bank_features, nominal_scores=nominal_scores, manifest=manifest)


APPEND_UNTIL = ("size", "radius")


def base_lineage(manifest: dict) -> dict:
    """A bank's lineage; banks written before lineage was recorded get one from their manifest."""
    if "lineage" in manifest:
        return copy.deepcopy(manifest["lineage"])
    images = manifest.get("images", {})
    fit, holdout = int(images.get("fit", 0)), int(images.get("holdout", 0))
    patches = manifest.get("coreset", {}).get("total_patches")
    return {"images": fit + holdout, "images_in_bank": fit, "total_patches": patches, "base_versions": [],
            "steps": [{"mode": "full", "created_at": manifest.get("created_at"), "fit": fit, "holdout": holdout,
                       "patches": patches}]}


def bank_framing(manifest: dict) -> Framing:
    """The framing a bank's patches were embedded with. Append builds before this
    release wrote it only inside "config" (and embedded their new images whole), so
    that copy is read when the top-level one is missing."""
    stored = manifest.get("framing")
    if stored is None:
        stored = (manifest.get("config") or {}).get("framing")
    return Framing.from_dict(stored)


def append_config(base_bank: MemoryBank, **overrides: Any) -> PatchCoreConfig:
    """The base bank's own build config with `overrides` (e.g. coreset_ratio, seed, batch_size).

    A ratio given without a size replaces the base's size too: a bank built with an absolute
    coreset size kept it, so an append asking for a ratio got the base's own size and failed
    ("the target bank size does not exceed the base's")."""
    if overrides.get("coreset_ratio") is not None and "coreset_size" not in overrides:
        overrides["coreset_size"] = None
    stored = dict(base_bank.manifest.get("config") or {})
    stored["embedder"] = EmbedderConfig.from_dict(base_bank.embedder).to_dict()
    # The framing its rows were embedded with (a bank from before framing has none: whole, squeezed).
    stored["framing"] = bank_framing(base_bank.manifest).to_dict()
    return dataclasses.replace(PatchCoreConfig.from_dict(stored), **overrides)


def _split_new(count: int, config: PatchCoreConfig) -> int:
    """How many new images calibrate (scored before their own patches join the bank).

    The full build's rule (10%, at least 5, at most half), but at least one: with a
    single new image that image is scored against the base bank alone.
    """
    holdout = int(round(count * config.holdout_fraction))
    return min(max(holdout, config.min_holdout), max(1, count // 2))


def append_to_bank(
    base_bank: MemoryBank,
    new_images: Sequence[ImageSource],
    config: PatchCoreConfig,
    embedder: PatchEmbedder,
    *,
    base_version: str | None = None,
    until: str = "size",
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    validation: tuple[Sequence[ImageSource], Sequence[int]] | None = None,
    image_ids: Sequence[str] | None = None,
) -> MemoryBank:
    """A new bank from `base_bank` plus new nominal images, without the base's images.

    The new bank holds every entry of the base (first, in the same order) plus new
    patches picked by continuing the base's greedy coreset (`continue_coreset`):
    - until="size": up to the target size, `config.coreset_ratio` of all patches the
      lineage has seen (base total from the manifest + the new ones) or `coreset_size`;
    - until="radius": the same cap, but stop as soon as the new patches are covered
      within the base's recorded coverage radius (banks without one: size only).
    Selection runs in the base's projection (its projection_dim and seed).

    Calibration (see README, "Append builds"): a share of the new images (the full
    build's holdout rule, at least one) is scored against the base plus the centres
    from the other new images, then appended too. Their scores and the base's stored
    held-out scores are both upper bounds of what those images would score against the
    final bank (its entries are a superset, so every nearest distance can only shrink),
    so the threshold errs towards fewer false alarms, never more.
    """
    if until not in APPEND_UNTIL:
        raise ValueError(f"until must be one of {APPEND_UNTIL}, got {until!r}")
    if not new_images:
        raise NotEnoughImages("an append build needs at least one new image")
    base_embedder = EmbedderConfig.from_dict(base_bank.embedder)
    if embedder.config != base_embedder or config.embedder != base_embedder:
        raise BankIncompatible(f"the base bank was built with {base_embedder}; cannot append with "
                               f"{embedder.config if embedder.config != base_embedder else config.embedder}")
    if base_bank.features.shape[1] != embedder.feature_dim:
        raise BankIncompatible(f"base bank features have {base_bank.features.shape[1]} dims, "
                               f"the embedder gives {embedder.feature_dim}")
    base_config = base_bank.manifest.get("config") or {}
    if int(base_config.get("reweight_neighbours", 0)) != config.reweight_neighbours:
        raise ValueError("reweight_neighbours must stay that of the base bank (its stored scores use it)")
    if config.framing != bank_framing(base_bank.manifest):
        raise ValueError("the framing must stay that of the base bank (its patches were embedded with it)")
    # New patches go into the base's space, with the base's factors (never measured again).
    scale = bank_feature_scale(base_bank.manifest, embedder.stage_dims)
    if config.stage_balance != (scale is not None):
        raise ValueError("stage_balance must stay that of the base bank (its rows are stored balanced or not)")
    report = progress or (lambda phase, fraction: None)
    timings: dict[str, float] = {}
    lineage = base_lineage(base_bank.manifest)
    base_coreset = base_bank.manifest.get("coreset") or {}
    # The lineage's projection, so old and new points are compared in one space.
    projection_dim = base_coreset.get("projection_dim", config.projection_dim)
    projection_seed = int(base_coreset.get("seed", config.seed))
    base_radius = base_coreset.get("coverage_radius")
    stop_radius = float(base_radius) if until == "radius" and base_radius is not None else None

    count = len(new_images)
    holdout = _split_new(count, config)
    order = np.random.default_rng(config.seed).permutation(count)
    fit_ids, holdout_ids = np.sort(order[holdout:]), np.sort(order[:holdout])

    start = time.perf_counter()
    sources = [new_images[i] for i in np.concatenate([fit_ids, holdout_ids])]
    grids: list[tuple[int, int]] = []
    features = embed_images(embedder, sources, config.batch_size, lambda f: report("features", f), should_stop,
                            config.framing, scale=scale, grids=grids)
    fit_rows = sum(h * w for h, w in grids[:len(fit_ids)])
    new_patches = int(features.shape[0])
    fit_features, holdout_features = features[:fit_rows], features[fit_rows:]
    timings["features_s"] = time.perf_counter() - start

    start = time.perf_counter()
    base_total = lineage.get("total_patches")
    total_patches = (int(base_total) if base_total is not None else 0) + features.shape[0]
    if config.coreset_size is not None:
        target = int(config.coreset_size)
    elif base_total is None:
        raise BankIncompatible("the base bank does not record its patch count; append with an absolute coreset size")
    else:
        target = coreset_size_for(total_patches, config.coreset_ratio)
    budget = target - base_bank.size
    if budget <= 0:
        raise ValueError(f"the target bank size {target} does not exceed the base bank's {base_bank.size}: "
                         "raise the coreset ratio or size")
    # The budget is shared in proportion to the patches of each stage.
    fit_budget = int(round(budget * len(fit_ids) / count))
    fit_share = len(fit_ids) / count

    def select(centres: np.ndarray, candidates: np.ndarray, size: int, share: float, offset: float):
        return continue_coreset(centres, candidates, size, stop_radius=stop_radius, projection_dim=projection_dim,
                                seed=projection_seed, device=embedder.device, should_stop=should_stop,
                                progress=lambda f: report("coreset", offset + share * f))

    first = select(base_bank.features, fit_features, fit_budget, fit_share, 0.0)
    partial = np.concatenate([base_bank.features, fit_features[np.sort(first.indices)]])
    timings["coreset_s"] = time.perf_counter() - start

    start = time.perf_counter()
    index = create_index(partial, embedder.device)
    new_scores = image_scores_of(index, split_rows(holdout_features, grids[len(fit_ids):]),
                                 config.reweight_neighbours, config.top_k)
    del index
    timings["calibration_s"] = time.perf_counter() - start

    start = time.perf_counter()
    second = select(partial, holdout_features, budget - fit_budget, 1.0 - fit_share, fit_share)
    bank_features = np.ascontiguousarray(np.concatenate([partial, holdout_features[np.sort(second.indices)]]))
    added = len(first.indices) + len(second.indices)
    del features, fit_features, holdout_features, partial
    timings["coreset_s"] += time.perf_counter() - start

    start = time.perf_counter()
    nominal_scores = np.concatenate([np.asarray(base_bank.nominal_scores, dtype=np.float64), new_scores])
    calibration = calibrate_from_nominal(nominal_scores, config.false_alarm_rate, config.threshold_tail_margin)
    if validation is not None:
        index = create_index(bank_features, embedder.device)
        val_scores = _score_sources(embedder, index, list(validation[0]), config, should_stop, scale)
        calibration = calibrate_f1(val_scores, np.asarray(validation[1]), nominal_scores)
    report("calibration", 1.0)
    timings["calibration_s"] += time.perf_counter() - start

    # Old patches stay within the base radius of the base entries (all kept), so the
    # lineage's radius is at most the larger of that and the new patches' radius.
    radii = [first.radius if len(fit_ids) else 0.0, second.radius]
    radius = None if base_radius is None else max(float(base_radius), *radii)
    stopped_by = "radius" if stop_radius is not None and added < budget else "size"
    created_at = datetime.now(UTC).isoformat(timespec="seconds")
    lineage["images"] = int(lineage.get("images", 0)) + count
    lineage["images_in_bank"] = int(lineage.get("images_in_bank", 0)) + count
    lineage["total_patches"] = total_patches if base_total is not None else None
    lineage["base_versions"] = [base_version, *lineage.get("base_versions", [])]
    lineage["image_ids"] = [*lineage.get("image_ids", []), *(image_ids or [])]
    lineage["steps"].append({"mode": "append", "created_at": created_at, "base_version": base_version,
                             "images": count, "fit": len(fit_ids), "holdout": len(holdout_ids),
                             "patches": new_patches, "new_entries": added, "until": until,
                             "stopped_by": stopped_by, "radius_target": stop_radius})
    manifest = {
        "created_at": created_at,
        "software_version": __version__,
        "embedder": {**config.embedder.to_dict(), "feature_dim": embedder.feature_dim,
                     "stage_channels": list(embedder.stage_channels)},
        "framing": config.framing.to_dict(),
        "stage_balance": base_bank.manifest.get("stage_balance"),
        "config": config.to_dict(),
        "coreset": {"ratio": None if config.coreset_size is not None else config.coreset_ratio,
                    "size": int(bank_features.shape[0]), "total_patches": lineage["total_patches"],
                    "projection_dim": projection_dim, "seed": projection_seed, "coverage_radius": radius,
                    "base_size": base_bank.size, "added": added},
        "images": {"fit": len(fit_ids), "holdout": len(holdout_ids)},
        "lineage": lineage,
        "calibration": calibration.to_dict(),
        # Every score is an upper bound of that image's score against this bank (see append_to_bank).
        "calibration_scores": {"base_holdout": int(len(base_bank.nominal_scores)), "new_holdout": len(holdout_ids),
                               "bound": "upper" if config.reweight_neighbours == 0 else "approximate"},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "distance": "euclidean",
    }
    return MemoryBank(features=bank_features, nominal_scores=nominal_scores, manifest=manifest)


def _score_sources(embedder: PatchEmbedder, index: SearchIndex, sources: Sequence[ImageSource],
                   config: PatchCoreConfig, should_stop: Callable[[], bool] | None,
                   scale: np.ndarray | None = None) -> np.ndarray:
    scores = []
    for batch in _batches(sources, config.batch_size):
        if should_stop is not None and should_stop():
            raise BuildCancelled("calibration cancelled")
        features = _framed_features(embedder, batch, config.framing, scale)
        scores.append(image_scores_of(index, features, config.reweight_neighbours, config.top_k))
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
        config = bank.manifest.get("config") or {}
        try:
            self.reweight_neighbours = int(config.get("reweight_neighbours", 0))
            self.top_k = int(config.get("top_k", 1))
            self.framing = bank_framing(bank.manifest)
        except (TypeError, ValueError) as exc:
            raise BankIncompatible(f"the bank's stored scoring or framing settings are unusable: {exc}") from exc
        if self.top_k < 1 or self.reweight_neighbours < 0 or self.reweight_neighbours == 1:
            raise BankIncompatible(f"the bank's stored top_k {self.top_k} / reweight_neighbours "
                                   f"{self.reweight_neighbours} are unusable")
        try:  # a bank file is input like any other: an absurd sigma would stall every predict
            self.gaussian_sigma = check_map_sigma(float(config.get("gaussian_sigma",
                                                                   PatchCoreConfig.gaussian_sigma)))
        except (TypeError, ValueError) as exc:
            raise BankIncompatible(f"the bank's stored map sigma is unusable: {exc}") from exc
        self.calibration = Calibration.from_dict(bank.calibration)
        self.feature_scale = bank_feature_scale(bank.manifest, embedder.stage_dims)
        self._scale_on: dict[str, torch.Tensor] = {}
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
        tensors = self.preprocess(arrays, original_sizes)
        sizes = original_sizes if original_sizes is not None else [a.shape[:2] for a in arrays]
        predictions: list[Prediction | None] = [None] * len(arrays)
        for indices in group_by_shape(tensors).values():
            embeddings = self.embedder.embed(torch.stack([tensors[i] for i in indices]))
            for i, prediction in zip(indices, self.predict_embeddings(embeddings, [sizes[i] for i in indices]),
                                     strict=True):
                predictions[i] = prediction
        return predictions  # type: ignore[return-value]

    def preprocess(self, arrays: Sequence[np.ndarray],
                   original_sizes: Sequence[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """Decoded images -> one backbone input (3, h, w) each, framed as this product's bank
        was (box and input shape).

        An array decoded at a reduced scale passes its original (H, W) in
        original_sizes, so the framed box (original pixels) is scaled onto it.
        """
        return self.embedder.preprocess_each(arrays, framed_boxes(self.framing, arrays, original_sizes),
                                             self.input_shapes(arrays, original_sizes))

    def input_shapes(self, arrays: Sequence[np.ndarray],
                     original_sizes: Sequence[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
        """The backbone input's (H, W) for each array, as this product's bank framed them."""
        return input_shapes(self.framing, arrays, self.embedder.config.image_size, original_sizes)

    def scaled(self, embeddings: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Patch features (..., D) from the embedder -> this bank's space (a stage-balanced
        bank stores its rows scaled per stage; others: unchanged)."""
        if self.feature_scale is None:
            return embeddings
        if isinstance(embeddings, torch.Tensor):
            key = str(embeddings.device)
            if key not in self._scale_on:
                self._scale_on[key] = torch.from_numpy(self.feature_scale).to(embeddings.device)
            return embeddings * self._scale_on[key]
        return embeddings * self.feature_scale

    def predict_embeddings(self, embeddings: torch.Tensor | np.ndarray,
                           original_sizes: Sequence[tuple[int, int]]) -> list[Prediction]:
        """embeddings (B, h, w, D) from this model's embedder -> predictions."""
        array = embeddings if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
        if array.ndim != 4 or array.shape[0] != len(original_sizes):
            raise ValueError(f"embeddings must be (B, h, w, D) with B = {len(original_sizes)}, "
                             f"got {tuple(array.shape)}")
        patch_scores, image_scores = score_patches(self.index, self.scaled(array), self.reweight_neighbours,
                                                   self.top_k)
        maps = smoothed_maps(patch_scores, input_size_of(patch_scores), self.gaussian_sigma,
                             device=self.embedder.device)
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
    tensor: torch.Tensor          # (3, h, w) float32, from model.preprocess (framed)
    size: tuple[int, int]         # original (H, W)


def predict_batch(items: Sequence[BatchItem]) -> list[Prediction | Exception]:
    """Score images of many products in one call: one backbone pass per embedder and input
    shape (products built with the same EmbedderConfig share it), then each model's kNN
    on its slice. A failure fails only the items it touched: their entry is the
    exception, the others are Predictions."""
    results: list[Prediction | Exception | None] = [None] * len(items)
    by_embedder: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for index, item in enumerate(items):
        # One stacked batch per backbone and input shape (aspect-kept inputs differ in shape).
        by_embedder.setdefault((id(item.model.embedder), tuple(item.tensor.shape)), []).append(index)
    for indices in by_embedder.values():
        embedder = items[indices[0]].model.embedder
        try:
            # On a GPU the features stay there for a GPU search (TorchExactIndex).
            features = embedder.embed(_stack([items[i].tensor for i in indices], embedder.device),
                                      on_device=embedder.device.type == "cuda")
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


def _stack(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One batch from inputs prepared on the CPU and, for JPEGs decoded there, on the device."""
    if all(t.device == tensors[0].device for t in tensors):
        return torch.stack(list(tensors))
    return torch.stack([t.to(device, non_blocking=True) for t in tensors])
