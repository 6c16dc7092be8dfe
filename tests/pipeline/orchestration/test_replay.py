import pytest

from pipeline.orchestration.cli import main
from pipeline.orchestration.replay import ReplayConfig, run_replay, summary_table

pytestmark = pytest.mark.services


def replay(stream_setup, brokers, site, **kw):
    path, model, data, _, _ = stream_setup
    cfg = ReplayConfig(checkpoint=path, mqtt_url=brokers[0], redis_url=brokers[1], site=site, progress=False,
                       cloud_device="cpu", processes=False, **kw)
    return run_replay(cfg, data=data, model=model)


def test_replay_500_frames_equals_offline(stream_setup, brokers, site):
    # Lazy upload (the default for an ADA-DDNN checkpoint): the only frames decided with fewer than
    # six cameras are those claimed at their first summary under T1 (early exit 1), and offline
    # evaluation with the cameras each decision used agrees on every frame.
    rep = replay(stream_setup, brokers, site, n=500, wire_dtype="float32", deadline_ms=5000)
    assert rep["upload"] == "lazy"
    assert rep["frames"] == 500 and rep["results"] == 500
    assert rep["lost"] == 0 and rep["duplicates"] == 0
    # Every frame decided with fewer than six cameras was claimed at a confident summary, or (under
    # a loaded machine, seldom: a camera's client starved for the 5 s deadline) at its deadline.
    assert rep["incomplete"] == rep["exit1_early"] + rep["deadline_claims"], rep
    assert rep["deadline_claims"] <= 5 and rep["reclaimed"] == 0, rep
    assert rep["features_missing"] == 0 and rep["feature_requests"] == 500 * (1 - rep["exit_rate"]["exit1"])
    assert rep["feature_requests_void"] == 0
    # every requested frame counted its wait for features once, all answered well within the deadline
    assert rep["feature_wait_ms"]["n"] == rep["feature_requests"], rep["feature_wait_ms"]
    assert 0 < rep["feature_wait_ms"]["p50"] <= rep["feature_wait_ms"]["p99"] < 1000
    assert rep["offline"]["decisions_equal"] == 1.0, rep["offline"]["mismatched_frames"]
    assert all(rep["exit_rate"][e] > 0 for e in ("exit1", "exit2", "cloud"))
    assert rep["mqtt_results"]["missing"] == 0
    for key in ("mode", "checkpoint", "n", "thresholds", "exit_rate", "accuracy", "bytes_per_frame", "frames",
                "results", "lost", "duplicates", "late", "throughput_fps", "latency_ms"):
        assert key in rep
    assert rep["latency_ms"]["cloud"]["p99"] >= rep["latency_ms"]["cloud"]["p50"] > 0
    assert "decisions equal to offline" in summary_table(rep)
    link = rep["link"]["bytes_per_camera_frame"]
    assert link["exit1"] < link["exit2"] and link["exit1"] < link["cloud"]  # exit 1 frames sent summaries only
    # the summary's parts add up: by exit, weighted by the exit mix, and what no decision used
    row = next(line for line in summary_table(rep).splitlines() if line.startswith("bytes/camera/frame"))
    every, by_exit, late = row.split("  ")[-1].strip().split("; ")
    parts = [float(x) for x in by_exit.split(" / ")]
    assert float(late) == link["unattributed"]
    assert float(every) == pytest.approx(sum(rep["exit_rate"][e] * b for e, b in zip(("exit1", "exit2", "cloud"), parts))
                                         + float(late), abs=0.3)
    assert rep["edge_runs_per_100_frames"] == pytest.approx(100 * (1 - rep["exit_rate"]["exit1"]), abs=0.01)


@pytest.mark.parametrize("upload, early", [("lazy", False), ("eager", True)])
def test_replay_waiting_for_every_camera_equals_offline(stream_setup, brokers, site, upload, early):
    # Lazy upload without early exit 1, and eager upload: every frame decided with all six cameras.
    rep = replay(stream_setup, brokers, site, n=200, start=300, wire_dtype="int4", deadline_ms=5000, upload=upload,
                 early_exit1=early)
    assert rep["upload"] == upload and rep["results"] == 200 and rep["lost"] == 0 and rep["duplicates"] == 0
    assert rep["incomplete"] == 0 and rep["exit1_early"] == 0
    assert rep["offline"]["decisions_equal"] == 1.0, rep["offline"]["mismatched_frames"]
    assert rep["feature_requests"] == (0 if upload == "eager" else 200 * (1 - rep["exit_rate"]["exit1"]))
    assert rep["feature_wait_ms"]["n"] == rep["feature_requests"]


@pytest.fixture(scope="module")
def max_setup(tmp_path_factory):
    """The DDNN paper's fusion (element-wise max of the cameras' features) in a checkpoint, as
    `stream_setup` is for concat: (path, model, data, t1, t2)."""
    from pipeline.offline.network import save_checkpoint
    from tests.helpers import stream_model, synthetic_cifar, tiny_config

    data = synthetic_cifar(n_train=8, n_val=8, n_test=300)
    model, t1, t2 = stream_model(tiny_config(fusion="max"), data)
    path = str(tmp_path_factory.mktemp("max") / "max.safetensors")
    save_checkpoint(model, path, card={"thresholds": {"t1": t1, "t2": t2}})
    return path, model, data, t1, t2


def test_replay_with_max_fusion_equals_offline(max_setup, brokers, site):
    # The edge and the cloud read the fusion from the checkpoint's config, as offline evaluation does.
    rep = replay(max_setup, brokers, site, n=200, wire_dtype="int8", deadline_ms=5000)
    assert rep["results"] == 200 and rep["lost"] == 0 and rep["duplicates"] == 0
    assert rep["offline"]["decisions_equal"] == 1.0, rep["offline"]["mismatched_frames"]
    assert all(rep["exit_rate"][e] > 0 for e in ("exit1", "exit2", "cloud"))


def test_two_aggregators_two_workers_int8(stream_setup, brokers, site):
    rep = replay(stream_setup, brokers, site, n=150, start=200, aggregators=2, workers=2, wire_dtype="int8",
                 deadline_ms=2000)
    assert rep["results"] == 150 and rep["lost"] == 0 and rep["duplicates"] == 0
    assert rep["offline"]["decisions_equal"] == 1.0
    assert 0.9 <= rep["offline_float32"]["agreement"] <= 1.0
    assert rep["bytes_per_frame"]["camera_to_edge"] < 6 * 1024


def test_one_camera_silent(stream_setup, brokers, site):
    rep = replay(stream_setup, brokers, site, n=30, silent=(5,), deadline_ms=50)
    assert rep["results"] == 30 and rep["lost"] == 0 and rep["duplicates"] == 0
    assert rep["incomplete"] == 30
    assert rep["offline"]["decisions_equal"] == 1.0


def test_health_checks(brokers, site):
    assert main(["edge", "--check", "--site", site, "--redis-url", brokers[1]]) == 1
    assert main(["cloud", "--check", "--site", site, "--redis-url", brokers[1]]) == 1


def test_three_sites_one_pool_of_cloud_workers(stream_setup, brokers, site):
    from pipeline.orchestration.replay_report import sites_table

    rep = replay(stream_setup, brokers, site, sites=3, n=60, start=100, workers=2, deadline_ms=2000)
    assert list(rep["sites"]) == [f"{site}-{i}" for i in range(3)]
    assert rep["frames"] == rep["results"] == 180 and rep["lost"] == 0 and rep["duplicates"] == 0
    for i, one in enumerate(rep["sites"].values()):
        assert one["results"] == 60 and one["accounting"]["unexplained"] == 0
        assert one["offline"]["decisions_equal"] == 1.0 and one["offline"]["exit_rate_equal"]
        assert one["offline"]["exit_rate"] == one["exit_rate"]
    assert rep["exit_mix_equal_to_offline"] is True
    assert f"{site}-2" in sites_table(rep)


def test_frames_answered_blind_are_named_not_counted_as_mismatches(stream_setup, brokers, site):
    # A request deadline of 1 ms: most requested frames are decided before any feature comes,
    # answered at exit 1 by their most confident camera (whatever T1 says). Offline evaluation,
    # which has every feature, cannot take that decision: such frames are counted apart, and
    # every other frame still equals offline evaluation.
    rep = replay(stream_setup, brokers, site, n=120, start=100, wire_dtype="int4", deadline_ms=5000,
                 request_deadline_ms=1)
    assert rep["results"] == 120 and rep["lost"] == 0
    assert rep["offline"]["blind"] > 0, rep["offline"]
    assert rep["features_missing"] > 0
    assert rep["offline"]["decisions_equal"] == 1.0, rep["offline"]["mismatched_frames"]
