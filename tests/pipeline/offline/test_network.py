import itertools

import pytest
import torch

from edge.fusion import fuse
from pipeline.config import ModelConfig, TrainConfig
from pipeline.layers import forward_rows
from pipeline.offline.network import AdaDDNN, joint_loss, prepare_views, sample_present
from tests.helpers import tiny_config

ALL_SUBSETS = [s for r in range(0, 7) for s in itertools.combinations(range(6), r)]


@pytest.fixture(scope="module")
def views():
    g = torch.Generator().manual_seed(0)
    return prepare_views(ModelConfig(), torch.rand(3, 3, 32, 32, generator=g))


@pytest.mark.parametrize("fusion", ["max", "mean", "concat"])
def test_shapes_for_every_subset_of_cameras(views, fusion):
    torch.manual_seed(0)
    cfg = tiny_config(fusion=fusion)
    model = AdaDDNN(cfg).eval()
    k, s = cfg.wire_channels, cfg.wire_size
    with torch.no_grad():
        features, cam_logits = model.run_cameras(views)
        assert features.shape == (3, 6, k, s, s)
        assert cam_logits.shape == (3, 6, 10)
        for subset in ALL_SUBSETS:
            present = torch.zeros(3, 6, dtype=torch.bool)
            present[:, list(subset)] = True
            fused, edge, cloud = model.forward_features(features, present)
            assert fused.shape == (3, cfg.fused_channels, s, s)
            assert edge.shape == cloud.shape == (3, 10)
            assert torch.isfinite(edge).all() and torch.isfinite(cloud).all()


@pytest.mark.parametrize("fusion", ["max", "mean", "concat"])
def test_absent_camera_has_no_influence(fusion):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 6, 4, 8, 8, generator=g)
    present = torch.tensor([[True, False, True, True, False, True]] * 2)
    other = feats.clone()
    other[:, 1] = 1e6  # garbage from an absent camera
    other[:, 4] = -1e6
    assert torch.equal(fuse(feats, present, fusion), fuse(other, present, fusion))


def test_fusion_values():
    feats = torch.tensor([1.0, 5.0, 3.0]).view(1, 3, 1, 1, 1)
    present = torch.tensor([[True, False, True]])
    assert fuse(feats, present, "max").item() == 3.0
    assert fuse(feats, present, "mean").item() == 2.0
    assert fuse(feats, present, "concat").flatten().tolist() == [1.0, 0.0, 3.0]
    none = torch.zeros(1, 3, dtype=torch.bool)
    assert fuse(feats, none, "max").item() == 0.0 and fuse(feats, none, "mean").item() == 0.0


def test_ddnn_has_no_camera_classifier(views):
    model = AdaDDNN(tiny_config(mode="ddnn")).eval()
    with torch.no_grad():
        out = model(views)
    assert out.camera_logits is None
    assert all(cam.classifier is None for cam in model.cameras)


def test_loss_equals_weighted_sum(views):
    torch.manual_seed(0)
    model = AdaDDNN(tiny_config()).eval()
    y = torch.tensor([1, 2, 3])
    present = torch.tensor([[True] * 6, [True, False] * 3, [False] * 5 + [True]])
    with torch.no_grad():
        out = model(views, present)
    tc = TrainConfig(weight_camera=0.3, weight_edge=0.5, weight_cloud=2.0)
    parts = joint_loss(out, y, tc)
    ce = torch.nn.functional.cross_entropy
    cam_terms = [ce(out.camera_logits[i, k:k + 1], y[i:i + 1]) for i in range(3) for k in range(6) if present[i, k]]
    cam = torch.stack(cam_terms).mean()
    assert parts.camera.item() == pytest.approx(cam.item(), rel=1e-5)
    assert parts.edge.item() == pytest.approx(ce(out.edge_logits, y).item(), rel=1e-5)
    assert parts.cloud.item() == pytest.approx(ce(out.cloud_logits, y).item(), rel=1e-5)
    expected = 0.3 * cam + 0.5 * ce(out.edge_logits, y) + 2.0 * ce(out.cloud_logits, y)
    assert parts.total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_terms(views):
    torch.manual_seed(0)
    model = AdaDDNN(tiny_config()).train()
    y = torch.tensor([1, 2, 3])
    present = torch.tensor([[True] * 6, [True, False] * 3, [False] * 5 + [True]])
    out = model(views, present)
    tc = TrainConfig(weight_camera=0.3, weight_edge=0.5, distill=0.7, distill_temperature=2.0)
    parts = joint_loss(out, y, tc)
    plain = joint_loss(out, y, TrainConfig(weight_camera=0.3, weight_edge=0.5))
    t = 2.0

    def kd(student, teacher):  # T^2 * KL(teacher_T || student_T), by hand
        q = torch.softmax(teacher / t, -1)
        return t * t * (q * (q.log() - torch.log_softmax(student / t, -1))).sum()

    cam = torch.stack([kd(out.camera_logits[i, k], out.cloud_logits[i]) for i in range(3) for k in range(6)
                       if present[i, k]]).mean()
    edge = torch.stack([kd(out.edge_logits[i], out.cloud_logits[i]) for i in range(3)]).mean()
    assert parts.distill.item() == pytest.approx((0.7 * (0.3 * cam + 0.5 * edge)).item(), rel=1e-4)
    assert parts.total.item() == pytest.approx(plain.total.item() + parts.distill.item(), rel=1e-5)
    assert plain.distill.item() == 0.0
    # The cloud teaches and is not taught: the distillation terms give it no gradient.
    grads = [torch.autograd.grad(p.total, list(model.cloud.parameters()), retain_graph=True) for p in (parts, plain)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_train_config_validation():
    for bad in (dict(distill=-1.0), dict(distill_temperature=0.0), dict(label_smoothing=1.0)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_ddnn_loss_has_no_camera_term(views):
    model = AdaDDNN(tiny_config(mode="ddnn")).eval()
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        parts = joint_loss(model(views), y, TrainConfig())
    assert parts.camera.item() == 0.0
    assert parts.total.item() == pytest.approx(parts.edge.item() + parts.cloud.item(), rel=1e-6)


def test_camera_dropout_keeps_one_camera():
    g = torch.Generator().manual_seed(0)
    present = sample_present(10_000, 6, 0.9, g)
    assert present.any(dim=1).all()
    assert 0.05 < present.float().mean().item() < 0.3


def test_config_validation():
    with pytest.raises(ValueError):
        ModelConfig(mode="other")
    with pytest.raises(ValueError):
        ModelConfig(fusion="sum")
    with pytest.raises(ValueError):
        ModelConfig(view_mode="tiles", num_cameras=4)
    with pytest.raises(ValueError):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "bogus": 1})


def test_release_wire_size_is_under_a_third_of_a_view():
    cfg = ModelConfig()
    k, s, _ = cfg.wire_shape
    assert k * s * s <= 1024  # int8 payload bytes per camera per frame, before the header


def test_forward_rows_gives_a_single_row_the_numbers_of_a_batch():
    torch.manual_seed(0)
    model = AdaDDNN(tiny_config()).eval()
    g = torch.Generator().manual_seed(2)
    fused = torch.randn(5, model.cfg.fused_channels, 8, 8, generator=g)
    with torch.no_grad():
        batch = forward_rows(model.cloud, fused)
        rows = torch.cat([forward_rows(model.cloud, fused[i:i + 1]) for i in range(5)])
        feats, logits = forward_rows(model.run_cameras, torch.randn(1, 6, 3, 32, 32, generator=g))
    assert torch.equal(batch, rows)
    assert feats.shape[0] == 1 and logits.shape[0] == 1


@pytest.mark.parametrize("dtype", ["int4", "int2", "int1"])
def test_quantization_aware_forward_sees_what_the_edge_and_the_cloud_receive(views, dtype):
    """Training's forward fuses the decoded codes and escalates them through the codec again, as
    deployed (`evaluation.collect` with the same code), and the camera weights still get a
    gradient through the codes (straight-through)."""
    from pipeline.offline.evaluation import wire_roundtrip
    from pipeline.wire.messages import quantize_roundtrip

    torch.manual_seed(0)
    cfg = tiny_config(wire_dtype=dtype)
    model = AdaDDNN(cfg).eval()
    present = torch.ones(3, 6, dtype=torch.bool)
    out = model(views, present)
    with torch.no_grad():
        coded = wire_roundtrip(out.camera_features.detach(), dtype)
        fused = fuse(coded, present, cfg.fusion)
        assert torch.equal(out.fused.detach(), fused)
        assert torch.allclose(out.edge_logits, model.edge(fused), atol=1e-5)
        assert torch.allclose(out.cloud_logits, model.cloud(quantize_roundtrip(fused, dtype)), atol=1e-5)
        plain = AdaDDNN(cfg.replace(wire_dtype="float32")).eval()
        plain.load_state_dict(model.state_dict())
        assert not torch.equal(plain(views, present).fused, out.fused.detach())  # the codec did change them
    out.edge_logits.sum().backward()
    first = next(model.cameras[0].parameters())  # the camera's first conv: upstream of the codes
    assert first.grad is not None and float(first.grad.abs().sum()) > 0


def test_wire_dtype_is_checked_and_resolved_for_the_cameras():
    from pipeline.config import resolve_wire_dtype

    with pytest.raises(ValueError, match="wire_dtype"):
        ModelConfig(wire_dtype="int3")
    assert resolve_wire_dtype("model", ModelConfig(wire_dtype="int2")) == "int2"
    assert resolve_wire_dtype("model", ModelConfig()) == "int8"  # trained without a codec: int8
    assert resolve_wire_dtype("int4", ModelConfig(wire_dtype="int2")) == "int4"  # an explicit choice wins
    with pytest.raises(ValueError):
        resolve_wire_dtype("int3", ModelConfig())
