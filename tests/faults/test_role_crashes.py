"""Role processes SIGKILLed mid-stream: an edge aggregator beside a second one (leases and the
shared subscription take over), and the cloud worker with escalations pending (a new worker
reclaims them with XAUTOCLAIM)."""

from __future__ import annotations

import signal
import time

import pytest

from pipeline.wire import names
from tests.faults.harness import wait_until

pytestmark = pytest.mark.services

FPS = 30


def test_edge_sigkill_with_a_second_aggregator(harness):
    h = harness.start_brokers(appendonly=True)
    edge_a = h.edge(name="edge-a", wait=False)
    edge_b = h.edge(name="edge-b", wait=False)
    cloud = h.cloud(wait=False)
    for role, ready in ((edge_a, r"edge \S+: site .* subscribed"), (edge_b, r"edge \S+: site .* subscribed"),
                        (cloud, r"cloud \S+: site .* group")):
        role.wait_log(ready)
    frames = range(300)
    cams = h.cameras(frames.start, frames.stop, FPS)
    h.wait_decided(frames, timeout_s=60, n=60, what="before the fault")
    sid_a = edge_a.service_id()
    held = freeze_holding_claims(h, edge_a, sid_a)  # edge-a stopped while it holds claimed, undecided frames
    by_a = sum(1 for d in h.collector.decisions() if d.by == sid_a)
    print(f"edge-a frozen and SIGKILLed holding the leases of frames {held}", flush=True)
    edge_a.kill()
    t_kill = time.time()
    resume = h.resume_seconds(t_kill, timeout_s=10)
    h.wait_settled(frames, timeout_s=60)
    acc = h.account(frames, "edge-a SIGKILL, edge-b alive")
    reclaimed = acc.counters.get("reclaimed", 0)
    print(f"edge-a decided {by_a} frames before its SIGKILL; frames re-claimed by lease: {reclaimed}; first "
          f"decision of a frame captured after the kill {resume:.2f} s after it")
    acc.assert_clean()
    assert reclaimed >= len(held), "the dead aggregator's leases were not taken over"
    assert not [d.frame_id for d in h.collector.decisions() if d.frame_id in held and d.by == sid_a]
    h.finish([edge_b, cloud], [cams])


def freeze_holding_claims(h, role, sid: str, timeout_s: float = 20.0) -> list[int]:
    """SIGSTOP `role` at a moment it holds the lease of claimed, undecided frames (retrying:
    SIGCONT and look again); the ids of those frames."""
    r = h.admin()
    end = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < end, f"{role.name} never held a claimed frame"
        role.pause()
        ids = [int(f) for f in r.zrange(names.claimed_key(h.site), 0, -1)]
        held = [f for f in ids if r.get(names.decided_key(h.site, f)) == sid.encode()]
        if held:
            return held
        role.resume()
        time.sleep(0.005)  # polling the claims: nothing to wait on


def _pending(r, site) -> int:
    return int(r.xpending(names.escalations_stream(site), names.CLOUD_GROUP)["pending"])


def test_cloud_sigkill_with_pending_escalations_then_restart(harness):
    h = harness.start_brokers(appendonly=True)
    edge = h.edge(wait=False)
    cloud = h.cloud(wait=False, wait_ms=100)  # holds a batch open 100 ms: entries are pending meanwhile
    edge.wait_log(r"edge \S+: site .* subscribed")
    cloud.wait_log(r"cloud \S+: site .* group")
    frames = range(300)
    cams = h.cameras(frames.start, frames.stop, FPS)
    h.wait_decided(frames, timeout_s=60, n=60, what="before the fault")
    r = h.admin()
    # Freeze the worker at a moment it holds delivered, unacknowledged entries; then kill it.
    end = time.monotonic() + 20
    while True:
        assert time.monotonic() < end, "the cloud never held a pending escalation"
        if _pending(r, h.site) > 0:
            cloud.proc.send_signal(signal.SIGSTOP)
            if _pending(r, h.site) > 0:
                break
            cloud.proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)  # polling XPENDING: nothing to wait on
    pending_at_kill = _pending(r, h.site)
    cloud.kill()
    time.sleep(2.0)  # the outage: no cloud worker at all
    cloud2 = h.cloud(name="cloud-restarted", wait=True)
    t_up = time.time()
    wait_until(lambda: _pending(r, h.site) == 0 or None, 20, "the dead worker's pending escalations to be reclaimed",
               abort=h.dead_roles)
    h.wait_settled(frames, timeout_s=60)
    acc = h.account(frames, "cloud SIGKILL + restart")
    reclaimed_log = [line for line in cloud2.text().splitlines() if "reclaimed" in line]
    print(f"escalations pending at the dead worker: {pending_at_kill}; new worker: {reclaimed_log[:3]}; "
          f"restart at t={t_up:.1f}")
    assert reclaimed_log, "the restarted worker did not reclaim the dead worker's pending escalations"
    acc.assert_clean()
    h.finish([edge, cloud2], [cams])



def test_observations_after_an_aggregator_dies_all_reach_the_survivor(harness):
    h = harness.start_brokers(appendonly=True)
    # Lazy upload without early exit 1: every frame waits for all six summaries (and, past exit 1,
    # features), so a frame decided with fewer cameras means messages lost with the dead aggregator.
    edge_a = h.edge(name="edge-a", wait=False, early_exit1=False)
    edge_b = h.edge(name="edge-b", wait=False, early_exit1=False)
    cloud = h.cloud(wait=False)
    for role in (edge_a, edge_b):
        role.wait_log(r"edge \S+: site .* subscribed")
    cloud.wait_log(r"cloud \S+: site .* group")
    frames = range(150)
    cams = h.cameras(frames.start, frames.stop, FPS)
    h.wait_decided(frames, timeout_s=60, n=30, what="before the fault")
    edge_a.kill()
    t_kill = time.time()
    h.wait_settled(frames, timeout_s=60)
    acc = h.account(frames, "edge-a SIGKILL: observations of later frames")
    later = [d for d in h.collector.decisions() if d.captured_at > t_kill + 1.0 and d.frame_id in frames]
    short = [d.frame_id for d in later if len(d.present) < 6]
    print(f"frames captured > 1 s after the kill: {len(later)}, decided with fewer than 6 cameras: {len(short)}, "
          f"mean cameras {sum(len(d.present) for d in later) / max(1, len(later)):.2f}")
    acc.assert_clean()
    assert later, "no frame captured after the kill"
    assert not short, f"{len(short)} of {len(later)} frames after the kill lost cameras: {short[:10]}"
    h.finish([edge_b, cloud], [cams])
