import threading

import pytest
import torch

from devices.camera import CameraConfig, CameraFeed, check_online, load_feed
from pipeline.errors import CameraError
from pipeline.offline import evaluation
from pipeline.settings import config_from_env
from pipeline.transport.mqtt_client import close_mqtt, mqtt_client
from pipeline.wire import names
from pipeline.wire.messages import CameraObservation, CameraStatus


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
    cfg = CameraConfig(site=site, mqtt_url=mqtt_url, cameras=(0, 3), start=10, stop=15, batch=2)
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
