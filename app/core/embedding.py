"""Locally aware patch features (PatchCore, Sec. 3.1).

images (B, 3, S, S) -> backbone stages at stride 8 and 16 -> p x p neighbourhood
aggregation on each stage (Eq. 2) -> the stride-16 map upsampled to the stride-8
grid -> both stages combined into one vector per patch: (B, S/8, S/8, D).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from app.core.backbones import DEFAULT_BACKBONE, get_backbone_spec, load_backbone
from app.core.framing import Box
from app.core.ov_runtime import OpenVINOStages, resolve_precision, resolve_runtime

AGGREGATIONS = ("mean", "flatten")
# "dataset": pixels normalised with the backbone's training statistics only (the paper's
# pipeline); "image": each image is first brought to one reference exposure
# (`standardise_exposure`), so a brighter or flatter frame of a good part looks like the rest.
NORMALISATIONS = ("dataset", "image")
# Contrast below this (grey levels, std over the frame) is not stretched further: a flat
# frame's sensor noise must not be blown up to full contrast.
MIN_EXPOSURE_STD = 2.0
# Neighbourhood bound: 9 cells of the stride-8 stage span 72 px of the input (the paper's p = 3: 24 px).
MAX_PATCH_SIZE = 9

# PIL first box-averages by int(side / target / gap) when that is 2 or more, then
# resamples (antialiased bilinear): a 900 px frame to 224 px via a 2x box reduction in
# 2.2 instead of 3.5 ms, pixels within 0.2 grey levels on average (README, issue 9).
# Frames under 4 x the target per side (factor 1) are resampled directly, as before.
RESIZE_REDUCING_GAP = 2.0


def check_patch_size(patch_size: int) -> int:
    """The neighbourhood size, or ValueError unless odd and within [1, MAX_PATCH_SIZE]."""
    if not 1 <= patch_size <= MAX_PATCH_SIZE or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be odd, from 1 to {MAX_PATCH_SIZE}")
    return patch_size


@dataclass(frozen=True)
class EmbedderConfig:
    """Everything that decides the feature space; stored in every bank.

    Banks with equal configs share one backbone pass in the service.
    """

    backbone: str = DEFAULT_BACKBONE
    # The whole frame is resized to image_size x image_size (no centre crop), so
    # defects at the image border are kept and the map maps back onto the photo.
    image_size: int = 224
    # Neighbourhood for local aggregation (p in the paper, 3).
    patch_size: int = 3
    # Values kept per stage (adaptive average pooling over the stage's vector);
    # None keeps them all. The official code pools every stage to 1024, which for
    # EfficientNet-Lite0's 40 x 9 values only replicates them and makes search slower.
    # 64 (128 dims) ranked as well as 128 and 256 on all three shared categories (full
    # sets, 10% coreset; image AUROC transistor 0.9967 / 0.9971 / 0.9925, magnetic_tile
    # 0.9497 / 0.9510 / 0.9499, bottle 1.000; pixel AUROC magnetic_tile 0.8187 / 0.8157 /
    # 0.8116, bottle 0.9877 / 0.9865 / 0.9860) and the exact search, most of a CPU
    # host's time per image, costs 0.6x of 128's (README, issues 8 and 9).
    stage_dim: int | None = 64
    # How the p x p neighbourhood of a position becomes one vector (Eq. 2):
    # "flatten" keeps each position's C x p x p patch as one channel-major vector,
    # as the official code does, so the layout of the neighbourhood survives, then
    # pools it to stage_dim; "mean" averages the neighbourhood (C values per stage).
    # Measured on transistor / magnetic_tile / bottle (README): flatten lifts image
    # AUROC from 0.921 to 0.995 / 0.787 to 0.881 (subset) / 1.000 to 1.000.
    aggregation: str = "flatten"
    # How pixel values are normalised before the backbone (NORMALISATIONS). "image" won on
    # all three shared categories (full sets, 10% coreset; README, issue 8): image / pixel
    # AUROC transistor 0.9983 (dataset: 0.9967), bottle 1.0000 / 0.9911 (1.0000 / 0.9879),
    # magnetic_tile 0.9688 / 0.8408 (0.9497 / 0.8187), whose defective tiles were shot
    # brighter than its good ones.
    normalisation: str = "image"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EmbedderConfig:
        # Banks from before `aggregation` existed averaged the neighbourhood.
        # Banks from before `normalisation` existed used the dataset statistics only.
        return cls(**{k: data[k] for k in ("backbone", "image_size", "patch_size", "stage_dim")},
                   aggregation=str(data.get("aggregation", "mean")),
                   normalisation=str(data.get("normalisation", "dataset")))

    def validate(self) -> None:
        get_backbone_spec(self.backbone)
        if self.image_size < 32 or self.image_size % 16:
            raise ValueError("image_size must be a multiple of 16 and at least 32")
        check_patch_size(self.patch_size)
        if self.stage_dim is not None and self.stage_dim < 1:
            raise ValueError("stage_dim must be positive")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}")


def standardise_exposure(pixels: torch.Tensor, reference_mean: float, reference_std: float) -> torch.Tensor:
    """One image's grey levels as floats, (3, S, S) or (1, 3, S, S), with the mean and
    standard deviation of all its values (channels and positions together) set to the
    reference, in place.

    An affine change of all three channels alike (exposure, gain, lighting drift) is undone;
    the colours' ratios and every local difference, which is what a defect is, are kept.
    The values are whole grey levels here (PIL's uint8 output, or the device path's rounded
    resize), so their sum and sum of squares are exact in float64 in any order: the same
    image gets the same statistics on every device and thread count (a float32 reduction
    moved Ray replicas' scores 3e-5 from the single process's). 0.1 ms at 224 px on the CPU.
    """
    values = pixels.reshape(-1).double()
    count = values.numel()
    mean = values.sum() / count
    variance = (torch.dot(values, values) / count - mean * mean).clamp_min_(0.0)
    gain = reference_std / variance.sqrt_().clamp_min_(MIN_EXPOSURE_STD)  # tensors: no host sync on a GPU
    return pixels.sub_(mean.float()).mul_(gain.float()).add_(reference_mean)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PATCHCORE_DEVICE=cuda but no CUDA device is available")
    return torch.device(device)


class PatchEmbedder:
    """Backbone + patch aggregation. `preprocess` is thread-safe CPU work;
    `embed` runs on the device and is serialised by a lock.

    runtime: "torch", "openvino" (CPU only; the same weights exported to OpenVINO IR
    and cached, app.core.ov_runtime) or "auto" (OpenVINO on a CPU when installed);
    None reads $PATCHCORE_BACKBONE_RUNTIME. precision (OpenVINO only): "f32", "bf16"
    or "auto" (bf16 on AMX CPUs); None reads $PATCHCORE_BACKBONE_PRECISION.
    """

    def __init__(self, config: EmbedderConfig, device: str | torch.device = "auto",
                 weights_path: Path | str | None = None, runtime: str | None = None,
                 precision: str | None = None, cache_dir: Path | str | None = None):
        config.validate()
        self.config = config
        self.device = resolve_device(device) if isinstance(device, str) else device
        spec = get_backbone_spec(config.backbone)
        self._mean = np.asarray(spec.mean, dtype=np.float32) * 255.0
        self._inv_std = 1.0 / (np.asarray(spec.std, dtype=np.float32) * 255.0)
        self._mean_t = torch.from_numpy(self._mean)[:, None, None]
        self._inv_std_t = torch.from_numpy(self._inv_std)[:, None, None]
        # The reference exposure of normalisation "image": the training set's, over the channels.
        self._reference = (float(np.mean(spec.mean)) * 255.0, float(np.mean(spec.std)) * 255.0)
        self._normalisation: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        module = load_backbone(config.backbone, weights_path)
        self.runtime = resolve_runtime(runtime, self.device)
        self.precision = "f32"
        self.grid_size = config.image_size // 8
        self.stage_channels = _probe_channels(module, config.image_size, config.backbone)
        self.head: FlattenHead | None = None
        if config.aggregation == "flatten":
            self.head = FlattenHead(self.stage_channels, self.stage_dims, config.patch_size).eval()
        self.backbone: Callable[[torch.Tensor], list[torch.Tensor]]
        # With OpenVINO the flatten head runs inside the compiled graph (stages + head in one
        # call): half the time of the same head as torch ops after it (README, issue 9).
        self._fused_head = self.runtime == "openvino" and self.head is not None
        if self.runtime == "openvino":
            self.precision = resolve_precision(precision)
            exported = StagesWithHead(module, self.head) if self.head is not None else module
            stages = OpenVINOStages(exported, config.backbone, config.image_size, self.precision,
                                    cache_dir=cache_dir)
            self.precision = stages.precision  # f32 where the CPU has no bf16 kernels
            self.backbone = stages
        else:
            self.backbone = module.to(self.device)
            if self.head is not None:
                self.head = self.head.to(self.device)
        self._lock = threading.Lock()
        self.feature_dim = sum(self.stage_dims)

    # ---------------------------------------------------------------- preprocessing
    def preprocess_one(self, image: np.ndarray, box: Box | None = None,
                       shape: tuple[int, int] | None = None) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, h, w) float32 normalised, (h, w) = `shape` (default S x S).

        `box` (x0, y0, x1, y1) in the array's pixels (sub-pixel allowed) is the
        framed part that is resized to the input shape; None = the whole array.
        """
        out_h, out_w = shape if shape is not None else (self.config.image_size, self.config.image_size)
        height, width = image.shape[:2]
        whole = box is None or (box[0] <= 0 and box[1] <= 0 and box[2] >= width and box[3] >= height)
        if not whole and box is not None:
            # Cut the enclosing pixel window first, so no pixel outside the box reaches
            # the resampling filter; the sub-pixel rest goes to PIL's box.
            left, top = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
            right, bottom = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
            window = np.ascontiguousarray(image[top:bottom, left:right])
            image = np.asarray(Image.fromarray(window).resize(
                (out_w, out_h), Image.Resampling.BILINEAR, reducing_gap=RESIZE_REDUCING_GAP,
                box=(box[0] - left, box[1] - top, min(box[2], right) - left, min(box[3], bottom) - top)))
        elif height != out_h or width != out_w:
            image = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BILINEAR,
                                                             reducing_gap=RESIZE_REDUCING_GAP))
        # In torch, in place on the one float copy: 0.15 ms instead of numpy's 0.54 at 224 px.
        pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
        if self.config.normalisation == "image":
            standardise_exposure(pixels, *self._reference)
        return pixels.sub_(self._mean_t).mul_(self._inv_std_t)

    def preprocess_decoded(self, image: torch.Tensor, box: Box | None = None,
                           shape: tuple[int, int] | None = None) -> torch.Tensor:
        """(3, H, W) uint8 on any device -> (3, h, w) float32 normalised, on that device,
        (h, w) = `shape` (default S x S).

        The device twin of `preprocess_one` (app.core.device_decode): the box is rounded
        to whole pixels (under half a pixel of the frame from the CPU path's sub-pixel box),
        the resize is torch's antialiased bilinear, which follows PIL's filter, and the
        result is rounded to whole grey levels as PIL's uint8 output is.
        """
        out = shape if shape is not None else (self.config.image_size, self.config.image_size)
        height, width = image.shape[-2:]
        if box is not None:
            left, top = max(0, round(box[0])), max(0, round(box[1]))
            right, bottom = min(width, max(left + 1, round(box[2]))), min(height, max(top + 1, round(box[3])))
            image = image[:, top:bottom, left:right]
        pixels = image.unsqueeze(0).float()
        if tuple(pixels.shape[-2:]) != tuple(out):
            pixels = F.interpolate(pixels, size=tuple(out), mode="bilinear", align_corners=False,
                                   antialias=True).round_().clamp_(0.0, 255.0)
        if self.config.normalisation == "image":
            standardise_exposure(pixels, *self._reference)
        mean, inv_std = self._normalisation_on(pixels.device)
        return pixels[0].sub_(mean).mul_(inv_std)

    def _normalisation_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and 1/std as (3, 1, 1) tensors on `device`, copied there once."""
        key = str(device)
        pair = self._normalisation.get(key)
        if pair is None:
            pair = self._normalisation[key] = (self._mean_t.to(device), self._inv_std_t.to(device))
        return pair

    def preprocess(self, images: Sequence[np.ndarray], boxes: Sequence[Box | None] | None = None) -> torch.Tensor:
        """list of (H, W, 3) uint8 [+ one framed box each, in array pixels] -> (B, 3, S, S) float32."""
        return torch.stack(self.preprocess_each(images, boxes))

    def preprocess_each(self, images: Sequence[np.ndarray], boxes: Sequence[Box | None] | None = None,
                        shapes: Sequence[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """list of (H, W, 3) uint8 [+ one framed box each, in array pixels, and one input shape
        each (default S x S)] -> one (3, h, w) float32 tensor per image."""
        boxes = boxes if boxes is not None else [None] * len(images)
        shapes = shapes if shapes is not None else [None] * len(images)  # type: ignore[list-item]
        return [self.preprocess_one(image, box, shape)
                for image, box, shape in zip(images, boxes, shapes, strict=True)]

    def embed_all(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Network inputs of any shapes -> each one's patch features (h/8, w/8, D) on the CPU:
        one backbone pass per distinct shape, results in the inputs' order."""
        out: list[torch.Tensor | None] = [None] * len(tensors)
        for indices in group_by_shape(tensors).values():
            features = self.embed(torch.stack([tensors[i] for i in indices]))
            for position, i in enumerate(indices):
                out[i] = features[position]
        return out  # type: ignore[return-value]

    # ---------------------------------------------------------------- features
    @torch.inference_mode()
    def embed(self, batch: torch.Tensor, on_device: bool = False) -> torch.Tensor:
        """(B, 3, h, w) -> patch features (B, h/8, w/8, D), float32 on the CPU, or with
        on_device on the embedder's device (a GPU search then never copies them back)."""
        with self._lock:
            if self.device.type == "cuda" and not batch.is_cuda:
                # Page-locked source: the copy runs as DMA, at full PCIe rate.
                batch = batch.pin_memory()
            outputs = self.backbone(batch.to(self.device, non_blocking=True))
            features = (outputs[0] if self._fused_head else self.aggregate(outputs)).float()
        return features if on_device else features.cpu()

    def aggregate(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """[(B, C1, h, w), (B, C2, h/2, w/2)] -> (B, h, w, D)."""
        if self.head is not None:
            return self.head(*stages)
        p = self.config.patch_size
        height, width = stages[0].shape[-2:]
        parts = []
        for stage, kept in zip(stages, self.stage_dims, strict=True):
            # f_agg: average over the p x p neighbourhood of each position (Eq. 2).
            local = F.avg_pool2d(stage, kernel_size=p, stride=1, padding=p // 2, count_include_pad=False)
            if kept < local.shape[1]:
                local = F.adaptive_avg_pool1d(local.permute(0, 2, 3, 1).reshape(-1, 1, local.shape[1]),
                                              kept).reshape(local.shape[0], *local.shape[2:], kept)
                local = local.permute(0, 3, 1, 2)
            if local.shape[-2:] != (height, width):
                # Deeper, coarser map upsampled to the stride-8 grid (Sec. 3.1).
                local = F.interpolate(local, size=(height, width), mode="bilinear", align_corners=False)
            # Equal weight per stage, as the official code gets by pooling every stage to
            # the same width: each stage contributes its mean squared difference.
            parts.append(local * (1.0 / math.sqrt(kept)))
        return torch.cat(parts, dim=1).permute(0, 2, 3, 1).contiguous()

    @property
    def stage_dims(self) -> list[int]:
        """Values each stage contributes to a patch feature, in feature order (stride 8, 16)."""
        cap = self.config.stage_dim
        per_position = self.config.patch_size ** 2 if self.config.aggregation == "flatten" else 1
        return [channels * per_position if cap is None else min(cap, channels * per_position)
                for channels in self.stage_channels]

    def describe(self) -> dict:
        return {**self.config.to_dict(), "feature_dim": self.feature_dim,
                "stage_channels": list(self.stage_channels), "device": str(self.device),
                "runtime": self.runtime, "precision": self.precision}


def adaptive_pool_matrix(size: int, kept: int) -> torch.Tensor:
    """F.adaptive_avg_pool1d from `size` to `kept` values as a (kept, size) matrix:
    bin i averages [floor(i size / kept), ceil((i + 1) size / kept))."""
    matrix = torch.zeros(kept, size, dtype=torch.float64)
    for i in range(kept):
        start, end = (i * size) // kept, -((-(i + 1) * size) // kept)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def flatten_pooling_weights(channels: int, patch_size: int, kept: int) -> torch.Tensor:
    """Convolution weights (kept, C, p, p) equal to: unfold each position's C x p x p
    neighbourhood (channel-major, the official code's order), adaptive-average-pool the
    C p^2 values to `kept`, and scale by 1 / sqrt(kept) (equal weight per stage)."""
    pool = adaptive_pool_matrix(channels * patch_size * patch_size, kept) / math.sqrt(kept)
    return pool.reshape(kept, channels, patch_size, patch_size).float().contiguous()


class FlattenHead(nn.Module):
    """Eq. 2 with the official flattened neighbourhood, stages -> (B, h, w, D).

    Each position's C x p x p neighbourhood as one channel-major vector (zero padding at
    the border, as the official code's unfold), pooled to `kept` values and weighted by
    1 / sqrt(kept); the stride-16 stage is then upsampled bilinearly to the stride-8 grid
    (Sec. 3.1). Unfold, pooling and weight are all linear, so they are one convolution
    with fixed weights (`flatten_pooling_weights`): the same numbers, without writing the
    C p^2 vectors out. Pooling before upsampling commutes (linear, different axes) and
    upsamples 4x less data. A module, so OpenVINO compiles it into the backbone's graph.
    """

    weight0: torch.Tensor  # (kept, C1, p, p), stride-8 stage
    weight1: torch.Tensor  # (kept, C2, p, p), stride-16 stage

    def __init__(self, channels: Sequence[int], kept: Sequence[int], patch_size: int):
        super().__init__()
        self.padding = patch_size // 2
        for index, (c, k) in enumerate(zip(channels, kept, strict=True)):
            self.register_buffer(f"weight{index}", flatten_pooling_weights(c, patch_size, k))

    def forward(self, stage8: torch.Tensor, stage16: torch.Tensor) -> torch.Tensor:
        fine = F.conv2d(stage8, self.weight0, padding=self.padding)
        coarse = F.conv2d(stage16, self.weight1, padding=self.padding)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([fine, coarse], dim=1).permute(0, 2, 3, 1).contiguous()


class StagesWithHead(nn.Module):
    """The backbone's stage extractor followed by the flatten head: what OpenVINO exports."""

    def __init__(self, stages: nn.Module, head: FlattenHead):
        super().__init__()
        self.stages = stages
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        stage8, stage16 = self.stages(images)
        return self.head(stage8, stage16)


def group_by_shape(tensors: Sequence[torch.Tensor | np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    """Positions of the tensors (or arrays) of each shape (a batch stacks only equal shapes)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape), []).append(index)
    return groups


@torch.inference_mode()
def _probe_channels(module: nn.Module, image_size: int, name: str) -> tuple[int, ...]:
    """Channels of the two stages, from one pass of the torch module on the CPU (the head
    is built from them before any runtime conversion)."""
    probe = torch.zeros(1, 3, image_size, image_size)
    stages = module.to("cpu").eval()(probe)
    if stages[0].shape[-1] != image_size // 8 or stages[1].shape[-1] != image_size // 16:
        raise RuntimeError(f"backbone {name} does not give stride 8 and 16 maps")
    return tuple(int(s.shape[1]) for s in stages)


def create_embedder(config: EmbedderConfig | None = None, device: str = "auto",
                    weights_path: Path | str | None = None, runtime: str | None = None,
                    precision: str | None = None, cache_dir: Path | str | None = None) -> PatchEmbedder:
    return PatchEmbedder(config or EmbedderConfig(), device=device, weights_path=weights_path,
                         runtime=runtime, precision=precision, cache_dir=cache_dir)
