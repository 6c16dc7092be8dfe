"""The frame store's sweep against a real Redis: the due ids are read first and each frame is then
claimed by a script of its own, so another aggregator may act in between; each frame must still
be claimed once, and a lease taken over only while it is expired."""

import time

import pytest

from edge.frame_store import FrameStore, StoreTimes
from pipeline.wire import names
from pipeline.wire.messages import CameraObservation, FeatureTensor

pytestmark = pytest.mark.services


def store(redis_conn, site, owner, lease_ms=10_000):
    return FrameStore(redis_conn, site, owner, StoreTimes(expected=6, admit_window=0, deadline_ms=1, frame_ttl_ms=60_000,
                                                        decided_ttl_ms=60_000, lease_ms=lease_ms, claim_batch=64,
                                                        escalation_maxlen=100, results_maxlen=1000))


def obs(site, frame_id, cam):
    import torch

    o = CameraObservation(site, frame_id, cam, 1.0, 0, 0.5, FeatureTensor.quantize(torch.zeros(12, 8, 8), "int8"), 0)
    return o, o.encode()


def test_a_frame_another_sweep_claimed_in_between_is_not_claimed_again(redis_conn, site):
    a, b = store(redis_conn, site, "a"), store(redis_conn, site, "b")
    a.add([obs(site, f, 0) for f in range(5)])
    time.sleep(0.01)  # past the 1 ms deadline
    due, _ = a.due()
    assert due == list(range(5))
    taken = b.claim_expired()
    assert sorted(f for f, _, kind, _ in taken if kind == "claimed") == due
    assert a.claim(due) == []  # already claimed by b: nothing for a
    assert {redis_conn.get(names.decided_key(site, f)) for f in due} == {b"b"}
    assert a.claim(due) == [] and b.claim(due) == []


def test_a_lease_is_taken_over_once_and_only_while_expired(redis_conn, site):
    a, b, c = (store(redis_conn, site, owner, lease_ms=50) for owner in "abc")
    a.add([obs(site, 7, 0)])
    time.sleep(0.01)
    assert [(f, kind) for f, _, kind, _ in a.claim_expired()] == [(7, "claimed")]
    assert b.due() == ([], [])  # the lease runs
    time.sleep(0.08)
    _, expired = c.due()
    assert expired == [7]
    took = b.claim_expired()
    assert [(f, len(p), kind, prev) for f, p, kind, prev in took] == [(7, 1, "reclaimed", "a")]
    assert c.reclaim(expired) == []  # b renewed the lease since c read it
    assert redis_conn.get(names.decided_key(site, 7)) == b"b"
    assert int(redis_conn.hget(names.counters_key(site), "reclaimed")) == 1
