"""What one Redis shard and one cloud worker carry, for the capacity model in docs/SCALING.md.

    python -m pipeline.orchestration.bench_scale --frames 20000 --sites 4 --json reports/bench_scale.json
    python -m pipeline.orchestration.bench_scale --redis-url redis+cluster://127.0.0.1:7000 --sites 4

- Redis: drives the edge's frame-store protocol (`edge.frame_store`, the same scripts and
  pipelined batches as the aggregator) with real-size observations for --sites sites: per frame,
  six observations (the sixth claims the frame), then a result (exit 1 or 2) or, for
  --cloud-share of the frames, an escalation that is then recorded as the cloud's result and
  deleted from the stream. Redis is single-threaded, so what a shard carries is 1 / (Redis CPU
  seconds per frame): the server's own CPU time (INFO cpu, summed over every master of a
  cluster) is measured around the run, apart from the Python client's speed.
- Cloud: one `cloud.worker.Worker` (CPU, --threads torch threads, batch --cloud-batch) with the
  checkpoint's cloud block drains --escalations pre-filled escalations spread over the sites.

Without --redis-url it starts a private redis-server (nothing else runs on it). Prints JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import uuid

import torch

from cloud.cloud_net import load_cloud
from cloud.worker import CloudConfig, Worker
from edge.frame_store import FrameStore, StoreTimes
from pipeline.compute import set_threads
from pipeline.fileio import check_writable
from pipeline.settings import at_least, fraction
from pipeline.transport.embedded import embedded_services
from pipeline.transport.redis_client import is_cluster_url, make_client, redis_client
from pipeline.transport.results_sink import RECORD_RESULT, record_results
from pipeline.wire import names
from pipeline.wire.messages import CameraObservation, Decision, Escalation, FeatureTensor

BATCH = 64  # frames per round trip, as the edge drains (its --batch 256 observations is ~43 frames)


def _masters(client) -> list:
    """Plain clients of the Redis server(s) whose CPU we measure: every master of a cluster."""
    if hasattr(client, "get_primaries"):
        return [client.get_redis_connection(node) for node in client.get_primaries()]
    return [client]


def _cpu(clients) -> float:
    return sum(float(c.info("cpu")["used_cpu_user"]) + float(c.info("cpu")["used_cpu_sys"]) for c in clients)


def _memory(clients) -> int:
    return sum(int(c.info("memory")["used_memory"]) for c in clients)


def bench_redis(client, sites: list[str], frames: int, cloud_share: float) -> dict:
    g = torch.Generator().manual_seed(0)
    times = StoreTimes(expected=6, admit_window=256, deadline_ms=50, frame_ttl_ms=60_000, decided_ttl_ms=600_000,
                       lease_ms=10_000, claim_batch=64, escalation_maxlen=1_000_000, results_maxlen=1_000_000)
    stores = {s: FrameStore(client, s, f"bench-{s}", times) for s in sites}
    record = client.register_script(RECORD_RESULT)
    features = FeatureTensor.quantize(torch.randn(12, 8, 8, generator=g), "int8")
    fused = FeatureTensor.quantize(torch.randn(72, 8, 8, generator=g), "int8")
    every = max(1, round(1 / cloud_share)) if cloud_share > 0 else 0
    masters = _masters(client)
    mem0 = _memory(masters)
    cpu0, t0 = _cpu(masters), time.perf_counter()
    done = 0
    for start in range(0, frames, BATCH):
        ids = range(start, min(frames, start + BATCH))
        for site, store in stores.items():
            obs = [CameraObservation(site, f, k, time.time(), 1, 0.3, features, 0) for f in ids for k in range(6)]
            claimed = [int(o.frame_id) for o, (status, _) in zip(obs, store.add([(o, o.encode()) for o in obs]))
                       if status == "claimed"]
            up = [f for f in claimed if every and f % every == 0]
            decisions = [Decision(site, f, "exit2", 1, 0.2, None, tuple(range(6)), time.time(), time.time(), "bench", 0)
                         for f in claimed if f not in up]
            store.record([(d, d.encode()) for d in decisions])
            store.escalate([(f, Escalation(site, f, tuple(range(6)), time.time(), fused, 0.9, 1, 0).encode())
                            for f in up])
            answers = [Decision(site, f, "cloud", 1, 0.1, None, tuple(range(6)), time.time(), time.time(), "bench", 0)
                       for f in up]
            record_results(client, record, [(d, d.encode()) for d in answers], 600_000, 1_000_000)
            stream = names.escalations_stream(site)
            entries = client.xrange(stream, count=len(up) + 1)
            if entries:
                client.xdel(stream, *[e for e, _ in entries])
            done += len(claimed)
    wall, cpu = time.perf_counter() - t0, _cpu(masters) - cpu0
    decided_mem = _memory(masters) - mem0
    # Frames every camera shed: six shed notices each, named in the losses stream, the frame's shed
    # marker (a set of cameras) kept as long as a decided marker.
    # (Without the admission window: these ids run ahead of every camera's front.)
    shedding = {s: FrameStore(client, s, f"bench-{s}", dataclasses.replace(times, admit_window=0)) for s in sites}
    shed, mem1 = min(frames, 5_000), _memory(masters)
    for start in range(frames, frames + shed, BATCH):
        ids = range(start, min(frames + shed, start + BATCH))
        for store in shedding.values():
            store.record_shed([(f, k, "camera", "overload") for f in ids for k in range(6)])
    shed_mem = _memory(masters) - mem1
    return {"frames": done, "sites": len(sites), "masters": len(masters), "client_frames_per_s": round(done / wall, 1),
            "redis_cpu_s": round(cpu, 3), "redis_cpu_us_per_frame": round(1e6 * cpu / max(1, done), 1),
            "frames_per_redis_cpu_s": round(done / cpu, 1) if cpu > 0 else None,
            # what Redis holds per frame while its markers live (--decided-ttl-s) and its result
            # and losses entries stay in their streams (trimmed at about 1,000,000 entries)
            "memory_bytes_per_decided_frame": round(decided_mem / max(1, done)),
            "memory_bytes_per_shed_frame": round(shed_mem / max(1, shed * len(shedding)))}


def bench_cloud(redis_url: str, sites: list[str], checkpoint: str, n: int, batch: int) -> dict:
    model = load_cloud(checkpoint)
    r = redis_client(redis_url)
    shape = (model.cfg.fused_channels, *model.cfg.wire_shape[1:])
    g = torch.Generator().manual_seed(1)
    feats = [FeatureTensor.quantize(torch.randn(*shape, generator=g), "int8") for _ in range(64)]
    for i, site in enumerate(sites):
        stream = names.escalations_stream(site)
        r.xgroup_create(stream, names.CLOUD_GROUP, id="0", mkstream=True)
        with r.pipeline(transaction=False) as p:
            for f in range(i, n, len(sites)):
                esc = Escalation(site, f, tuple(range(6)), time.time(), feats[f % 64], 0.9, 1, 0)
                p.xadd(stream, {"frame": f, "msg": esc.encode()})
            p.execute()
    with embedded_services(None, redis_url) as (mqtt_url, _):
        worker = Worker(CloudConfig(site=sites[0], sites=",".join(sites), mqtt_url=mqtt_url, redis_url=redis_url,
                                    checkpoint=checkpoint, batch=batch, wait_ms=10, device="cpu"), model)
        t0 = time.perf_counter()
        worker.start()
        while worker.stats.answered < n and time.perf_counter() - t0 < 600:
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        worker.stop()
    return {"escalations": worker.stats.answered, "batch": batch, "threads": torch.get_num_threads(),
            "frames_per_s": round(worker.stats.answered / wall, 1), "batches": worker.stats.batches}


def main(argv: list[str] | None = None, prog: str = "python -m pipeline.orchestration.bench_scale") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis-url", default=None, help="redis:// or redis+cluster://; none = a private redis-server")
    p.add_argument("--sites", type=at_least(1), default=4, help="sites side by side (default %(default)s)")
    p.add_argument("--frames", type=at_least(1), default=20_000, help="frames per site for the Redis part")
    p.add_argument("--cloud-share", type=fraction, default=0.1, help="share of frames escalated (release model: ~0.11)")
    p.add_argument("--escalations", type=at_least(0), default=5_000,
                   help="escalations for the cloud worker part (0 = skip)")
    p.add_argument("--cloud-batch", type=at_least(1), default=64, help="escalations per cloud forward pass")
    p.add_argument("--threads", type=at_least(0), default=1, help="torch threads of the cloud worker")
    p.add_argument("--checkpoint", default="models/ada.safetensors", help="the network of the cloud part")
    p.add_argument("--json", dest="json_out", default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.json_out:
        check_writable(args.json_out)  # before minutes of measuring
    if args.escalations and not os.path.isfile(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint}: no such file")
    set_threads(args.threads)
    tag = uuid.uuid4().hex[:6]
    sites = [f"bench-{tag}-{i}" for i in range(args.sites)]
    out = {"command": f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "torch": torch.__version__}, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    with embedded_services("mqtt://unused:1", args.redis_url) as (_, redis_url):
        client = make_client(redis_url) if is_cluster_url(redis_url) else redis_client(redis_url)
        out["redis_url_cluster"] = is_cluster_url(redis_url)
        out["redis"] = bench_redis(client, sites, args.frames, args.cloud_share)
        if args.escalations:
            out["cloud"] = bench_cloud(redis_url, [f"{s}-cloud" for s in sites], args.checkpoint, args.escalations,
                                       args.cloud_batch)
        for site in sites + [f"{s}-cloud" for s in sites]:
            keys = list(client.scan_iter(match=names.site_pattern(site), count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i:i + 500])
    text = json.dumps(out, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

