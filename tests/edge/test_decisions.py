"""The edge's decisions (`edge.decisions.decide_frames`) equal offline evaluation's, frame for
frame, for each fusion: concat, and max, the element-wise max pooling of the DDNN paper."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge.decisions import REQUEST, Frame, _decide_tensors, decide_frames, decide_on_verdicts
from edge.exits import decide
from edge.fusion import fuse
from pipeline.offline import evaluation
from pipeline.wire.messages import EXIT_NAMES, CameraObservation, CameraSummary, FeatureTensor
from tests.helpers import stream_model, synthetic_cifar, tiny_config


@pytest.fixture(scope="module", params=[("ada", "concat"), ("ada", "max"), ("ddnn", "max"), ("ada", "mean")],
                ids=lambda p: "-".join(p))
def setup(request):
    mode, fusion = request.param
    data = synthetic_cifar(n_train=8, n_val=8, n_test=200)
    model, t1, t2 = stream_model(tiny_config(mode=mode, fusion=fusion), data)
    return model, data, t1, t2


def test_decide_frames_equals_offline(setup):
    model, data, t1, t2 = setup
    n, cams = 60, model.cfg.num_cameras
    split = data.test.head(n)
    raw = evaluation.camera_pass(model, split, batch_size=n)
    ada = model.cfg.has_camera_classifiers
    obs = {f: [CameraObservation("s", f, k, 1.0, int(raw.cam_pred[f, k]) if ada else None,
                                 float(raw.cam_entropy[f, k]) if ada else None,
                                 FeatureTensor.quantize(raw.features[f, k], "int8"), None)
               for k in range(cams)] for f in range(n)}
    g = torch.Generator().manual_seed(1)
    present = torch.rand(n, cams, generator=g) > 0.3
    present[:, 0] |= ~present.any(dim=1)
    frames = [Frame(f, [o for o in obs[f] if present[f, o.camera]]) for f in range(n)]
    cams_int8 = evaluation.camera_pass(model, split, batch_size=n, wire_dtype="int8")
    c = evaluation.fuse_pass(model, cams_int8, present, batch_size=n)
    ref = decide(t1, t2, c.edge_entropy, c.edge_pred, c.cloud_pred, c.cam_entropy, c.cam_pred, c.present)
    offline_fused = fuse(cams_int8.features, present, model.cfg.fusion)
    for batch in (1, 7, n):
        for s in range(0, n, batch):
            out, fused, _, _ = decide_frames(model.edge, frames[s:s + batch], t1, t2)
            assert torch.equal(fused, offline_fused[s:s + batch])  # what the edge escalates to the cloud
            for i, (exit_name, pred, _, _) in enumerate(out):
                f = s + i
                assert exit_name == EXIT_NAMES[int(ref.exit[f])], (batch, f)
                if exit_name != "cloud":
                    assert pred == int(ref.prediction[f])
    expected = {"exit2", "cloud"} | ({"exit1"} if model.cfg.has_camera_classifiers else set())
    assert {EXIT_NAMES[int(e)] for e in ref.exit} == expected  # the thresholds exercise every exit


def test_max_fusion_is_smaller_than_concat():
    # Max pooling keeps one camera's channels: the edge and the cloud see 12 channels, not 6 x 12.
    assert tiny_config(fusion="max").fused_channels == tiny_config().wire_channels
    assert tiny_config().fused_channels == 6 * tiny_config().wire_channels


def test_a_requested_frame_without_any_features_is_answered_by_its_most_confident_camera(stream_setup):
    # Lazy upload, no camera answered the feature request by the second deadline: the summaries
    # are all the edge has. The edge block on all-zero features would give one class to every
    # such frame; the most confident camera answers instead, even above T1.
    _, model, _, _, t2 = stream_setup  # ADA-DDNN (summaries need camera classifiers)
    sums = [CameraSummary("s", 7, k, 1.0, k + 1, 0.9 - 0.1 * k) for k in (1, 3, 4)]  # camera 4: 0.5, class 5
    blind = Frame(7, [], summaries=sums, requested=True, asked=(1, 3, 4))
    waiting = Frame(8, [], summaries=[CameraSummary("s", 8, 2, 1.0, 3, 0.99)])  # not yet asked: ask
    out, _, edge_entropy, _ = decide_frames(model.edge, [blind, waiting], 0.01, t2)
    assert out[0] == ("exit1", 5, pytest.approx(0.5), 4)
    assert out[1][0] == "request"
    assert torch.isnan(edge_entropy).all()  # the edge block ran on neither
    assert blind.blind and blind.present == (1, 3, 4) and blind.missing == (1, 3, 4)  # the verdicts it used; all missing
    assert not waiting.blind and waiting.present == (2,)


def test_a_camera_with_a_wrong_clock_does_not_move_its_frames_capture_time():
    sums = [CameraSummary("s", 9, k, 1.0 if k == 2 else 1_700_000_000.0, 0, 0.5) for k in range(6)]
    assert Frame(9, [], summaries=sums).captured_at == 1_700_000_000.0  # camera 2 booted at 1970
    assert Frame(9, [], summaries=sums[1:3]).captured_at == 1.0  # of two, the lower


# Entropies as the wire carries them (float32 values), few distinct ones so that ties and values
# equal to T1 come up; T1 among them, beside them, None and >= 1 (0.7 rounds down to float32:
# 0.69999999 < 0.7 in double precision, not in float32).
_entropy = st.sampled_from([0.0, 0.01, 0.025, 0.1, 0.4250000238418579, 0.5, 0.7, 0.9, 1.0]).map(lambda e: float(np.float32(e)))
_frame_summaries = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 9), _entropy), min_size=1, max_size=6,
                            unique_by=lambda x: x[0])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(_frame_summaries, min_size=1, max_size=5),
       t1=st.one_of(st.none(), _entropy, st.sampled_from([0.025, 0.0999999, 0.425, 0.7, 1.0, 1.5])))
@example(frames=[[(2, 4, float(np.float32(0.7))), (1, 3, float(np.float32(0.7)))]], t1=0.7)  # a tie at T1
def test_the_summary_only_path_decides_as_the_tensor_path(stream_setup, frames, t1):
    # Lazy upload's first look at a frame (summaries only) skips the tensors; its answers must be
    # the tensor path's, ties (the lowest camera) and entropies equal to T1 included.
    _, model, _, _, t2 = stream_setup
    batch = [Frame(i, [], summaries=[CameraSummary("s", i, k, 1.0, p, e) for k, p, e in sorted(sums)])
             for i, sums in enumerate(frames)]
    fast, fused, edge_entropy, edge_pred = decide_on_verdicts(model.edge, batch, t1)
    slow, slow_fused, slow_entropy, slow_pred = _decide_tensors(model.edge, batch, t1, t2, torch.device("cpu"))
    assert [o[0] for o in fast] == [o[0] for o in slow]
    for a, b in zip(fast, slow):
        if a[0] == REQUEST:  # its entropy is NaN in both
            assert a[1] == b[1] == -1 and a[3] is None and b[3] is None
        else:
            assert a == b
    assert fused.shape == slow_fused.shape and torch.equal(edge_pred, slow_pred)
    assert torch.isnan(edge_entropy).all() and torch.isnan(slow_entropy).all()
    assert decide_frames(model.edge, batch, t1, t2)[0][0][0] == fast[0][0]  # the dispatcher takes this path
