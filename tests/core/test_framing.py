"""Per-product framing (issue 8): whole frame, centre crop, region of interest in original pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from app.core.embedding import EmbedderConfig
from app.core.errors import InvalidImage
from app.core.framing import Framing
from app.core.images import decode_image, list_images
from app.core.patchcore import PatchCoreConfig, PatchCoreModel, build_bank
from app.storage import LocalBankStore

ROI = (200, 150, 700, 800)  # x0, y0, x1, y1 on bottle's 900 x 900 frames


def test_boxes_in_original_pixels():
    assert Framing().box(300, 400) == (0, 0, 400, 300)
    # 0.875 = the official resize-256-crop-224, for any aspect.
    assert Framing.parse(centre_crop=0.875).box(256, 512) == (32.0, 16.0, 480.0, 240.0)
    roi = Framing.parse(roi="10,20,110,220")
    assert roi.box(400, 400) == (10, 20, 110, 220)
    assert roi.box(100, 60) == (10, 20, 60, 100)  # clipped to the image
    # An array decoded at half scale is cropped at half the box.
    assert roi.scaled_box((200, 200), (400, 400)) == (5, 10, 55, 110)
    with pytest.raises(ValueError, match="outside"):
        roi.box(15, 5)


@pytest.mark.parametrize("kwargs", [{"centre_crop": 0.0}, {"centre_crop": 5e-324}, {"centre_crop": 0.01},
                                    {"centre_crop": 1.5}, {"roi": "1,2,3"},
                                    {"roi": "5,5,5,9"}, {"roi": "a,b,c,d"}, {"roi": "0,0,9,9", "centre_crop": 0.5}])
def test_bad_framing_is_refused(kwargs):
    with pytest.raises(ValueError):
        Framing.parse(**kwargs)


def test_reduced_decode_keeps_the_framed_box_at_network_size():
    assert Framing().min_decode_side(224) == 224
    assert Framing.parse(centre_crop=0.5).min_decode_side(224) == 448
    assert Framing.parse(roi="0,0,10,10").min_decode_side(224) is None


def test_framing_dict_round_trip_and_old_banks():
    for framing in (Framing(), Framing.parse(centre_crop=0.8), Framing.parse(roi="1,2,30,40"),
                    Framing.parse(centre_crop=0.8, aspect="squeeze")):
        assert Framing.from_dict(framing.to_dict()) == framing
    # Banks from before framing, and from before the aspect was kept, squeezed to S x S.
    assert Framing.from_dict(None) == Framing(aspect="squeeze")
    assert Framing.from_dict({"mode": "centre", "fraction": 0.8, "roi": None}) == \
        Framing(mode="centre", fraction=0.8, aspect="squeeze")
    with pytest.raises(ValueError, match="aspect"):
        Framing.from_dict({"mode": "whole", "aspect": "stretch"})


def test_input_shape_keeps_the_aspect_at_about_s_by_s_pixels():
    keep, squeeze = Framing(), Framing(aspect="squeeze")
    assert keep.input_shape_for((900, 900), 224) == (224, 224)  # square frames: exactly as before
    assert squeeze.input_shape_for((300, 600), 224) == (224, 224)
    # 1:2 -> 224/sqrt(2) x 224*sqrt(2), sides rounded to 16 px.
    assert keep.input_shape_for((300, 600), 224) == (160, 320)
    assert keep.input_shape_for((600, 300), 224) == (320, 160)
    # Only the aspect counts, not the photo's size.
    assert keep.input_shape_for((30, 60), 224) == keep.input_shape_for((3000, 6000), 224)
    # A line-scan strip is capped at 4:1, so its input stays about S x S in area.
    assert keep.input_shape_for((10, 1000), 224) == (112, 448)
    # The framed box decides, not the frame: a square roi of a wide photo is square.
    assert Framing.parse(roi="0,0,300,300").input_shape_for((300, 900), 224) == (224, 224)
    for height in range(20, 400, 7):
        h, w = keep.input_shape_for((height, 200), 224)
        assert h % 16 == 0 and w % 16 == 0 and min(h, w) <= 224
        assert 0.8 < h * w / 224 ** 2 < 1.2


def test_roi_crop_of_a_reduced_decode_matches_the_full_decode(lite0_small, shared_data):
    """A reduced-scale decode (array + original size) sees the same part of the photo."""
    image = decode_image(list_images(shared_data / "bottle" / "train" / "good")[0])
    half = np.asarray(Image.fromarray(image).resize((450, 450), Image.Resampling.BOX))
    framing = Framing(mode="roi", roi=ROI)
    full = lite0_small.preprocess([image], [framing.scaled_box(image.shape[:2], image.shape[:2])])
    reduced = lite0_small.preprocess([half], [framing.scaled_box(half.shape[:2], image.shape[:2])])
    whole = lite0_small.preprocess([image])
    assert (full - reduced).abs().mean() < 0.05 < (full - whole).abs().mean()


@pytest.fixture(scope="module")
def roi_model(shared_data, lite0_small):
    train = list_images(shared_data / "bottle" / "train" / "good")[:10]
    config = PatchCoreConfig(embedder=EmbedderConfig(image_size=128), coreset_ratio=0.25, batch_size=4,
                             framing=Framing(mode="roi", roi=ROI))
    return PatchCoreModel(build_bank(train, config, lite0_small), lite0_small)


def test_roi_map_lies_on_the_photo_and_is_zero_outside(roi_model, shared_data):
    path = list_images(shared_data / "bottle" / "test" / "broken_large")[0]
    image = decode_image(path)
    prediction = roi_model.predict([image])[0]
    amap = prediction.anomaly_map
    assert amap.shape == image.shape[:2] == (900, 900)
    x0, y0, x1, y1 = ROI
    inside = np.zeros(amap.shape, dtype=bool)
    inside[y0:y1, x0:x1] = True
    assert (amap[~inside] == 0).all()
    assert (amap[inside] > 0).all()
    assert (prediction.normalised_map[~inside] == 0).all()
    # The model only looked inside the box: paint everything outside it and nothing changes.
    painted = image.copy()
    painted[~inside] = 255
    again = roi_model.predict([painted])[0]
    assert again.raw_score == pytest.approx(prediction.raw_score, rel=1e-5)
    np.testing.assert_allclose(again.anomaly_map, amap, rtol=1e-4, atol=1e-4)


def test_roi_round_trips_through_a_saved_bank(roi_model, shared_data, lite0_small, tmp_path):
    store = LocalBankStore(tmp_path)
    store.save("bottle", roi_model.bank)
    _, bank = store.load("bottle")
    assert bank.manifest["framing"] == {"mode": "roi", "fraction": 1.0, "roi": list(ROI), "aspect": "keep"}
    reloaded = PatchCoreModel(bank, lite0_small)
    assert reloaded.framing == Framing(mode="roi", roi=ROI)
    image = decode_image(list_images(shared_data / "bottle" / "test" / "good")[0])
    assert reloaded.predict([image])[0].raw_score == pytest.approx(roi_model.predict([image])[0].raw_score)


def test_reduced_decode_gives_the_same_map_size(roi_model, shared_data):
    image = decode_image(list_images(shared_data / "bottle" / "test" / "good")[0])
    half = np.asarray(Image.fromarray(image).resize((450, 450), Image.Resampling.BOX))
    [tensor] = roi_model.preprocess([half], [image.shape[:2]])
    embeddings = roi_model.embedder.embed(tensor[None])
    prediction = roi_model.predict_embeddings(embeddings, [image.shape[:2]])[0]
    assert prediction.anomaly_map.shape == (900, 900)
    assert prediction.box == tuple(float(v) for v in ROI)
    assert isinstance(tensor, torch.Tensor)


def test_image_smaller_than_the_roi_is_a_clear_error(roi_model):
    with pytest.raises(InvalidImage, match="outside"):
        roi_model.predict([np.zeros((100, 150, 3), np.uint8)])


def test_aspect_kept_tiles_build_and_score_in_one_mixed_batch(lite0_small, shared_data):
    """magnetic_tile's frames vary in aspect: each reaches the network at its own shape, a
    batch of several shapes scores as each image alone, and maps lie on the original photo."""
    train = list_images(shared_data / "magnetic_tile" / "train" / "good")[:40:4]
    config = PatchCoreConfig(embedder=EmbedderConfig(image_size=128), batch_size=4)
    model = PatchCoreModel(build_bank(train, config, lite0_small), lite0_small)
    assert model.framing.aspect == "keep"
    tests = [decode_image(p) for p in list_images(shared_data / "magnetic_tile" / "test" / "crack")[:6]]
    shapes = model.input_shapes(tests)
    assert len(set(shapes)) > 1
    together = model.predict(tests)
    for image, shape, prediction in zip(tests, shapes, together, strict=True):
        h, w = image.shape[:2]
        assert abs(shape[1] / shape[0] - w / h) < 0.25 * w / h  # the aspect survives the 16-px rounding
        assert tuple(prediction.smoothed_map.shape) == shape
        assert prediction.anomaly_map.shape == (h, w)
        alone = model.predict([image])[0]
        assert alone.raw_score == pytest.approx(prediction.raw_score, rel=1e-5)
        np.testing.assert_allclose(alone.anomaly_map, prediction.anomaly_map, rtol=1e-4, atol=1e-4)
    # The same photos squeezed (banks before stop 21) all get the S x S input.
    squeezed = PatchCoreConfig(embedder=EmbedderConfig(image_size=128), batch_size=4,
                               framing=Framing(aspect="squeeze"))
    old = PatchCoreModel(build_bank(train, squeezed, lite0_small), lite0_small)
    assert set(old.input_shapes(tests)) == {(128, 128)}
    assert old.predict(tests[:1])[0].anomaly_map.shape == tests[0].shape[:2]
