"""Lazy upload through a real aggregator, broker and Redis: cameras send summaries, the edge
decides exit 1 from them and asks for the features of every other frame; one camera never
answers, so those frames are decided at the second deadline without it, named, and still
equal offline evaluation with the cameras each decision used."""

import threading

import pytest
import torch

from cloud.worker import CloudConfig, Worker
from edge.aggregator import Aggregator, EdgeConfig
from edge.exits import decide
from pipeline.offline import evaluation
from pipeline.transport.mqtt_client import close_mqtt, mqtt_client
from pipeline.wire import names
from pipeline.wire.messages import EXIT_NAMES, CameraFeatures, CameraObservation, FeatureRequest, summary_of
from tests.edge.test_aggregator import observations
from tests.helpers import wait_results

pytestmark = pytest.mark.services


def test_lazy_upload_with_a_camera_that_never_answers(stream_setup, brokers, site, redis_conn):
    path, model, data, t1, t2 = stream_setup
    n, silent = 40, 5
    obs = {f: [CameraObservation(site, f, o.camera, o.captured_at, o.prediction, o.entropy, o.features, o.label)
               for o in per_cam] for f, per_cam in observations(model, data, list(range(n))).items()}
    requests: list[FeatureRequest] = []
    lock = threading.Lock()

    def answer(msg):  # the site's cameras: every camera but the silent one answers
        req = FeatureRequest.decode(msg.payload)
        with lock:
            requests.append(req)
        for k in req.cameras:
            if k != silent:
                cams.publish(names.features_topic(site, k),
                             CameraFeatures(site, req.frame_id, k, obs[req.frame_id][k].features).encode())

    cams = mqtt_client(brokers[0], f"{site}-cams", on_connect=lambda c: c.subscribe(names.request_topic(site), qos=1),
                       on_message=answer)
    agg = Aggregator(EdgeConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1], checkpoint=path,
                                deadline_ms=2000, request_deadline_ms=1000), model.edge, t1, t2).start()
    cloud = Worker(CloudConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1], device="cpu", wait_ms=2),
                   model.cloud).start()
    try:
        for f in range(n):
            for o in obs[f]:
                cams.publish(names.obs_topic(site, o.camera), summary_of(o).encode())
        got = {d.frame_id: d for d in wait_results(redis_conn, site, n, timeout_s=30)}
    finally:
        agg.stop()
        cloud.stop()
        close_mqtt(cams)
    assert sorted(got) == list(range(n)) and redis_conn.xlen(names.results_stream(site)) == n  # each once
    later = [d for d in got.values() if d.exit != "exit1"]
    assert "exit1" in {d.exit for d in got.values()} and later
    assert all(d.present == (0, 1, 2, 3, 4) for d in later)  # the silent camera is named by its absence
    assert sorted(r.frame_id for r in requests) == sorted(d.frame_id for d in later)  # asked once each, exit 1 never
    counters = {k.decode(): int(v) for k, v in redis_conn.hgetall(names.counters_key(site)).items()}
    assert counters["features_missing"] == len(later) == agg.stats.features_missing
    losses = {(int(f[b"frame"]), int(f[b"camera"]), f[b"why"]) for _, f in redis_conn.xrange(names.losses_stream(site))}
    assert losses == {(d.frame_id, silent, b"no features") for d in later}
    assert agg.stats.edge_runs == len(later)  # the edge block never ran for an exit-1 frame
    # offline evaluation with the cameras each decision used gives the same decisions
    present = torch.zeros(n, 6, dtype=torch.bool)
    for f, d in got.items():
        present[f, list(d.present)] = True
    cams_off = evaluation.camera_pass(model, data.test.head(n), batch_size=n, wire_dtype="int8")
    c = evaluation.fuse_pass(model, cams_off, present, batch_size=n)
    ref = decide(t1, t2, c.edge_entropy, c.edge_pred, c.cloud_pred, c.cam_entropy, c.cam_pred, c.present)
    for f, d in got.items():
        assert d.exit == EXIT_NAMES[int(ref.exit[f])] and d.prediction == int(ref.prediction[f]), f


def test_a_frame_none_of_whose_cameras_answer_names_no_view(stream_setup, brokers, site, redis_conn, caplog):
    """No camera answers the feature requests: each such frame is answered by its cameras' verdicts,
    which its `present` lists; so none of its views is also named lost ('no features'): it counts
    in `blind_frames`, and the log says so (it once said nothing)."""
    path, model, data, t1, t2 = stream_setup
    n = 20
    obs = observations(model, data, list(range(n)))
    cams = mqtt_client(brokers[0], f"{site}-cams")
    agg = Aggregator(EdgeConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1], checkpoint=path,
                                deadline_ms=2000, request_deadline_ms=300), model.edge, t1, t2).start()
    try:
        for f in range(n):
            for o in obs[f]:
                o = CameraObservation(site, f, o.camera, o.captured_at, o.prediction, o.entropy, o.features, o.label)
                cams.publish(names.obs_topic(site, o.camera), summary_of(o).encode())
        got = {d.frame_id: d for d in wait_results(redis_conn, site, n, timeout_s=30)}
    finally:
        agg.stop()
        close_mqtt(cams)
    blind = [d for d in got.values() if d.present == (0, 1, 2, 3, 4, 5) and d.exit == "exit1"]
    counters = {k.decode(): int(v) for k, v in redis_conn.hgetall(names.counters_key(site)).items()}
    assert sorted(got) == list(range(n)) and counters["requests"] > 0
    assert counters["blind_frames"] == counters["requests"] <= len(blind)
    assert redis_conn.xlen(names.losses_stream(site)) == 0 and "features_missing" not in counters
    assert "answered from the cameras' summaries alone" in caplog.text
