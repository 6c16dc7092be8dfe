"""The exit rules on hand-made logits: which exit fires, with which class, from which camera."""

import math

import pytest
import torch

from edge.exits import CLOUD, EXIT1, EXIT2, decide, exit1_choice, under
from pipeline.entropy import normalized_entropy

C = 10  # classes


def confident(cls: int, margin: float) -> torch.Tensor:
    """Logits for class `cls`; a larger margin means a lower entropy."""
    x = torch.zeros(C)
    x[cls] = margin
    return x


def frame(cams: list[tuple[int, float]]) -> torch.Tensor:
    """cams x C logits from (class, margin) per camera."""
    return torch.stack([confident(c, m) for c, m in cams])


def run(cam_logits: torch.Tensor, present: torch.Tensor, t1, t2, edge=(7, 0.0), cloud=9):
    """decide() on N x cams x C camera logits, one edge answer and one cloud answer for every frame."""
    n = cam_logits.shape[0]
    edge_logits = confident(*edge).expand(n, C)
    return decide(t1, t2, normalized_entropy(edge_logits), edge_logits.argmax(-1), torch.full((n,), cloud),
                  normalized_entropy(cam_logits), cam_logits.argmax(-1), present)


def test_exit1_answers_with_the_least_entropy_camera():
    logits = frame([(1, 2.0), (2, 9.0), (3, 5.0), (4, 1.0), (5, 0.5), (6, 3.0)]).unsqueeze(0)
    d = run(logits, torch.ones(1, 6, dtype=torch.bool), t1=1.0, t2=0.0)
    assert d.exit.tolist() == [EXIT1]
    assert d.camera.tolist() == [1]  # margin 9: the lowest entropy
    assert d.prediction.tolist() == [2]  # that camera's class, not the majority's or the edge's


def test_exit1_fires_only_under_t1():
    logits = frame([(1, 4.0)] * 6).unsqueeze(0)
    h = float(normalized_entropy(logits[0, 0]))
    present = torch.ones(1, 6, dtype=torch.bool)
    assert run(logits, present, t1=h + 1e-3, t2=0.0).exit.tolist() == [EXIT1]
    assert run(logits, present, t1=h, t2=0.0).exit.tolist() == [CLOUD]  # strictly under


def test_t1_zero_sends_nothing_out_at_exit1_and_t1_one_sends_everything():
    # Even a camera with (numerically) zero entropy does not leave at T1 = 0.
    logits = torch.stack([frame([(k % C, 200.0)] * 6) for k in range(5)] + [frame([(0, 0.0)] * 6)])
    assert float(normalized_entropy(logits).min()) == 0.0
    present = torch.ones(6, 6, dtype=torch.bool)
    assert not (run(logits, present, t1=0.0, t2=0.0).exit == EXIT1).any()
    # T1 = 1 admits every frame, the uniform (entropy exactly 1) one included.
    assert float(normalized_entropy(logits[-1, 0])) == pytest.approx(1.0)
    d = run(logits, present, t1=1.0, t2=1.0)
    assert (d.exit == EXIT1).all()


def test_missing_camera_is_never_chosen():
    # Camera 2 is by far the most confident, but absent: exit 1 must use camera 4, the best present one.
    logits = frame([(1, 1.0), (1, 1.0), (2, 50.0), (1, 1.0), (4, 6.0), (1, 1.0)]).unsqueeze(0)
    present = torch.tensor([[True, True, False, True, True, True]])
    d = run(logits, present, t1=1.0, t2=0.0)
    assert d.camera.tolist() == [4] and d.prediction.tolist() == [4]
    best, cam = exit1_choice(normalized_entropy(logits), present)
    assert cam.tolist() == [4] and math.isfinite(float(best))


def test_missing_camera_never_chosen_on_random_frames():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 6, C, generator=g) * 4
    present = torch.rand(200, 6, generator=g) < 0.5
    d = run(logits, present, t1=1.0, t2=0.0)
    fired = d.exit == EXIT1
    assert present[fired, d.camera[fired]].all()
    assert (d.exit[~present.any(1)] != EXIT1).all()  # a frame without cameras cannot leave at exit 1


def test_frame_without_cameras_falls_through_to_exit2_or_cloud():
    logits = frame([(1, 9.0)] * 6).unsqueeze(0)
    none = torch.zeros(1, 6, dtype=torch.bool)
    assert run(logits, none, t1=1.0, t2=1.0).exit.tolist() == [EXIT2]
    assert run(logits, none, t1=1.0, t2=0.0).exit.tolist() == [CLOUD]


def test_exit2_and_cloud_answer_with_their_own_class():
    logits = frame([(1, 0.1)] * 6).unsqueeze(0)  # unsure cameras
    present = torch.ones(1, 6, dtype=torch.bool)
    d = run(logits, present, t1=0.5, t2=1.0, edge=(7, 8.0))
    assert d.exit.tolist() == [EXIT2] and d.prediction.tolist() == [7] and d.camera.tolist() == [-1]
    d = run(logits, present, t1=0.5, t2=0.0, edge=(7, 8.0), cloud=3)
    assert d.exit.tolist() == [CLOUD] and d.prediction.tolist() == [3]


def test_ddnn_has_no_exit1():
    n = 4
    edge_logits = confident(5, 9.0).expand(n, C)
    d = decide(None, 0.5, normalized_entropy(edge_logits), edge_logits.argmax(-1), torch.zeros(n, dtype=torch.long))
    assert (d.exit == EXIT2).all() and (d.prediction == 5).all()


def test_under_bounds():
    h = torch.tensor([0.0, 0.5, 1.0])
    assert under(h, 0.0).tolist() == [False, False, False]
    assert under(h, 1.0).tolist() == [True, True, True]
    assert under(h, None).tolist() == [False, False, False]
