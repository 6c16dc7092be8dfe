import json

import pytest
import torch
from safetensors.torch import save_file

from pipeline.checkpoint import card_path, load_card, read_config
from pipeline.errors import CheckpointError
from pipeline.offline.network import AdaDDNN, load_checkpoint, save_checkpoint
from tests.helpers import tiny_config


def test_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = AdaDDNN(tiny_config())
    # Non-trivial BN statistics too.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = str(tmp_path / "m.safetensors")
    save_checkpoint(model, path, {"seed": 3})
    loaded = load_checkpoint(path)
    assert loaded.cfg == model.cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    card = load_card(path)
    assert card["seed"] == 3 and card["mode"] == "ada" and card["config"] == model.cfg.to_dict()


def test_mismatched_config_refused(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_checkpoint(AdaDDNN(tiny_config()), path)
    with pytest.raises(CheckpointError, match="camera_channels: expected 16, checkpoint has 8"):
        load_checkpoint(path, expect=tiny_config(camera_channels=16))


def test_weights_not_matching_config_refused(tmp_path):
    path = str(tmp_path / "m.safetensors")
    state = AdaDDNN(tiny_config(mode="ddnn")).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, path,
              metadata={"format": "ada-ddnn/1", "config": tiny_config(mode="ada").to_json()})
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)


def test_unknown_config_field_refused(tmp_path):
    path = str(tmp_path / "m.safetensors")
    cfg = {**tiny_config().to_dict(), "future_field": 1}
    save_file({"x": torch.zeros(1)}, path, metadata={"format": "ada-ddnn/1", "config": json.dumps(cfg)})
    with pytest.raises(CheckpointError, match="future_field"):
        read_config(path)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04pickle-ish bytes")
    with pytest.raises(CheckpointError):
        load_checkpoint(str(bad))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.safetensors"))


def test_card_path():
    assert card_path("models/ada.safetensors") == "models/ada.json"
