"""Build parameters with framing survive a job record (JSON) and the Ray task hand-off."""

import json

import pytest
from pydantic import ValidationError

from app.core.framing import Framing
from app.service.jobs import BuildParams
from app.service.schemas import BuildRequest


def test_build_params_with_framing_round_trip_through_json():
    params = BuildParams(coreset_ratio=0.05, seed=3, image_size=320, framing=Framing(mode="roi", roi=(1, 2, 300, 400)),
                         false_alarm_rate=0.001, map_sigma=8.0, patch_size=5, stage_dim=32, stage_balance=True,
                         normalisation="image")
    record = json.loads(json.dumps(params.describe()))
    assert record["framing"] == {"mode": "roi", "fraction": 1.0, "roi": [1, 2, 300, 400], "aspect": "keep"}
    again = BuildParams.from_dict(record)
    assert again == params
    config = again.config()
    assert config.framing == Framing(mode="roi", roi=(1, 2, 300, 400))
    assert config.embedder.image_size == 320 and config.false_alarm_rate == 0.001
    assert config.gaussian_sigma == 8.0 and BuildParams().config().gaussian_sigma == 4.0
    assert config.embedder.patch_size == 5 and BuildParams().config().embedder.patch_size == 3
    assert config.embedder.stage_dim == 32 and BuildParams().config().embedder.stage_dim == 64
    assert config.stage_balance is True and BuildParams().config().stage_balance is False
    assert config.embedder.normalisation == "image"
    assert BuildParams.from_dict({"coreset_ratio": 0.1, "unknown": 1}).config().framing == Framing()


def test_build_request_framing_is_validated():
    assert BuildRequest(centre_crop=0.875).framing() == Framing(mode="centre", fraction=0.875)
    assert BuildRequest().framing() is None
    # The input shape: the aspect kept unless the request squeezes, alone or with a box.
    assert BuildRequest(aspect="squeeze").framing() == Framing(aspect="squeeze")
    assert BuildRequest(aspect="keep").framing() == Framing()
    assert BuildRequest(centre_crop=0.875, aspect="squeeze").framing() == \
        Framing(mode="centre", fraction=0.875, aspect="squeeze")
    params = BuildParams(framing=BuildRequest(roi=[1, 2, 30, 40], aspect="squeeze").framing())
    assert BuildParams.from_dict(json.loads(json.dumps(params.describe()))).config().framing.aspect == "squeeze"
    for bad in ({"aspect": "stretch"}, {"aspect": 1},
                {"roi": [5, 5, 1, 9]}, {"roi": [0, 0, 9, 9], "centre_crop": 0.5}, {"image_size": 100},
                {"false_alarm_rate": 0.0}, {"false_alarm_rate": 1e-17}, {"roi": [1, 2, 3]}, {"map_sigma": -1.0},
                {"map_sigma": 33.0},
                {"patch_size": 4}, {"patch_size": 11}, {"patch_size": 0}, {"stage_dim": 0}, {"stage_dim": 4096}):
        with pytest.raises(ValidationError):
            BuildRequest(**bad)
