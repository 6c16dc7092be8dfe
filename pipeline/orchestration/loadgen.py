"""Load generators for `ada-ddnn bench stream`, each run as a process of its own.

    python -m pipeline.orchestration.loadgen feed --observations OBS.msgpack --site S --mqtt-url U --fps 400 ...
    python -m pipeline.orchestration.loadgen pub --mqtt-url U --topic T --count 20000 --size 960
    python -m pipeline.orchestration.loadgen sub --mqtt-url U --topic T --count 20000

`feed` is a camera process without the camera network: it replays observations encoded
beforehand (so camera compute never limits a measurement) with the real feed's schedule, site
clock, catch-up batching, flow control, shedding and accounting (`devices.camera.CameraFeed`),
stamping each with its frame id and capture time as it sends it. `pub` and `sub` measure the
broker alone: QoS 1 messages of the same size, no model. Each prints one JSON line of results.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import msgpack

from devices.camera import CameraConfig, CameraFeed
from pipeline.settings import add_config_args, config_from_args
from pipeline.transport.mqtt_client import MqttClient
from pipeline.wire import names
from pipeline.wire.messages import CameraObservation, array_header


class PreEncodedFeed(CameraFeed):
    """A camera feed whose observations were encoded beforehand (wire maps of real ones). To
    cost the generator as little as possible, each message is sent in the compact form cameras
    send (`CameraObservation.encode`), assembled from its template's packed fields around the
    two it stamps (frame id and capture time); all cameras share one MQTT connection, and no
    camera status is published."""

    def __init__(self, cfg: CameraConfig, templates: list[dict[int, dict[str, Any]]]) -> None:
        self._init_feed(cfg, cfg.stop or 1 << 62, None)
        self.parts = [{k: self._packed(wire, cfg.site) for k, wire in frame.items()} for frame in templates]

    @staticmethod
    def _packed(wire: dict[str, Any], site: str) -> tuple[bytes, bytes, bytes]:
        """The compact message of an observation's wire map, site `site`, in three pieces: what
        comes before the frame id, between it and the capture time, and after the capture time."""
        obs = CameraObservation._from_map({**wire, "site": site})
        items = obs.packed_items()  # version, tag, then the fields in FIELDS order
        at = {name: 2 + i for i, name in enumerate(obs.FIELDS)}
        fid, cap = at["frame_id"], at["captured_at"]
        assert cap == fid + 2, "the stamped fields are frame_id, camera, captured_at in that order"
        return array_header(len(items)) + b"".join(items[:fid]), items[fid + 1], b"".join(items[cap + 1:])

    def connect(self) -> None:
        shared = MqttClient(self.cfg.mqtt_url, f"{self.cfg.site}-loadgen-{id(self):x}", on_message=self.signals.on_message,
                            on_connect=lambda c: c.subscribe([(names.flow_filter(self.cfg.site), 0),
                                                              (names.clock_topic(self.cfg.site), 1)])).connect()
        self.clients = {k: shared for k in self.cfg.cameras}

    def close(self, state: str = "done") -> None:
        if self.clients:
            shared = next(iter(self.clients.values()))
            if not shared.wait_confirmed(60):
                self.stats.unacknowledged += shared.unconfirmed
            shared.close(timeout_s=0)
        self.clients = {}

    def warm_up(self) -> None:
        """Nothing to warm up: the observations are bytes already."""

    def encode(self, ids: list[int], captured_at: list[float]) -> list[list[tuple[int, bytes]]]:
        out = []
        for frame_id, at in zip(ids, captured_at):
            parts = self.parts[frame_id % len(self.parts)]
            fid, cap = msgpack.packb(frame_id), msgpack.packb(float(at))
            out.append([(k, parts[k][0] + fid + parts[k][1] + cap + parts[k][2]) for k in self.cfg.cameras])
        return out


def write_templates(path: str, frames: list[list[Any]]) -> None:
    """Save observations ([frame][camera] CameraObservation) as wire maps for `feed`."""
    with open(path, "wb") as f:
        f.write(msgpack.packb([{o.camera: o._wire() for o in frame} for frame in frames], use_bin_type=True))


def read_templates(path: str) -> list[dict[int, dict[str, Any]]]:
    with open(path, "rb") as f:
        return msgpack.unpackb(f.read(), raw=False, strict_map_key=False)


def run_feed(args: argparse.Namespace) -> dict:
    cfg = config_from_args(CameraConfig, args)
    feed = PreEncodedFeed(cfg, read_templates(args.observations))
    feed.connect()
    stats = feed.run()
    feed.close()
    return {"frames": stats.frames, "published": stats.published, "shed": stats.shed, "seconds": stats.seconds,
            "achieved_fps": stats.achieved_fps, "unacknowledged": stats.unacknowledged, "refused": stats.refused}


def run_pub(args: argparse.Namespace) -> dict:
    client = MqttClient(args.mqtt_url, f"bench-pub-{time.monotonic_ns():x}").connect()
    payload = bytes(args.size)
    t0 = time.perf_counter()
    for _ in range(args.count):
        while not client.publish(args.topic, payload, qos=1):
            time.sleep(0.001)  # paho's queue is full: let the network thread drain it
    client.wait_confirmed(120)
    seconds = time.perf_counter() - t0
    client.close()
    return {"messages": args.count, "seconds": seconds, "messages_per_s": args.count / seconds}


def run_sub(args: argparse.Namespace) -> dict:
    got, first, done = [0], [0.0], threading.Event()

    def on_message(msg) -> None:
        if got[0] == 0:
            first[0] = time.perf_counter()
        got[0] += 1
        if got[0] >= args.count:
            done.set()

    client = MqttClient(args.mqtt_url, f"bench-sub-{time.monotonic_ns():x}",
                        on_connect=lambda c: c.subscribe(args.topic, qos=1), on_message=on_message).connect()
    print(json.dumps({"ready": True}), flush=True)
    done.wait(args.timeout)
    seconds = time.perf_counter() - first[0] if got[0] else 0.0
    client.close()
    return {"messages": got[0], "seconds": seconds, "messages_per_s": got[0] / seconds if seconds else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.orchestration.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    feed = sub.add_parser("feed", help="replay pre-encoded observations as a camera process would")
    add_config_args(feed, CameraConfig)
    feed.add_argument("--observations", required=True, help="msgpack file written by write_templates")
    for name in ("pub", "sub"):
        p = sub.add_parser(name, help=f"broker ceiling: {name} QoS 1 messages, no model")
        p.add_argument("--mqtt-url", required=True)
        p.add_argument("--topic", required=True)
        p.add_argument("--count", type=int, default=20_000)
        p.add_argument("--size", type=int, default=960, help="payload bytes (pub)")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every message (sub)")
    args = parser.parse_args(argv)
    result = {"feed": run_feed, "pub": run_pub, "sub": run_sub}[args.mode](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
