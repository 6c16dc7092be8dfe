"""Metric formulas, the sweep and its Pareto front, threshold policies, and the rule that
thresholds are chosen on validation outputs only."""

import pytest
import torch

from pipeline.data import to_float
from pipeline.offline import evaluation, link
from pipeline.offline import experiments as evaluate
from pipeline.offline.evaluation import (
    Collected,
    classifier_accuracies,
    exit_metrics,
    pareto,
    select_thresholds,
)
from pipeline.offline.network import AdaDDNN, prepare_views, save_checkpoint
from tests.helpers import synthetic_cifar, tiny_config

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # a coarse T grid keeps the end-to-end tests fast


def hand_made() -> Collected:
    """Four frames, two cameras. With T1 = T2 = 0.5:
    frame 0: camera 0 (entropy 0.1, class 0) -> exit 1, correct; camera 1 is absent
    frame 1: camera 1 (entropy 0.2, class 1) -> exit 1, correct
    frame 2: cameras unsure, edge sure (0.1) with class 4 -> exit 2, wrong (label 2)
    frame 3: everyone unsure -> cloud, class 9, wrong (label 3)"""
    return Collected(
        labels=torch.tensor([0, 1, 2, 3]),
        present=torch.tensor([[True, False], [True, True], [True, True], [True, True]]),
        cam_entropy=torch.tensor([[0.1, 0.05], [0.8, 0.2], [0.9, 0.9], [0.9, 0.9]]),
        cam_pred=torch.tensor([[0, 5], [5, 1], [0, 0], [0, 0]]),
        edge_entropy=torch.tensor([0.9, 0.9, 0.1, 0.9]),
        edge_pred=torch.tensor([5, 5, 4, 3]),
        cloud_pred=torch.tensor([0, 1, 2, 9]),
    )


def test_exit_rates_and_eq6_eq7_accuracies():
    m = exit_metrics(hand_made(), 0.5, 0.5)
    assert m["exit_rate"] == {"exit1": 0.5, "exit2": 0.25, "cloud": 0.25}
    assert m["edge_rate"] == 0.75
    acc = m["accuracy"]
    assert acc["edge"] == pytest.approx(2 / 3)  # eq. 6: correct among the 3 frames leaving at exit 1 or 2
    assert acc["cloud"] == 0.0  # eq. 7: correct among the 1 frame reaching the cloud
    assert acc["overall"] == 0.5
    assert acc["exit1"] == 1.0 and acc["exit2"] == 0.0


def test_edge_accuracy_is_none_when_nothing_leaves_at_the_edge():
    m = exit_metrics(hand_made(), 0.0, 0.0)
    assert m["exit_rate"]["cloud"] == 1.0
    assert m["accuracy"]["edge"] is None
    assert m["accuracy"]["cloud"] == m["accuracy"]["overall"] == 0.75


def test_classifier_accuracies_on_every_frame():
    a = classifier_accuracies(hand_made())
    assert a["edge_all"] == 0.25  # only frame 3's edge answer (3) is right
    assert a["cloud_all"] == 0.75
    # camera 0 is right on frame 0 only; camera 1 is scored on the 3 frames where it is present
    assert a["cameras_all"] == [pytest.approx(0.25), pytest.approx(1 / 3)]


def test_sweep_covers_the_grid_and_ddnn_sweeps_t2_only():
    c = hand_made()
    points = evaluation.sweep(c, GRID)
    assert len(points) == len(GRID) ** 2
    assert {(p["t1"], p["t2"]) for p in points} == {(a, b) for a in GRID for b in GRID}
    for p in points:
        m = exit_metrics(c, p["t1"], p["t2"])
        assert p["edge_rate"] == pytest.approx(m["edge_rate"]) and p["overall"] == pytest.approx(m["accuracy"]["overall"])
    c.cam_entropy = c.cam_pred = None
    points = evaluation.sweep(c, GRID)
    assert [p["t1"] for p in points] == [None] * len(GRID)


def test_sweep_counts_agree_with_exit_metrics_on_random_frames():
    g = torch.Generator().manual_seed(3)
    n = 300
    present = torch.rand(n, 6, generator=g) < 0.6
    present[:5] = False  # frames with no camera at all
    c = Collected(torch.randint(0, 10, (n,), generator=g), present, torch.rand(n, 6, generator=g),
                  torch.randint(0, 10, (n, 6), generator=g), torch.rand(n, generator=g),
                  torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (n,), generator=g))
    grid = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    for p in evaluation.sweep(c, grid):
        m = exit_metrics(c, p["t1"], p["t2"])
        assert p["edge_rate"] == pytest.approx(m["edge_rate"])
        assert p["edge_n"] == round(m["edge_rate"] * n)
        assert p["overall"] == pytest.approx(m["accuracy"]["overall"])
        assert p["edge_acc"] == (None if m["accuracy"]["edge"] is None else pytest.approx(m["accuracy"]["edge"]))


def P(rate, overall, t=0.0):
    return {"t1": t, "t2": t, "edge_rate": rate, "edge_acc": None, "overall": overall}


def test_pareto_keeps_only_undominated_points():
    pts = [P(0.0, 0.80, 0), P(0.5, 0.79, 1), P(0.5, 0.70, 2), P(0.3, 0.75, 3), P(0.9, 0.60, 4), P(0.9, 0.60, 5),
           P(1.0, 0.50, 6), P(0.2, 0.80, 7)]
    front = pareto(pts)
    assert [p["t1"] for p in front] == [7, 1, 4, 6]  # by rising edge rate; the tie (4, 5) keeps the first
    for p in front:
        assert not any(q["edge_rate"] >= p["edge_rate"] and q["overall"] >= p["overall"]
                       and (q["edge_rate"], q["overall"]) != (p["edge_rate"], p["overall"]) for q in pts)


def E(t, rate, edge_acc, overall, exit1=0.5):
    return {"t1": t, "t2": t, "edge_rate": rate, "exit1_rate": exit1, "edge_acc": edge_acc, "overall": overall}


POINTS = [E(0.0, 0.0, None, 0.85), E(0.1, 0.3, 0.97, 0.86), E(0.2, 0.6, 0.92, 0.84), E(0.3, 0.7, 0.88, 0.80),
          E(0.4, 0.9, 0.80, 0.78), E(1.0, 1.0, 0.70, 0.70)]


def test_policy_edge_accuracy():
    t = select_thresholds(POINTS, "edge-accuracy", confidence=0, min_edge_accuracy=0.90)
    assert (t["t1"], t["t2"], t["chosen_on"]) == (0.2, 0.2, "validation")
    assert "edge accuracy >= 0.90" in t["policy"]
    t = select_thresholds(POINTS, "edge-accuracy", confidence=0, min_edge_accuracy=0.99)
    assert (t["t1"], t["t2"]) == (0.0, 0.0) and "unreachable" in t["policy"]


def X(t, rate, exit1, edge_acc, overall):
    return {"t1": t, "t2": t, "edge_rate": rate, "exit1_rate": exit1, "edge_acc": edge_acc, "overall": overall}


def test_policy_exit1_first_takes_the_most_exit1_frames_that_keep_both_floors():
    pts = [X(0.0, 0.90, 0.00, 0.91, 0.860),  # the most frames at the edge, no exit 1 (edge-accuracy's choice)
           X(0.1, 0.88, 0.45, 0.91, 0.858),
           X(0.2, 0.86, 0.55, 0.90, 0.852),  # more exit 1, but overall under cloud-only - epsilon
           X(0.3, 0.80, 0.60, 0.89, 0.860),  # edge accuracy under the floor
           X(0.4, 0.70, 0.45, 0.95, 0.865)]  # as many exit-1 frames as 0.1, fewer at the edge
    t = select_thresholds(pts, "exit1-first", confidence=0, min_edge_accuracy=0.90, epsilon=0.01, cloud_only=0.865)
    assert t["t1"] == 0.1 and "max exit-1 rate" in t["policy"]
    assert select_thresholds(pts, "edge-accuracy", confidence=0, min_edge_accuracy=0.90, min_exit1_rate=0.0)["t1"] == 0.0
    assert select_thresholds(pts, "exit1-first", confidence=0, min_edge_accuracy=0.90, epsilon=0.02, cloud_only=0.865)["t1"] == 0.2
    t = select_thresholds(pts, "exit1-first", confidence=0, min_edge_accuracy=0.99, epsilon=0.01, cloud_only=0.865)
    assert (t["t1"], t["t2"]) == (0.0, 0.0) and "unreachable" in t["policy"]
    with pytest.raises(ValueError, match="cloud-only"):
        select_thresholds(pts, "exit1-first", confidence=0)
    ddnn = [{**p, "t1": None, "exit1_rate": 0.0} for p in pts]  # no exit 1: the most frames at the edge
    assert select_thresholds(ddnn, "exit1-first", confidence=0, min_edge_accuracy=0.90, epsilon=0.01, cloud_only=0.865)["t2"] == 0.0


def test_policy_edge_accuracy_keeps_an_exit1_floor_and_drops_it_only_when_out_of_reach():
    pts = [X(0.0, 0.94, 0.00, 0.901, 0.874),  # the most frames at the edge, but exit 1 switched off
           X(0.1, 0.92, 0.53, 0.905, 0.871),  # the floor's choice
           X(0.2, 0.89, 0.53, 0.916, 0.873),  # as much exit 1, fewer frames at the edge
           X(0.3, 0.95, 0.62, 0.880, 0.870)]  # more of both, edge accuracy under its floor
    t = select_thresholds(pts, "edge-accuracy", confidence=0, min_edge_accuracy=0.90, min_exit1_rate=0.45)
    assert t["t1"] == 0.1 and t["policy"] == "max edge rate with edge accuracy >= 0.90 and exit-1 rate >= 0.45"
    assert select_thresholds(pts, "edge-accuracy", confidence=0, min_edge_accuracy=0.90, min_exit1_rate=0.0)["t1"] == 0.0
    t = select_thresholds(pts, "edge-accuracy", confidence=0, min_edge_accuracy=0.90, min_exit1_rate=0.60)
    assert t["t1"] == 0.0 and "exit-1 floor unreachable" in t["policy"]  # the accuracy floor still holds
    t = select_thresholds(pts, "edge-accuracy", confidence=0, min_edge_accuracy=0.95, min_exit1_rate=0.45)
    assert (t["t1"], t["t2"]) == (0.0, 0.0) and "unreachable: all to cloud" in t["policy"]
    ddnn = [{**p, "t1": None, "exit1_rate": 0.0} for p in pts]  # no exit 1, no floor to keep
    t = select_thresholds(ddnn, "edge-accuracy", confidence=0, min_edge_accuracy=0.90, min_exit1_rate=0.45)
    assert t["t2"] == 0.0 and t["policy"] == "max edge rate with edge accuracy >= 0.90"
    with pytest.raises(ValueError, match="min_exit1_rate"):
        select_thresholds(pts, "edge-accuracy", confidence=0, min_exit1_rate=1.5)


def test_wilson_lower_is_the_proportion_z_standard_errors_above_it():
    from statistics import NormalDist

    for acc, n, conf in [(0.9, 100, 0.95), (0.9016, 4735, 0.95), (0.5, 7, 0.99), (1.0, 50, 0.95), (0.0, 50, 0.95)]:
        lo = evaluation.wilson_lower(acc, n, conf)
        z = NormalDist().inv_cdf(conf)
        assert 0.0 <= lo <= acc
        if acc > 0:  # the score test's boundary: (acc - p0) / sqrt(p0 (1 - p0) / n) = z
            assert (acc - lo) / (lo * (1 - lo) / n) ** 0.5 == pytest.approx(z, rel=1e-9)
    assert evaluation.wilson_lower(0.9, 100, 0.0) == 0.9
    assert evaluation.wilson_lower(0.9, 10_000, 0.95) > evaluation.wilson_lower(0.9, 100, 0.95)
    assert evaluation.wilson_lower(0.9, 1000, 0.99) < evaluation.wilson_lower(0.9, 1000, 0.95)
    for bad in (0.3, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence"):
            evaluation.wilson_lower(0.9, 100, bad)
    with pytest.raises(ValueError, match="trials"):
        evaluation.wilson_lower(0.9, 0, 0.95)


def test_policy_edge_accuracy_floor_holds_for_the_lower_bound_by_default():
    # both points estimate 91% edge accuracy; the bound passes 0.90 only where many frames back it
    pts = [{**X(0.1, 0.95, 0.60, 0.91, 0.86), "edge_n": 400},  # 95% bound ~0.884
           {**X(0.2, 0.92, 0.50, 0.91, 0.87), "edge_n": 9200}]  # 95% bound ~0.905
    t = select_thresholds(pts, "edge-accuracy")
    assert t["t1"] == 0.2 and t["policy"] == ("max edge rate with edge accuracy >= 0.90 (95% lower bound) "
                                              "and exit-1 rate >= 0.45")
    assert select_thresholds(pts, "edge-accuracy", confidence=0)["t1"] == 0.1  # the estimate alone
    assert select_thresholds(pts, "edge-accuracy", confidence=0.9999)["t2"] == 0.0  # nothing: all to cloud
    t = select_thresholds(pts, "exit1-first", cloud_only=0.87, epsilon=0.02)
    assert t["t1"] == 0.2 and "(95% lower bound)" in t["policy"]
    with pytest.raises(ValueError, match="edge_n"):
        select_thresholds([E(0.1, 0.3, 0.97, 0.86)], "edge-accuracy")
    with pytest.raises(ValueError, match="confidence"):
        select_thresholds(pts, "edge-accuracy", confidence=0.2)


def test_policy_min_edge_rate():
    assert select_thresholds(POINTS, "min-edge-rate", min_edge_rate=0.5)["t1"] == 0.2  # best overall at >= 50%
    assert select_thresholds(POINTS, "min-edge-rate", min_edge_rate=0.0)["t1"] == 0.1
    assert select_thresholds(POINTS, "min-edge-rate", min_edge_rate=0.95)["t1"] == 1.0


def test_policy_within_cloud():
    t = select_thresholds(POINTS, "within-cloud", epsilon=0.01, cloud_only=0.85)
    assert t["t1"] == 0.2  # 0.84 >= 0.85 - 0.01, and the most frames at the edge
    assert select_thresholds(POINTS, "within-cloud", epsilon=0.0, cloud_only=0.85)["t1"] == 0.1
    assert select_thresholds(POINTS, "within-cloud", epsilon=0.06, cloud_only=0.85)["t1"] == 0.3
    assert select_thresholds(POINTS, "within-cloud", epsilon=0.10, cloud_only=0.85)["t1"] == 0.4
    with pytest.raises(ValueError):
        select_thresholds(POINTS, "within-cloud")
    with pytest.raises(ValueError, match="unknown policy"):
        select_thresholds(POINTS, "best-guess")


def test_choose_thresholds_default_is_the_model_cards_policy(caplog):
    c = hand_made()
    t = evaluation.choose_thresholds(c)
    assert "every frame goes to the cloud; on few frames the 95% lower bound" in caplog.text  # said, not silent
    assert t["chosen_on"] == "validation"
    assert t["policy"].startswith("max edge rate with edge accuracy >= 0.90 (95% lower bound) and exit-1 rate >= 0.45")
    assert t["policy"].endswith("(unreachable: all to cloud)")  # four frames bound no accuracy to 90%
    # within-cloud measures cloud-only on the same outputs: 0.75 here
    t = evaluation.choose_thresholds(c, policy="within-cloud", epsilon=0.0)
    assert exit_metrics(c, t["t1"], t["t2"])["accuracy"]["overall"] >= 0.75


def test_within_cloud_with_no_slack_is_reachable_on_real_counts():
    g = torch.Generator().manual_seed(1)
    n = 1000  # accuracies like 0.113 are not exact in float32; the comparison must not trip on that
    c = Collected(torch.randint(0, 10, (n,), generator=g), torch.ones(n, 6, dtype=torch.bool),
                  torch.rand(n, 6, generator=g), torch.randint(0, 10, (n, 6), generator=g), torch.rand(n, generator=g),
                  torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (n,), generator=g))
    t = evaluation.choose_thresholds(c, policy="within-cloud", epsilon=0.0)
    assert "unreachable" not in t["policy"] and type(t["t2"]) is float
    assert exit_metrics(c, t["t1"], t["t2"])["accuracy"]["overall"] >= evaluation.cloud_only_accuracy(c) - 1e-6


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return AdaDDNN(tiny_config()).eval()


def test_collect_matches_the_network_and_the_codec_is_applied(tiny_model):
    split = synthetic_cifar(n_val=24).val
    c = evaluation.collect(tiny_model, split, batch_size=10)
    with torch.no_grad():
        out = tiny_model(prepare_views(tiny_model.cfg, to_float(split.images)))
    assert torch.equal(c.cloud_pred, out.cloud_logits.argmax(-1))
    assert torch.equal(c.edge_pred, out.edge_logits.argmax(-1))
    y = torch.as_tensor(split.labels)
    ce = torch.nn.functional.cross_entropy
    assert c.edge_loss == pytest.approx(ce(out.edge_logits, y).item(), rel=1e-5)
    assert c.cloud_loss == pytest.approx(ce(out.cloud_logits, y).item(), rel=1e-5)
    exact = evaluation.collect(tiny_model, split, wire_dtype="float32")
    assert torch.equal(exact.cloud_pred, c.cloud_pred) and torch.allclose(exact.edge_entropy, c.edge_entropy)
    cams = evaluation.camera_pass(tiny_model, split, wire_dtype="int8")
    raw = evaluation.camera_pass(tiny_model, split)
    assert not torch.equal(cams.features, raw.features)  # quantized
    step = raw.features.abs().amax(dim=(-2, -1), keepdim=True) / 127  # int8 step per frame, camera, channel
    assert ((cams.features - raw.features).abs() <= step / 2 + 1e-6).all()


def test_fuse_pass_masks_cameras(tiny_model):
    split = synthetic_cifar(n_val=16).val
    cams = evaluation.camera_pass(tiny_model, split)
    present = torch.ones(16, 6, dtype=torch.bool)
    present[:, 2] = False
    masked = evaluation.fuse_pass(tiny_model, cams, present)
    with torch.no_grad():
        out = tiny_model(prepare_views(tiny_model.cfg, to_float(split.images)), present)
    assert torch.equal(masked.edge_pred, out.edge_logits.argmax(-1))
    assert torch.equal(masked.present, present)


@pytest.fixture()
def checkpoint(tmp_path, tiny_model):
    path = str(tmp_path / "ada.safetensors")
    save_checkpoint(tiny_model, path)
    return path


def _origins(monkeypatch):
    """Spy on the pipeline: which split every Collected came from, and what choose_thresholds got."""
    origin: dict[int, str] = {}
    chosen_from: list[str] = []
    real_cams, real_fuse, real_choose = evaluation.camera_pass, evaluation.fuse_pass, evaluation.choose_thresholds
    real_coded = link.coded

    def camera_pass(model, split, *a, **k):
        out = real_cams(model, split, *a, **k)
        origin[id(out)] = split.name
        return out

    def coded(raw, dtype):  # the wire codec applied to a camera pass keeps its split
        out = real_coded(raw, dtype)
        origin[id(out)] = origin[id(raw)]
        return out

    def fuse_pass(model, cams, *a, **k):
        out = real_fuse(model, cams, *a, **k)
        origin[id(out)] = origin[id(cams)]
        return out

    def choose_thresholds(c, *a, **k):
        chosen_from.append(origin.get(id(c), "unknown"))
        return real_choose(c, *a, **k)

    monkeypatch.setattr(evaluation, "camera_pass", camera_pass)
    monkeypatch.setattr(link, "coded", coded)
    monkeypatch.setattr(evaluation, "fuse_pass", fuse_pass)
    monkeypatch.setattr(evaluation, "choose_thresholds", choose_thresholds)
    return origin, chosen_from


def test_thresholds_see_only_the_validation_split(checkpoint, monkeypatch):
    origin, chosen_from = _origins(monkeypatch)
    data = synthetic_cifar(n_val=20, n_test=24)
    report, optimistic, _ = evaluate.evaluate_checkpoint(checkpoint, data, draws=2, bytes_sample=5, grid=GRID)
    assert chosen_from == ["val"]  # called once, on validation outputs
    assert "test" in origin.values()  # the test split was evaluated, just never given to choose_thresholds
    assert report["thresholds"]["chosen_on"] == "validation"
    assert "optimistic" in optimistic["thresholds"]["chosen_on"]


def test_thresholds_do_not_depend_on_the_test_split(checkpoint):
    a = synthetic_cifar(n_val=20, n_test=20, seed=1)
    b = a.__class__(a.train, a.val, synthetic_cifar(n_test=20, seed=2).test, a.digest, a.path)
    policy = dict(policy="min-edge-rate", min_edge_rate=0.3, draws=2, bytes_sample=5, grid=GRID)
    ra, _, _ = evaluate.evaluate_checkpoint(checkpoint, a, **policy)
    rb, _, _ = evaluate.evaluate_checkpoint(checkpoint, b, **policy)
    assert ra["thresholds"] == rb["thresholds"]
    assert ra["sweep"]["points"] != rb["sweep"]["points"]  # the test splits did differ


def test_absent_sets_are_distinct_while_possible():
    import numpy as np

    rng = np.random.default_rng(0)
    sets = evaluate.absent_sets(6, 1, 5, rng)
    assert len(sets) == len(set(sets)) == 5 and all(len(s) == 1 for s in sets)
    assert evaluate.absent_sets(6, 6, 5, rng) == [(0, 1, 2, 3, 4, 5)] * 5
