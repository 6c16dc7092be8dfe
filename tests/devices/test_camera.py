import logging
import threading
import time

import pytest
import torch

from devices.camera import CameraConfig, CameraFeed, FeatureCache, check_online, load_feed, resolve_upload
from pipeline.errors import CameraError
from pipeline.offline import evaluation
from pipeline.settings import config_from_env
from pipeline.transport.mqtt_client import close_mqtt, mqtt_client
from pipeline.wire import names
from pipeline.wire.messages import (
    CameraFeatures,
    CameraObservation,
    CameraStatus,
    CameraSummary,
    FeatureRequest,
    FeatureTensor,
)
from tests.helpers import poll


@pytest.mark.parametrize("batch", [1, 7])
def test_observations_equal_offline_camera_pass(stream_setup, batch):
    _, model, data, _, _ = stream_setup
    split = data.test.head(20)
    feed = CameraFeed(CameraConfig(cameras=tuple(range(6)), wire_dtype="int8"), dict(enumerate(model.cameras)), split)
    offline = evaluation.camera_pass(model, split, batch_size=10, wire_dtype="int8")
    for start in range(0, 20, batch):
        ids = list(range(start, min(20, start + batch)))
        scenes = torch.as_tensor(split.images[ids[0]:ids[-1] + 1]).float() / 255
        for i, per_cam in zip(ids, feed.observe(scenes, ids, [1.0] * len(ids))):
            for o in per_cam:
                assert torch.equal(o.features.to_tensor(), offline.features[i, o.camera])
                assert o.entropy == float(offline.cam_entropy[i, o.camera])
                assert o.prediction == int(offline.cam_pred[i, o.camera])
                assert o.label == int(split.labels[i])


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("ADA_DDNN_SITE", "lab-3")
    monkeypatch.setenv("ADA_DDNN_CAMERAS", "1,4")
    monkeypatch.setenv("ADA_DDNN_FPS", "12.5")
    cfg = config_from_env(CameraConfig, wire_dtype="float16")
    assert (cfg.site, cfg.cameras, cfg.fps, cfg.wire_dtype) == ("lab-3", (1, 4), 12.5, "float16")
    with pytest.raises(ValueError):
        CameraConfig(site="a/b")


def test_unknown_camera_is_a_named_error(stream_setup):
    path, _, _, _, _ = stream_setup
    with pytest.raises(CameraError, match="camera 9"):
        load_feed(CameraConfig(site="s", checkpoint=path, cameras=(9,)))


@pytest.mark.services
def test_cameras_publish_observations_and_status(stream_setup, brokers, site):
    _, model, data, _, _ = stream_setup
    mqtt_url, _ = brokers
    got: list[CameraObservation] = []
    status: dict[int, str] = {}
    enough = threading.Event()

    def on_message(msg):
        if msg.topic.endswith("/obs"):
            got.append(CameraObservation.decode(msg.payload))
            if len(got) == 10:
                enough.set()
        else:
            st = CameraStatus.decode(msg.payload)
            status[st.camera] = st.state

    def on_connect(c):
        c.subscribe(names.obs_filter(site), qos=1)
        c.subscribe(names.status_filter(site), qos=1)

    sub = mqtt_client(mqtt_url, f"{site}-sub", on_connect=on_connect, on_message=on_message)
    cfg = CameraConfig(site=site, mqtt_url=mqtt_url, cameras=(0, 3), start=10, stop=15, batch=2, upload="eager")
    feed = CameraFeed(cfg, {k: model.cameras[k] for k in cfg.cameras}, data.test)
    feed.connect()
    assert check_online(cfg, timeout_s=5) == 0
    stats = feed.run()
    feed.close()
    assert enough.wait(10)
    close_mqtt(sub)
    assert stats.frames == 5 and stats.published == 10 and stats.unacknowledged == 0
    assert sorted((o.frame_id, o.camera) for o in got) == [(f, k) for f in range(10, 15) for k in (0, 3)]
    assert check_online(cfg, timeout_s=5) == 1  # "done" is retained now


def _recorder(mqtt_url, site, want, topic_filter):
    got, done = [], threading.Event()

    def on_message(msg):
        got.append(msg)
        if len(got) >= want:
            done.set()

    sub = mqtt_client(mqtt_url, f"{site}-rec-{want}", on_connect=lambda c: c.subscribe(topic_filter, qos=1),
                      on_message=on_message)
    return sub, got, done


@pytest.mark.services
def test_separately_started_cameras_share_the_site_clock(stream_setup, brokers, site):
    from pipeline.wire.control import SiteClock

    _, model, data, _, _ = stream_setup
    mqtt_url, _ = brokers
    sub, got, done = _recorder(mqtt_url, site, 2 * 20, names.obs_filter(site))
    feeds = [CameraFeed(CameraConfig(site=site, mqtt_url=mqtt_url, cameras=(k,), start=0, stop=20, fps=25.0,
                                     max_lag_ms=5000, upload="eager"), {k: model.cameras[k]}, data.test)
             for k in (0, 4)]
    try:
        stats = [None, None]

        def run(i):
            feeds[i].connect()
            stats[i] = feeds[i].run()

        first = threading.Thread(target=run, args=(0,))
        first.start()
        first.join(0.3)  # the second process starts later, as in the field
        run(1)
        first.join(30)
        assert done.wait(10)
    finally:
        for f in feeds:
            f.close()
        close_mqtt(sub)
    obs = [CameraObservation.decode(m.payload) for m in got]
    clock = feeds[0].signals.clock or feeds[1].signals.clock
    assert isinstance(clock, SiteClock)
    for o in obs:  # both cameras stamp frame i with the same slot of one clock, whenever they computed it
        assert o.captured_at == pytest.approx(clock.at(o.frame_id), abs=1e-6)
    assert sorted({(o.frame_id, o.camera) for o in obs}) == [(f, k) for f in range(20) for k in (0, 4)]
    assert all(s.frames == 20 and not s.shed for s in stats)


@pytest.mark.services
def test_cameras_shed_and_name_frames_while_the_edge_is_overloaded(stream_setup, brokers, site):
    from pipeline.wire.control import FlowStatus, ShedNotice

    _, model, data, _, _ = stream_setup
    mqtt_url, _ = brokers
    edge = mqtt_client(mqtt_url, f"{site}-fake-edge")
    edge.publish(names.flow_topic(site, "edge-x"), FlowStatus(site, "edge-x", 9000.0, 500, time.time()).encode(),
                 retain=True)
    assert edge.wait_confirmed(5)
    sub, got, done = _recorder(mqtt_url, site, 1, f"ada/{site}/cam/+/shed")
    obs_sub, obs_got, _ = _recorder(mqtt_url, site, 10**6, names.obs_filter(site))
    feed = CameraFeed(CameraConfig(site=site, mqtt_url=mqtt_url, cameras=(1, 2), start=0, stop=20, batch=4,
                                   shed_lag_ms=1000, upload="eager"), {k: model.cameras[k] for k in (1, 2)}, data.test)
    try:
        feed.connect()
        assert poll(lambda: feed.signals.flow, 5)  # the retained flow status reached the camera
        stats = feed.run()
        feed.close()
        assert done.wait(10)
        assert poll(lambda: len(obs_got) >= 2 * stats.frames, 10)
    finally:
        feed.close()
        edge.publish(names.flow_topic(site, "edge-x"), b"", retain=True)
        edge.close()
        close_mqtt(sub)
        close_mqtt(obs_sub)
    # one overloaded flow status: the camera keeps 70% of its frames (credit-spread) and names the rest
    shed = sorted((n.camera, f) for n in (ShedNotice.decode(m.payload) for m in got) for f in n.frame_ids)
    sent = sorted((o.camera, o.frame_id) for o in (CameraObservation.decode(m.payload) for m in obs_got))
    assert stats.shed == {"overload": 20 - stats.frames} and 0 < stats.frames < 20
    assert not set(shed) & set(sent) and sorted(shed + sent) == [(k, f) for k in (1, 2) for f in range(20)]
    assert abs(stats.frames - 14) <= 1


def clock_announcing_feed(model, data, cfg: CameraConfig) -> tuple[CameraFeed, list]:
    """A feed of camera 0 whose client, instead of a broker, hands each site clock it publishes
    straight back as the retained one; (feed, the clocks it published)."""
    from pipeline.wire.control import SiteClock

    feed = CameraFeed(cfg, {0: model.cameras[0]}, data.test)
    published = []

    class Client:
        def publish(self, topic, raw, qos=1, retain=False):
            published.append(SiteClock.decode(raw))
            feed.signals.clock = published[-1]
            feed.signals.clock_seen.set()
            return True

    feed.clients = {0: Client()}
    return feed, published


def test_a_camera_whose_range_follows_the_retained_run_starts_its_own(stream_setup):
    """The retained clock scheduled frames 0..4 and is still running; a camera replaying 4..8
    must not inherit those overdue slots (it would shed its first frames as behind)."""
    from pipeline.wire.control import SiteClock

    _, model, data, _, _ = stream_setup
    feed, published = clock_announcing_feed(model, data, CameraConfig(site="s", cameras=(0,), start=4, stop=8, fps=2.0))
    now = time.time()
    feed.signals.clock = SiteClock("s", now - 1.9, 2.0, 0, 4)  # frame 4's slot would be in 0.1 s, frame 7's later
    feed.signals.clock_seen.set()
    clock = feed.site_clock()
    assert published and clock == published[-1] and (clock.start, clock.stop) == (4, 8)
    assert clock.at(4) > now  # a run of its own, starting ahead
    joining = CameraFeed(CameraConfig(site="s", cameras=(1,), start=0, stop=4, fps=2.0), {1: model.cameras[1]},
                         data.test)
    joining.signals.clock = SiteClock("s", now - 1.0, 2.0, 0, 4)
    joining.signals.clock_seen.set()
    assert joining.site_clock() == joining.signals.clock  # a camera of the running run joins it


def test_a_retained_clock_dated_far_ahead_is_not_joined(stream_setup, caplog):
    """A site clock starting ten days ahead (a camera whose clock was wrong announced it) would hold
    every camera that joins it for ten days, silently: it is named and replaced."""
    from pipeline.wire.control import SiteClock

    _, model, data, _, _ = stream_setup
    feed, published = clock_announcing_feed(model, data, CameraConfig(site="s", cameras=(0,), start=0, stop=8, fps=2.0))
    now = time.time()
    feed.signals.clock = SiteClock("s", now + 10 * 86400, 2.0, 0, 8)
    feed.signals.clock_seen.set()
    with caplog.at_level(logging.WARNING, logger="devices.camera"):
        clock = feed.site_clock()
    assert published and clock == published[-1] and clock.epoch < now + 5
    assert "starts 8.64e+05 s ahead of this camera's clock; not joining it" in caplog.text


def test_a_camera_replaying_frames_the_previous_clock_captured_says_so(stream_setup, caplog):
    """A replay started again on a site (within the edge's --decided-ttl-s) sends frame ids the
    edge decided already; it takes them as late. The camera names the overlap when it announces its
    clock, and says nothing where the ranges do not overlap."""
    from pipeline.wire.control import SiteClock

    _, model, data, _, _ = stream_setup
    now = time.time()
    for start, stop, warned in ((0, 8, "frames 2..5 were captured 100 s ago"), (6, 8, None)):
        feed, published = clock_announcing_feed(model, data, CameraConfig(site="s", cameras=(0,), start=start,
                                                                          stop=stop, fps=2.0))
        feed.signals.clock = SiteClock("s", now - 100, 2.0, 2, 6)  # frames 2..5, from 100 s ago
        feed.signals.clock_seen.set()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="devices.camera"):
            clock = feed.site_clock()
        assert published and clock == published[-1] and clock.start == start
        assert (warned in caplog.text and "--site" in caplog.text) if warned else not caplog.text


def test_a_camera_joining_a_running_clock_leaves_the_frames_due_before_it(stream_setup):
    """Frames due before it joined were another process's to send (a predecessor's) or nobody's:
    it neither sends nor sheds them (naming them could contradict what a predecessor sent, and
    hours of a running clock would make hundreds of thousands of notices)."""
    from pipeline.wire.control import SiteClock

    _, model, data, _, _ = stream_setup
    now = time.time()
    feed = CameraFeed(CameraConfig(site="s", cameras=(0,), start=0, stop=400, fps=2.0, max_lag_ms=200),
                      {0: model.cameras[0]}, data.test)
    assert feed.first_own_frame(SiteClock("s", now - 100, 2.0, 0, 400)) in (200, 201)  # due from now - 0.2 s on
    assert feed.first_own_frame(SiteClock("s", now + 0.5, 2.0, 0, 400)) == 0  # a clock that starts ahead
    assert feed.first_own_frame(SiteClock("s", now - 1000, 2.0, 0, 400)) == 400  # all of the range was due
    assert not feed.stats.shed


def test_a_released_camera_stops_lingering(stream_setup):
    """Lazy upload: after its last frame a camera answers requests until none came for
    --linger-ms; a replay that has every result releases it at once (no request is to come)."""
    _, model, data, _, _ = stream_setup
    feed = CameraFeed(CameraConfig(site="s", cameras=(0,), linger_ms=60_000, feature_ttl_ms=60_000),
                      {0: model.cameras[0]}, data.test)
    assert feed.lazy
    feed.release.set()
    t0 = time.monotonic()
    feed.linger(threading.Event())
    assert time.monotonic() - t0 < 5


def test_cameras_warm_up_before_joining_the_site_clock(stream_setup):
    """A network's first call is slow (it sets up its kernels): made on the site clock, it would
    have the frames due meanwhile shed as behind. The feed makes it first and publishes nothing."""
    _, model, data, _, _ = stream_setup
    feed, published = clock_announcing_feed(model, data, CameraConfig(site="s", cameras=(0,), start=3, stop=8, fps=2.0))
    calls = []
    observe = feed.observe

    def recording_observe(scenes, ids, captured_at):
        calls.append(("observe", ids))
        return observe(scenes, ids, captured_at)

    class Joined(Exception):
        pass

    def site_clock():
        calls.append(("clock", None))
        raise Joined

    feed.observe, feed.site_clock = recording_observe, site_clock
    with pytest.raises(Joined):
        feed.run()
    assert calls == [("observe", [3]), ("clock", None)] and not published and feed.stats.frames == 0


def test_upload_follows_the_network_and_ddnn_cannot_be_lazy():
    assert resolve_upload("auto", True) == "lazy" and resolve_upload("auto", False) == "eager"
    assert resolve_upload("eager", True) == "eager" and resolve_upload("lazy", True) == "lazy"
    with pytest.raises(CameraError, match="^lazy upload needs camera classifiers"):  # no site to name: none named
        resolve_upload("lazy", False)
    with pytest.raises(CameraError, match="^site 's1': lazy upload"):
        resolve_upload("lazy", False, "s1")
    assert str(CameraError("s1", 4, "x", camera=2)) == "site 's1' frame 4 camera 2: x"
    with pytest.raises(ValueError):
        CameraConfig(upload="sometimes")


def test_the_feature_cache_is_bounded_by_count_and_age(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    cache = FeatureCache(max_frames=3, ttl_s=1.0)
    for f in range(5):
        cache.put(0, f, b"x%d" % f)
    assert len(cache) == 3 and cache.get(0, 1) is None and cache.get(0, 4) == b"x4"
    clock[0] += 1.5
    assert cache.get(0, 4) is None  # too old to answer, even before the next put evicts it
    cache.put(0, 9, b"x9")
    assert len(cache) == 1


@pytest.mark.services
def test_a_lazy_camera_sends_summaries_and_answers_feature_requests(stream_setup, brokers, site):
    _, model, data, _, _ = stream_setup
    mqtt_url, _ = brokers
    sub, got, _ = _recorder(mqtt_url, site, 10**6, f"ada/{site}/cam/+/+")
    cfg = CameraConfig(site=site, mqtt_url=mqtt_url, cameras=(0, 3), start=10, stop=15, batch=2, wire_dtype="int2",
                       linger_ms=1500)
    feed = CameraFeed(cfg, {k: model.cameras[k] for k in cfg.cameras}, data.test)
    edge = mqtt_client(mqtt_url, f"{site}-fake-edge")
    assert feed.lazy
    stats = {}
    runner = threading.Thread(target=lambda: stats.update(s=feed.run()))
    try:
        feed.connect()
        runner.start()
        assert poll(lambda: feed.stats.frames == 5, 10)
        for raw in (FeatureRequest(site, 12, (0, 3)).encode(), FeatureRequest(site, 99, (0, 1)).encode(), b"junk",
                    FeatureRequest(site, 13, (1, 2)).encode()):  # frame 99 never captured; 1, 2 are not ours
            edge.publish(names.request_topic(site), raw)
        runner.join(20)
        assert not runner.is_alive()
        assert poll(lambda: sum(m.topic.endswith("/feat") for m in got) >= 2, 5)
    finally:
        feed.close()
        edge.close()
        close_mqtt(sub)
    st = stats["s"]
    summaries = [CameraSummary.decode(m.payload) for m in got if m.topic.endswith("/obs")]
    assert sorted((s.frame_id, s.camera) for s in summaries) == [(f, k) for f in range(10, 15) for k in (0, 3)]
    assert st.published == 10 and st.bytes == sum(len(m.payload) for m in got if m.topic.endswith("/obs"))
    answers = {(a.frame_id, a.camera): a for a in (CameraFeatures.decode(m.payload) for m in got
                                                   if m.topic.endswith("/feat"))}
    assert set(answers) == {(12, 0), (12, 3)}
    scenes = torch.as_tensor(data.test.images[12:13]).float() / 255
    (expect,) = feed.observe(scenes, [12], [1.0])
    for o in expect:  # the features the camera computed for the frame, as the int2 codec sends them
        assert answers[(12, o.camera)].features == o.features == FeatureTensor.quantize(
            evaluation.camera_pass(model, data.test.slice(12, 13), wire_dtype=None).features[0, o.camera], "int2")
    assert (st.requests, st.features_sent, st.request_misses, st.bad_requests) == (3, 2, 1, 1)
    exported = {m.name: m.value for m in feed.metric_samples()}
    assert exported["ada_camera_bad_requests"] == 1 and exported["ada_camera_request_misses"] == 1
