"""Short training runs: on real CIFAR-10 when present (CI materializes it), else skipped."""

import dataclasses
import os

import pytest
import torch

from pipeline.checkpoint import load_card
from pipeline.config import TrainConfig, default_data_dir
from pipeline.data import DataError, load_cifar10
from pipeline.errors import CheckpointError
from pipeline.offline.network import load_checkpoint
from pipeline.offline.train import lr_at, train
from pipeline.offline.train_state import state_path
from tests.helpers import synthetic_cifar, tiny_config


@pytest.fixture(scope="module")
def cifar():
    try:
        return load_cifar10(default_data_dir())
    except DataError as err:
        if os.environ.get("ADA_DDNN_REQUIRE_DATA") == "1":
            raise
        pytest.skip(f"CIFAR-10 not available: {err}")


@pytest.mark.slow
def test_short_training_on_cifar_lowers_the_loss(cifar):
    tc = TrainConfig(epochs=3, batch_size=50, lr=0.05, limit_train=1000, limit_eval=200, threads=0,
                     camera_dropout=0.1, warmup_epochs=0.5)
    model, history, card = train(tiny_config(), tc, cifar, progress=False)
    assert len(history) == 3
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].train_loss_cloud < history[0].train_loss_cloud
    # Better than chance (10%) on held-out validation frames after 60 steps.
    assert history[-1].val["cloud_all"] > 0.15
    assert card["thresholds"]["chosen_on"] == "validation"
    assert card["data"]["digest_sha256"] == cifar.digest


def test_training_writes_checkpoint_card_and_history(tmp_path):
    data = synthetic_cifar()
    out = str(tmp_path / "m.safetensors")
    tc = TrainConfig(epochs=2, batch_size=16, augment=False)
    train(tiny_config(mode="ddnn"), tc, data, out_path=out, progress=False)
    model = load_checkpoint(out)
    assert model.cfg.mode == "ddnn"
    card = load_card(out)
    for key in ("config", "mode", "data", "seed", "epochs", "device", "wall_time_s", "git_commit", "thresholds",
                "validation", "test"):
        assert key in card, key
    assert card["thresholds"]["t1"] is None
    assert os.path.isfile(str(tmp_path / "m.history.json"))


def test_training_is_reproducible():
    data = synthetic_cifar()
    tc = TrainConfig(epochs=1, batch_size=16)
    _, h1, _ = train(tiny_config(), tc, data, progress=False)
    _, h2, _ = train(tiny_config(), tc, data, progress=False)
    assert h1[0].train_loss == h2[0].train_loss


def test_lr_schedule():
    assert lr_at(0, 100, 10, 0.1) == pytest.approx(0.01)
    assert lr_at(9, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(10, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 10, 0.1) == pytest.approx(0.05)
    assert lr_at(100, 100, 10, 0.1) == pytest.approx(0.0, abs=1e-12)


class Interrupted(Exception):
    pass


def _interrupt_after(epoch):
    def on_epoch(stats):
        if stats.epoch == epoch:
            raise Interrupted
    return on_epoch


def _same_weights(a: str, b: str) -> None:
    sa, sb = load_checkpoint(a).state_dict(), load_checkpoint(b).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    # Augmentation, camera dropout and distillation on: every random draw and every optimizer
    # buffer has to come back for the weights to match bit for bit.
    data = synthetic_cifar()
    tc = TrainConfig(epochs=2, batch_size=16, distill=0.5, label_smoothing=0.1)
    whole, parts = str(tmp_path / "whole.safetensors"), str(tmp_path / "parts.safetensors")
    _, h_whole, _ = train(tiny_config(), tc, data, out_path=whole, progress=False)
    with pytest.raises(Interrupted):
        train(tiny_config(), tc, data, out_path=parts, progress=False, on_epoch=_interrupt_after(1))
    assert os.path.isfile(state_path(parts)) and not os.path.isfile(parts)
    _, h_parts, card = train(tiny_config(), tc, data, out_path=parts, progress=False, resume=True)
    _same_weights(whole, parts)
    assert [h.train_loss for h in h_parts] == [h.train_loss for h in h_whole]
    assert [h.val for h in h_parts] == [h.val for h in h_whole]
    assert card["resumed_after_epochs"] == [1]


def test_resume_extends_a_finished_run(tmp_path):
    data = synthetic_cifar()
    out = str(tmp_path / "m.safetensors")
    train(tiny_config(), TrainConfig(epochs=1, batch_size=16), data, out_path=out, progress=False)
    _, history, card = train(tiny_config(), TrainConfig(epochs=2, batch_size=16), data, out_path=out,
                             progress=False, resume=True)
    assert [h.epoch for h in history] == [1, 2]
    assert card["epochs"] == 2 and load_card(out)["resumed_after_epochs"] == [1]


def test_resume_refuses_a_different_run(tmp_path):
    data = synthetic_cifar()
    out = str(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="no training state"):
        train(tiny_config(), TrainConfig(epochs=1, batch_size=16), data, out_path=out, progress=False, resume=True)
    train(tiny_config(), TrainConfig(epochs=1, batch_size=16), data, out_path=out, progress=False)
    with pytest.raises(CheckpointError, match=r"lr: 0\.1 in the state, 0\.05 now"):
        train(tiny_config(), TrainConfig(epochs=2, batch_size=16, lr=0.05), data, out_path=out, progress=False,
              resume=True)
    with pytest.raises(CheckpointError, match="model fusion: 'concat' in the state, 'max' now"):
        train(tiny_config(fusion="max"), TrainConfig(epochs=2, batch_size=16), data, out_path=out,
              progress=False, resume=True)
    with pytest.raises(CheckpointError, match="data digest"):
        train(tiny_config(), TrainConfig(epochs=2, batch_size=16), dataclasses.replace(data, digest="other"),
              out_path=out, progress=False, resume=True)


def test_fusion_is_part_of_the_checkpoint_and_of_every_part(tmp_path):
    # `ada-ddnn train --fusion max`: the edge and the cloud, loaded alone, fuse as trained.
    from cloud.cloud_net import load_cloud
    from edge.edge_net import load_edge
    from pipeline.checkpoint import export_parts

    out = str(tmp_path / "max.safetensors")
    train(tiny_config(fusion="max"), TrainConfig(epochs=1, batch_size=16), synthetic_cifar(), out_path=out,
          progress=False)
    assert load_card(out)["config"]["fusion"] == "max"
    export_parts(out, str(tmp_path / "parts"))
    for path in (out, str(tmp_path / "parts" / "edge.safetensors")):
        assert load_edge(path).cfg.fusion == "max"
    assert load_cloud(str(tmp_path / "parts" / "cloud.safetensors")).cfg.fused_channels == tiny_config().wire_channels


def test_the_trained_wire_code_is_in_the_config_and_the_card(tmp_path):
    data = synthetic_cifar()
    out = str(tmp_path / "q.safetensors")
    train(tiny_config(wire_dtype="int2"), TrainConfig(epochs=1, batch_size=16, augment=False), data, out_path=out,
          progress=False)
    assert load_checkpoint(out).cfg.wire_dtype == "int2"
    card = load_card(out)
    assert card["config"]["wire_dtype"] == card["wire_dtype"] == "int2"


def test_thresholds_are_chosen_again_into_the_card(tmp_path):
    from pipeline.offline.train import retune

    data = synthetic_cifar()
    out = str(tmp_path / "r.safetensors")
    train(tiny_config(), TrainConfig(epochs=1, batch_size=16, augment=False, val_size=len(data.val)), data,
          out_path=out, progress=False)
    before = load_card(out)
    shown = retune(out, data, policy="min-edge-rate", command="ada-ddnn thresholds ...")
    assert load_card(out) == before  # not written without write=True
    new = retune(out, data, policy="min-edge-rate", command="ada-ddnn thresholds ...", write=True)
    card = load_card(out)
    assert card == new and card["thresholds"] == shown["thresholds"]
    assert card["thresholds"]["policy"].startswith("max overall accuracy")
    assert card["retuned"][-1]["thresholds"] == before["thresholds"]
    assert card["test"]["exit_rate"] == shown["test"]["exit_rate"]
    assert {k: card[k] for k in ("config", "train_config", "wall_time_s")} == \
        {k: before[k] for k in ("config", "train_config", "wall_time_s")}


def test_init_starts_from_a_checkpoint_for_other_codes(tmp_path):
    # `ada-ddnn train --init`: a checkpoint trained for 2-bit codes, fine-tuned for 1-bit ones.
    from pipeline.offline.network import AdaDDNN
    from pipeline.offline.train import initial_weights

    data = synthetic_cifar()
    base = str(tmp_path / "int2.safetensors")
    train(tiny_config(wire_dtype="int2"), TrainConfig(epochs=1, batch_size=16), data, out_path=base, progress=False)
    fresh = AdaDDNN(tiny_config(wire_dtype="int1"))
    record = initial_weights(fresh, base)
    theirs = load_checkpoint(base).state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in fresh.state_dict().items())
    assert record["wire_dtype"] == "int2" and record["epochs"] == 1 and len(record["sha256"]) == 64

    out = str(tmp_path / "int1.safetensors")
    # lr 0 and no weight decay: only batch-norm statistics move, so the start is visible in the result.
    _, _, card = train(tiny_config(wire_dtype="int1"), TrainConfig(epochs=1, batch_size=16, lr=0.0, weight_decay=0.0),
                       data, out_path=out, progress=False, init=base)
    tuned = load_checkpoint(out).state_dict()
    weights = [k for k in tuned if k.endswith(".weight") and tuned[k].ndim > 1]
    assert weights and all(torch.equal(tuned[k], theirs[k]) for k in weights)
    assert card["initialized_from"]["sha256"] == record["sha256"] and load_card(out)["config"]["wire_dtype"] == "int1"
    assert card["epochs_total"] == 2  # its epoch and the one behind the checkpoint it started from

    with pytest.raises(CheckpointError, match="camera_channels"):
        initial_weights(AdaDDNN(tiny_config(camera_channels=12)), base)
