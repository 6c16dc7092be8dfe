"""A camera process: replays CIFAR-10 frames as a camera feed, runs its camera module, publishes.

    ada-ddnn camera --cam 0 --checkpoint models/ada.safetensors --fps 10
    ada-ddnn cameras --checkpoint models/ada.safetensors --start 0 --stop 1000   # all six, one process
    ada-ddnn camera --cam 0 --check                                             # 0 if camera 0 is online
    ada-ddnn export --checkpoint models/ada.safetensors --parts parts/   # then, on camera 3's device:
    ada-ddnn camera --cam 3 --checkpoint parts/camera3.safetensors       # only its own weights

Each frame of the split (test by default, or --start/--stop) is a scene; camera k applies its
view (`devices.views.camera_view`), runs `CameraModule` k (the only part of the checkpoint it
reads) and publishes a `CameraObservation` (features int8 by default) on
`ada/{site}/cam/{k}/obs` with QoS 1. The frame id is the frame's
index in the split, so every camera names the same scene alike. Liveness: each camera's MQTT
client keeps a retained status ("online", then "done") with "offline" as its last will.

At --fps 0 (as fast as possible) frames go through the module in batches of --batch; at a set
FPS one frame at a time, each at its capture time. `forward_rows` keeps both bit-identical to
offline evaluation.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import paho.mqtt.client as mqtt
import torch

from devices.camera_net import CameraModule, load_camera
from devices.views import camera_view, normalize
from pipeline.checkpoint import read_config
from pipeline.compute import resolve_device, set_threads
from pipeline.config import default_data_dir
from pipeline.data import SPLITS, Split, load_cifar10, to_float
from pipeline.entropy import normalized_entropy
from pipeline.errors import CameraError, ConnectError, MessageError
from pipeline.layers import forward_rows
from pipeline.settings import DEFAULT_MQTT_URL, add_command, config_from_args, printed
from pipeline.transport.mqtt_client import MqttClient, close_mqtt, mqtt_client
from pipeline.transport.service import serve
from pipeline.wire import names
from pipeline.wire.messages import DTYPES, CameraObservation, CameraStatus, FeatureTensor

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 30.0  # at the end, wait this long for the broker to acknowledge what is still in flight
MAX_BACKLOG = 4096  # at full speed, observations in flight (unacknowledged) before the feed waits for the broker


@dataclass(frozen=True)
class CameraConfig:
    """One camera process (or several cameras in one process)."""

    site: str = "site0"  # site id: prefix of every topic and key
    mqtt_url: str = DEFAULT_MQTT_URL  # Mosquitto, mqtt://host:port
    checkpoint: str = "models/ada.safetensors"  # weights (.safetensors): the full checkpoint or this camera's part
    data: str = field(default_factory=default_data_dir)  # folder holding cifar-10-batches-py/
    split: str = field(default="test", metadata={"choices": SPLITS})  # which CIFAR-10 split the feed replays
    start: int = 0  # first frame (index into the split)
    stop: int = 0  # one past the last frame; 0 = the end of the split
    fps: float = 0.0  # frames per second; 0 = as fast as possible
    wire_dtype: str = field(default="int8", metadata={"choices": tuple(DTYPES)})  # dtype of the features on the wire
    batch: int = 64  # frames per forward pass at fps 0
    device: str = "cpu"  # cpu, cuda or auto, for the camera modules
    threads: int = 0  # torch CPU threads; 0 = torch's default
    labels: bool = True  # attach the ground truth (replays score accuracy with it)
    cameras: tuple[int, ...] = field(default=(0,), metadata={"flags": ["--cameras", "--cams"]})  # camera ids this process runs, comma-separated

    def __post_init__(self) -> None:
        names.check_site(self.site)
        if self.wire_dtype not in DTYPES:
            raise ValueError(f"wire_dtype must be one of {tuple(DTYPES)}, got {self.wire_dtype!r}")
        if self.fps < 0 or self.batch < 1 or self.start < 0 or (self.stop and self.stop <= self.start):
            raise ValueError("need fps >= 0, batch >= 1 and 0 <= start < stop (stop 0 = end)")
        if not self.cameras:
            raise ValueError("no camera to run")
        if any(k < 0 for k in self.cameras):
            raise ValueError(f"camera ids are 0 or more, got {list(self.cameras)}")


@dataclass
class CameraStats:
    frames: int = 0
    published: int = 0
    bytes: int = 0  # encoded observation bytes published
    unacknowledged: int = 0  # observations the broker had not acknowledged when the camera stopped
    refused: int = 0  # observations dropped because too many were waiting for the broker (named in the log)
    first_capture: float | None = None
    seconds: float = 0.0


class CameraFeed:
    """Runs the camera modules of `cfg.cameras` over a split and publishes their observations.

    Every camera has its own MQTT client (its own session, status and last will); the modules
    run in this thread. `gate(frames_published)` is called before each batch: the replay uses it
    to keep a bounded number of frames in flight."""

    def __init__(self, cfg: CameraConfig, modules: dict[int, CameraModule], split: Split,
                 gate: Callable[[int], None] | None = None) -> None:
        if set(modules) != set(cfg.cameras):
            raise CameraError(cfg.site, None, f"modules for cameras {sorted(modules)}, config names {list(cfg.cameras)}")
        self.device = resolve_device(cfg.device)
        self.cfg, self.split, self.gate = cfg, split, gate
        self.modules = {k: m.to(self.device).eval() for k, m in modules.items()}
        self.net = next(iter(modules.values())).cfg  # the network's ModelConfig
        self.stop_at = cfg.stop or len(split)
        if self.stop_at > len(split) or cfg.start >= self.stop_at:
            raise CameraError(cfg.site, None, f"frames {cfg.start}..{self.stop_at} outside the split of {len(split)}")
        self.stats = CameraStats()
        self.clients: dict[int, MqttClient] = {}

    def connect(self) -> None:
        for k in self.cfg.cameras:
            site = self.cfg.site
            offline = CameraStatus(site, k, "offline", 0.0).encode()

            def online(c: mqtt.Client, k: int = k) -> None:
                c.publish(names.status_topic(site, k), CameraStatus(site, k, "online", time.time()).encode(),
                          qos=1, retain=True)

            self.clients[k] = mqtt_client(self.cfg.mqtt_url, f"{site}-cam{k}-{id(self):x}", on_connect=online,
                                          will=(names.status_topic(site, k), offline))

    def close(self, state: str = "done") -> None:
        for k, c in self.clients.items():
            c.publish(names.status_topic(self.cfg.site, k), CameraStatus(self.cfg.site, k, state, time.time()).encode(),
                      qos=1, retain=True)
            if not c.wait_confirmed(PUBLISH_TIMEOUT_S):
                self.stats.unacknowledged += c.unconfirmed
                log.warning("site %r camera %d: %d publishes not acknowledged by the broker after %.0f s",
                            self.cfg.site, k, c.unconfirmed, PUBLISH_TIMEOUT_S)
            c.close(timeout_s=0)
        self.clients.clear()

    @torch.no_grad()
    def observe(self, scenes: torch.Tensor, frame_ids: list[int], captured_at: list[float]) -> list[list[CameraObservation]]:
        """Observations of every camera of this process for a batch of scenes: [frame][camera]."""
        cfg = self.cfg
        out: list[list[CameraObservation]] = [[] for _ in frame_ids]
        labels = self.split.labels
        for k in cfg.cameras:
            views = normalize(camera_view(self.net, k, scenes))
            feats, logits = forward_rows(self.modules[k], views)
            feats = feats.float().cpu()
            if logits is not None:
                ent, pred = normalized_entropy(logits).cpu(), logits.argmax(-1).cpu()
            for i, f in enumerate(frame_ids):
                try:
                    out[i].append(CameraObservation(
                        cfg.site, f, k, captured_at[i],
                        None if logits is None else int(pred[i]), None if logits is None else float(ent[i]),
                        FeatureTensor.quantize(feats[i], cfg.wire_dtype),
                        int(labels[f]) if cfg.labels else None))
                except MessageError as err:
                    raise CameraError(cfg.site, f, f"cannot encode the observation: {err}", camera=k) from err
        return out

    def publish(self, obs: CameraObservation) -> None:
        """Queue one observation (QoS 1). Through a broker outage paho keeps it and sends it on
        reconnect; only when MAX_QUEUED are already waiting is it dropped, named by frame id."""
        raw = obs.encode()
        if not self.clients[obs.camera].publish(names.obs_topic(obs.site, obs.camera), raw, qos=1):
            self.stats.refused += 1
            log.warning("site %r frame %d camera %d: dropped, %d observations already wait for the broker",
                        obs.site, obs.frame_id, obs.camera, self.clients[obs.camera].unconfirmed)
            return
        self.stats.published += 1
        self.stats.bytes += len(raw)

    def backlog(self) -> int:
        """Observations published and not yet acknowledged by the broker, over this process's cameras."""
        return sum(c.unconfirmed for c in self.clients.values())

    def run(self, stop: threading.Event | None = None) -> CameraStats:
        """Replay frames start..stop; returns when all are published and acknowledged (or on `stop`)."""
        stop = stop or threading.Event()
        cfg = self.cfg
        if not self.clients:
            self.connect()
        step = cfg.batch if cfg.fps == 0 else 1
        t_start = time.time()
        log.info("site %r cameras %s: frames %d..%d at %s", cfg.site, list(cfg.cameras), cfg.start, self.stop_at,
                 f"{cfg.fps:g} fps" if cfg.fps else "full speed")
        for begin in range(cfg.start, self.stop_at, step):
            if stop.is_set():
                break
            end = min(self.stop_at, begin + step)
            if self.gate is not None:
                self.gate(begin - cfg.start)
            if cfg.fps > 0 and stop.wait(max(0.0, t_start + (begin - cfg.start) / cfg.fps - time.time())):
                break
            now = time.time()
            if self.stats.first_capture is None:
                self.stats.first_capture = now
            ids = list(range(begin, end))
            scenes = to_float(self.split.images[begin:end], self.device)
            per_frame = self.observe(scenes, ids, [now] * len(ids))
            for frame in per_frame:  # frame by frame, so a frame's cameras arrive together
                for obs in frame:
                    self.publish(obs)
            self.stats.frames += len(ids)
            while self.backlog() > MAX_BACKLOG and not stop.is_set():  # the broker is away or slow: let it catch up
                stop.wait(0.01)
        self.stats.seconds = time.time() - t_start
        log.info("site %r cameras %s: %d frames, %d observations, %.0f bytes/observation, %.1fs", cfg.site,
                 list(cfg.cameras), self.stats.frames, self.stats.published,
                 self.stats.bytes / max(1, self.stats.published), self.stats.seconds)
        return self.stats


def load_feed(cfg: CameraConfig, gate: Callable[[int], None] | None = None) -> CameraFeed:
    """The split and the cameras' parts of the checkpoint the config names, as a ready
    (unconnected) feed. Only the cameras' own tensors are read."""
    net = read_config(cfg.checkpoint)
    for k in cfg.cameras:
        if not 0 <= k < net.num_cameras:
            raise CameraError(cfg.site, None, f"no such camera (the network has {net.num_cameras})", camera=k)
    modules = {k: load_camera(cfg.checkpoint, k) for k in cfg.cameras}
    data = load_cifar10(cfg.data)
    return CameraFeed(cfg, modules, data.split(cfg.split), gate)


# --- CLI ----------------------------------------------------------------------------------

def check_online(cfg: CameraConfig, timeout_s: float = 5.0) -> int:
    """0 when every camera of `cfg` has a retained "online" status, else 1."""
    states: dict[int, str] = {}
    got = threading.Event()

    def on_message(msg: mqtt.MQTTMessage) -> None:
        try:
            st = CameraStatus.decode(msg.payload)
        except MessageError as err:
            log.warning("bad status on %s: %s", msg.topic, err)
            return
        states[st.camera] = st.state
        if all(k in states for k in cfg.cameras):
            got.set()

    try:
        client = mqtt_client(cfg.mqtt_url, f"{cfg.site}-check-{time.monotonic_ns():x}",
                             on_connect=lambda c: c.subscribe(names.status_filter(cfg.site), qos=1),
                             on_message=on_message)
    except ConnectError as err:
        log.error("%s", err)
        return 1
    got.wait(timeout_s)  # retained messages arrive right after the subscription, if any
    close_mqtt(client)
    down = [k for k in cfg.cameras if states.get(k) != "online"]
    for k in cfg.cameras:
        log.info("site %r camera %d: %s", cfg.site, k, states.get(k, "unknown"))
    return 1 if down else 0


def main(args: argparse.Namespace) -> int:
    overrides = {"cameras": (args.cam,)} if getattr(args, "cam", None) is not None else {}
    cfg = config_from_args(CameraConfig, args, **overrides)
    if printed(cfg, args):
        return 0
    if args.check:
        return check_online(cfg)
    set_threads(cfg.threads)
    stats = serve(load_feed(cfg))
    return 0 if stats.unacknowledged == 0 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `camera` (one camera) and `cameras` (several in one process) to the `ada-ddnn` parser."""
    check = "exit 0 if the camera(s) are online (retained status), else 1"
    p = add_command(subparsers, "camera", CameraConfig, main, help="one camera: replay frames, run its module, publish "
                    "observations", description=__doc__, check=check, exclude=("cameras",))
    p.add_argument("--cam", type=int, required=True, help="camera id (0..5)")
    add_command(subparsers, "cameras", CameraConfig, main, help="several cameras in one process (default all six), "
                "each with its own MQTT client", description=__doc__, check=check,
                defaults={"cameras": tuple(range(6))})
