"""The frame store's sweep against a real Redis: the due ids are read first and each frame is then
claimed by a script of its own, so another aggregator may act in between; each frame must still
be claimed once, and a lease taken over only while it is expired."""

import dataclasses
import time

import pytest

from edge.frame_store import FrameStore, StoreTimes, wait_percentiles
from pipeline.wire import names
from pipeline.wire.messages import CameraObservation, FeatureTensor
from tests.helpers import poll

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
    due, _, _, _ = a.due()
    assert due == list(range(5))
    taken = b.claim_expired()
    assert sorted(c.frame_id for c in taken if c.kind == "claimed") == due
    assert a.claim(due) == []  # already claimed by b: nothing for a
    assert {redis_conn.get(names.decided_key(site, f)) for f in due} == {b"b"}
    assert a.claim(due) == [] and b.claim(due) == []
    assert int(redis_conn.hget(names.counters_key(site), "deadline_claims")) == 5  # each counted once


def test_a_lease_is_taken_over_once_and_only_while_expired(redis_conn, site):
    a, b, c = (store(redis_conn, site, owner, lease_ms=50) for owner in "abc")
    a.add([obs(site, 7, 0)])
    time.sleep(0.01)
    assert [(c.frame_id, c.kind) for c in a.claim_expired()] == [(7, "claimed")]
    assert b.due() == ([], [], [], [])  # the lease runs
    time.sleep(0.08)
    _, expired, _, _ = c.due()
    assert expired == [7]
    took = b.claim_expired()
    assert [(c.frame_id, len(c.payloads), c.kind, c.prev, c.requested) for c in took] == [(7, 1, "reclaimed", "a", False)]
    assert c.reclaim(expired) == []  # b renewed the lease since c read it
    assert redis_conn.get(names.decided_key(site, 7)) == b"b"
    assert int(redis_conn.hget(names.counters_key(site), "reclaimed")) == 1


def test_frame_ids_no_camera_sent_are_named_lost_after_the_grace(redis_conn, site):
    # A broker past its queue limit for an aggregator that was down drops a stretch of every
    # camera's observations: the ids a later frame skipped are named lost once the grace has
    # passed, unless an observation of theirs came meanwhile; one arriving afterwards is late.
    # Three cameras: the majority's front is the second most advanced camera's.
    times = StoreTimes(expected=3, admit_window=256, deadline_ms=60_000, frame_ttl_ms=60_000, decided_ttl_ms=60_000,
                       lease_ms=10_000, claim_batch=64, escalation_maxlen=100, results_maxlen=1000, gap_grace_ms=30)
    a, b = FrameStore(redis_conn, site, "a", times), FrameStore(redis_conn, site, "b", times)
    a.add([obs(site, 0, 0), obs(site, 0, 1)])
    assert a.add([obs(site, 5, 0)]) == [("added", [])]  # one camera ahead: no gap (it may be alone, or forging)
    assert not redis_conn.exists(names.gaps_key(site))
    assert a.add([obs(site, 3, 1)]) == [("added", [])]  # a second camera passes 1 and 2: the majority skipped them
    assert a.add([obs(site, 4, 2)])[0][0] == "added" and a.add([obs(site, 6, 1)])[0][0] == "added"  # no gap
    assert a.due()[3] == []  # within the grace
    named = poll(lambda: sorted(c.frame_id for c in a.claim_expired() if c.kind == "never"))
    assert named == [1, 2]
    assert b.name_gaps([1, 2, 3]) == []  # each gap is looked at once
    losses = [(int(f[b"frame"]), int(f[b"camera"]), f[b"why"]) for _, f in redis_conn.xrange(names.losses_stream(site))]
    assert losses == [(f, k, b"never received") for f in (1, 2) for k in range(3)]
    assert int(redis_conn.hget(names.counters_key(site), "never_received")) == 2
    assert a.add([obs(site, 2, 3)]) == [("late", [])]  # named lost: an observation now is late, not a second outcome
    assert not redis_conn.exists(names.frame_key(site, 2)) and redis_conn.exists(names.frame_key(site, 3))


def test_a_frame_a_camera_named_shed_is_not_named_again_as_a_gap(redis_conn, site):
    times = StoreTimes(expected=2, admit_window=256, deadline_ms=60_000, frame_ttl_ms=60_000, decided_ttl_ms=60_000,
                       lease_ms=10_000, claim_batch=64, escalation_maxlen=100, results_maxlen=1000, gap_grace_ms=1)
    a = FrameStore(redis_conn, site, "a", times)
    assert a.record_shed([(1, 0, "camera", "overload")]) == ([(1, 0, "camera", "overload")], [])
    a.add([obs(site, 0, 0), obs(site, 0, 1), obs(site, 3, 0), obs(site, 3, 1)])  # both skip 1 and 2
    assert poll(lambda: [c.frame_id for c in a.claim_expired() if c.kind == "never"]) == [2]
    assert [int(f[b"frame"]) for _, f in redis_conn.xrange(names.losses_stream(site))] == [1] + [2] * 2


def test_no_gaps_are_counted_among_ids_lua_cannot_tell_apart(redis_conn, site):
    # From 2^53 on, id + 1 == id in Lua's numbers: counting the ids of a gap there never ended
    # (Redis then answers every client BUSY).
    times = StoreTimes(expected=6, admit_window=256, deadline_ms=60_000, frame_ttl_ms=60_000, decided_ttl_ms=60_000,
                       lease_ms=10_000, claim_batch=64, escalation_maxlen=100, results_maxlen=1000, gap_grace_ms=1)
    a = FrameStore(redis_conn, site, "a", times)
    big = 0x0123456700000051
    a.add([obs(site, 0, 0), obs(site, 0, 1)])
    assert [s for s, _ in a.add([obs(site, big, k) for k in range(6)])] == ["ahead"] * 6  # refused, majority or not
    assert not redis_conn.exists(names.gaps_key(site)) and int(redis_conn.hget(names.counters_key(site), "ahead")) == 6


def test_a_gap_longer_than_max_gap_is_named_up_to_it_and_counted_beyond(redis_conn, site, monkeypatch):
    from edge import frame_store

    monkeypatch.setattr(frame_store, "MAX_GAP", 2500)  # more than one ZADD chunk (1,000 ids)
    times = StoreTimes(expected=2, admit_window=100_000, deadline_ms=60_000, frame_ttl_ms=60_000,
                       decided_ttl_ms=60_000, lease_ms=10_000, claim_batch=64, escalation_maxlen=100,
                       results_maxlen=1000, gap_grace_ms=60_000)
    a = FrameStore(redis_conn, site, "a", times)
    a.add([obs(site, 0, 0), obs(site, 0, 1)])
    a.add([obs(site, 3001, 0), obs(site, 3001, 1)])
    assert redis_conn.zcard(names.gaps_key(site)) == 2500
    gaps = names.gaps_key(site)
    assert redis_conn.zscore(gaps, 1) and redis_conn.zscore(gaps, 2500) and redis_conn.zscore(gaps, 2501) is None
    assert int(redis_conn.hget(names.counters_key(site), "ids_jumped")) == 500


def test_a_shed_notice_for_a_view_the_frame_holds_names_no_loss(redis_conn, site):
    # A camera process restarted while the edge was away sheds frames its predecessor's
    # observations (still queued for the edge) cover: the view that came is not named lost.
    a = store(redis_conn, site, "a")
    a.add([obs(site, 7, 4)])
    assert a.record_shed([(7, 4, "camera", "behind"), (7, 5, "camera", "behind")]) == ([(7, 5, "camera", "behind")], [])
    assert [(int(f[b"frame"]), int(f[b"camera"])) for _, f in redis_conn.xrange(names.losses_stream(site))] == [(7, 5)]


def test_a_shed_notice_is_named_though_the_cameras_front_moved_past_it(redis_conn, site):
    # A camera sheds frames in order and then sends later ones: stored first (one batch, or another
    # aggregator), those move its front past the ids it shed, which are its losses all the same.
    times = StoreTimes(expected=6, admit_window=256, deadline_ms=60_000, frame_ttl_ms=60_000, decided_ttl_ms=60_000,
                       lease_ms=10_000, claim_batch=64, escalation_maxlen=100, results_maxlen=1000)
    a = FrameStore(redis_conn, site, "a", times)
    a.add([obs(site, 40, 2), obs(site, 40, 3)])
    named, _ = a.record_shed([(f, 2, "camera", "behind") for f in (3, 40, 41)])
    assert named == [(3, 2, "camera", "behind"), (41, 2, "camera", "behind")]  # 40: its frame holds the view


def test_a_view_named_shed_is_named_once_and_never_decided(redis_conn, site):
    # A restarted camera process sheds a frame whose observation its predecessor had queued, or a
    # replay run again sends a view it shed before: named once, and the observation is late.
    a = store(redis_conn, site, "a")
    assert a.record_shed([(5, 1, "camera", "behind")]) == ([(5, 1, "camera", "behind")], [])
    assert a.record_shed([(5, 1, "camera", "behind")]) == ([], [])
    assert a.add([obs(site, 5, 1), obs(site, 5, 0)]) == [("late", []), ("added", [])]
    counters = redis_conn.hgetall(names.counters_key(site))
    assert (int(counters[b"shed"]), int(counters[b"shed_again"]), int(counters[b"late_after_shed"])) == (1, 1, 1)
    assert redis_conn.hkeys(names.frame_key(site, 5)) == [b"0"]  # the frame goes on with the other camera
    assert redis_conn.xlen(names.losses_stream(site)) == 1
    assert 0 < redis_conn.pttl(names.shed_key(site, 5)) <= a.times.decided_ttl_ms


def test_without_a_grace_gaps_are_not_tracked(redis_conn, site):
    a = store(redis_conn, site, "a")  # admit_window 0, gap_grace_ms 0
    a.add([obs(site, 0, 0), obs(site, 9, 0)])
    assert not redis_conn.exists(names.gaps_key(site))


def summary(site, frame_id, cam, entropy=0.9):
    from pipeline.wire.messages import CameraSummary

    s = CameraSummary(site, frame_id, cam, 1.0, 0, entropy, 0)
    return s, s.encode()


def features(site, frame_id, cam):
    import torch

    from pipeline.wire.messages import CameraFeatures

    f = CameraFeatures(site, frame_id, cam, FeatureTensor.quantize(torch.zeros(12, 8, 8), "int1"))
    return f, f.encode()


def counters(redis_conn, site):
    return {k.decode(): int(v) for k, v in redis_conn.hgetall(names.counters_key(site)).items()}


def test_a_confident_summary_claims_its_frame_with_the_summaries_it_has(redis_conn, site):
    a = store(redis_conn, site, "a")
    assert [s for s, _ in a.add([summary(site, 9, k) for k in (0, 1)])] == ["added", "added"]
    (claim,) = a.claim_confident([9])
    assert (claim.frame_id, len(claim.payloads), claim.requested) == (9, 2, False)
    assert a.claim_confident([9]) == []  # once
    assert a.add([summary(site, 9, 2)])[0][0] == "late"
    c = counters(redis_conn, site)
    one = len(summary(site, 9, 0)[1])
    assert c["exit1_early"] == 1 and c["summaries_after_exit1"] == 1 and c["summary_bytes"] == 3 * one
    assert c["camera_bytes_exit1"] == one  # counted where it belongs: the exit-1 frame's link bytes
    assert not {"late", "late_summaries", "late_bytes"} & set(c)  # expected after an early exit 1, not late
    assert redis_conn.get(names.decided_key(site, 9)) == b"a exit1"


def test_requested_features_complete_a_frame_once_and_a_lease_keeps_them(redis_conn, site):
    a, b, c = (store(redis_conn, site, owner, lease_ms=50) for owner in "abc")
    *_, (status, stored) = a.add([summary(site, 7, k) for k in range(6)])
    assert status == "claimed" and len(stored) == 6
    assert a.request([(7, tuple(range(6)), 300)], second_deadline_ms=10_000) == ["awaiting"]
    assert b.request([(7, tuple(range(6)), 300)], second_deadline_ms=10_000) == ["already"]  # a slow owner's request: void
    assert redis_conn.zcard(names.claimed_key(site)) == 0  # no lease while the cameras answer
    assert b.add_features([features(site, 7, k) for k in range(5)]) == ["added"] * 5
    assert b.add_features([features(site, 7, 0)]) == ["duplicate"]
    (claim,) = b.add_features([features(site, 7, 5)])  # the last answer claims the frame
    assert (claim.frame_id, len(claim.payloads), claim.requested) == (7, 12, True)
    assert b.add_features([features(site, 7, 5)]) == ["late"]  # claimed for good: answers are late now
    time.sleep(0.08)  # b dies holding it: its lease expires
    (taken,) = c.claim_expired()
    assert (taken.kind, taken.prev, taken.requested, len(taken.payloads)) == ("reclaimed", "b", True, 12)
    cnt = counters(redis_conn, site)
    assert cnt["requests"] == 1 and cnt["requests_void"] == 1 and cnt["duplicate_features"] == 1
    assert cnt["request_bytes"] == 2 * 300  # the void one reached the cameras too
    assert cnt["feature_bytes"] == 6 * len(features(site, 7, 0)[1]) and cnt["late_features"] == 1


def test_a_frame_whose_cameras_do_not_all_answer_is_claimed_at_its_second_deadline(redis_conn, site):
    a, b = store(redis_conn, site, "a"), store(redis_conn, site, "b")
    a.add([summary(site, 8, k) for k in range(6)])
    assert a.request([(8, tuple(range(6)), 300)], second_deadline_ms=30) == ["awaiting"]
    a.add_features([features(site, 8, k) for k in (1, 4)])
    assert b.claim_expired() == []  # not yet due
    time.sleep(0.05)
    claims = b.claim_expired()
    assert [(cl.frame_id, cl.kind, cl.requested, len(cl.payloads)) for cl in claims] == [(8, "claimed", True, 8)]
    assert a.claim_expired() == [] and a.add_features([features(site, 8, 0)]) == ["late"]


def test_each_requested_frame_counts_its_wait_for_features_once(redis_conn, site):
    a = store(redis_conn, site, "a")
    for fid in (20, 21):
        a.add([summary(site, fid, k) for k in range(6)])
    t0 = time.monotonic()
    assert a.request([(20, tuple(range(6)), 300), (21, tuple(range(6)), 300)], second_deadline_ms=40) == ["awaiting", "awaiting"]
    a.add_features([features(site, 20, k) for k in range(6)])  # all answers: claimed at once
    answered_s = time.monotonic() - t0
    a.add_features([features(site, 21, 0)])  # one answer: claimed at its second deadline
    time.sleep(0.06)
    (late,) = a.claim_expired()
    waited_s = time.monotonic() - t0
    assert late.frame_id == 21
    a.add_features([features(site, 20, 0)])  # late: counts nothing
    waits = wait_percentiles(redis_conn.hgetall(names.feature_wait_key(site)))
    assert waits["n"] == 2
    assert waits["p50"] <= 1000 * answered_s + 0.1  # the answered frame: its wait, to a bin
    assert 40 <= waits["p99"] <= 1000 * waited_s + 1  # the other: at least its second deadline


def test_wait_percentiles_read_the_bins_the_store_writes():
    # bins in tenths of a ms: 0.1 ms wide below 100 ms (bin 1000), 1 ms wide above
    hist = {b"12": b"50", b"35": b"45", b"1500": b"5"}  # 1.2 ms x50, 3.5 ms x45, 150 ms x5
    w = wait_percentiles(hist)
    assert (w["p50"], w["p95"], w["p99"], w["n"]) == (1.25, 3.55, 150.5, 100)
    assert w["mean"] == round((1.25 * 50 + 3.55 * 45 + 150.5 * 5) / 100, 2)
    assert wait_percentiles({})["n"] == 0


def test_an_answer_from_a_camera_not_asked_neither_counts_nor_completes_the_frame(redis_conn, site):
    a = store(redis_conn, site, "a")
    a.add([summary(site, 30, k) for k in range(5)])  # camera 5's summary never came: not asked
    a.add([summary(site, 31, k) for k in range(6)])
    a.add_features([features(site, 31, 2)])  # an answer before the request is recorded: counted once asked
    time.sleep(0.01)
    a.claim_expired()  # frame 30 past its 1 ms deadline with five cameras
    assert a.request([(30, (0, 1, 2, 3, 4), 300), (31, (2,), 300)], second_deadline_ms=10_000) == ["awaiting"] * 2
    assert a.add_features([features(site, 30, k) for k in (0, 1, 2, 3)]) == ["added"] * 4
    assert a.add_features([features(site, 30, 5)]) == ["unasked"]  # camera 5 was not asked
    (claim,) = a.add_features([features(site, 30, 4)])  # the last camera asked completes it
    assert claim.frame_id == 30 and len(claim.payloads) == 5 + 5
    (early,) = a.claim_expired()  # frame 31: its one camera had answered already, so it is due at once
    assert (early.frame_id, early.requested, len(early.payloads)) == (31, True, 7)
    cnt = counters(redis_conn, site)
    assert cnt["unasked_features"] == 1 and cnt["late_bytes"] == len(features(site, 30, 5)[1])


def test_junk_in_the_admission_fronts_is_ignored_and_mended(redis_conn, site):
    """A value no aggregator wrote in the fronts or marks hash (by hand, another program) fails no
    script: it is left out of the window, and the camera's own front is written over it."""
    a = store(redis_conn, site, "a")
    a = FrameStore(redis_conn, site, "a", dataclasses.replace(a.times, admit_window=100))
    redis_conn.hset(names.front_key(site), mapping={"0": "abc", "1": "-"})
    redis_conn.hset(names.ahead_key(site), "2", "junk")
    assert [st for st, _ in a.add([summary(site, 5, k) for k in range(3)])] == ["added"] * 3
    assert redis_conn.hget(names.front_key(site), "0") == b"5"
    assert a.record_shed([(2**53, 1, "camera", "behind")]) == ([], [(2**53, 1, "camera", "behind")])


def test_members_of_the_frame_sets_that_are_no_frame_id_are_removed_not_fatal(redis_conn, site):
    # A forged or mistyped member ('1.5', 'abc', '-5', '007') once raised ValueError in every sweep:
    # the aggregator died, and again at each restart.
    a = store(redis_conn, site, "a")
    a.add([obs(site, 3, 0)])
    junk = {names.pending_key(site): ["1.5", "abc", "-5", "007"], names.claimed_key(site): ["xyz"],
            names.awaiting_key(site): ["zz"], names.gaps_key(site): ["9" * 20]}
    for key, members in junk.items():
        redis_conn.zadd(key, {m: 0 for m in members})
    time.sleep(0.01)
    assert a.due() == ([3], [], [], [])
    assert all(redis_conn.zcard(key) == 0 for key in junk if key != names.pending_key(site))
    assert redis_conn.zrange(names.pending_key(site), 0, -1) == [b"3"]
    assert int(redis_conn.hget(names.counters_key(site), "junk_ids")) == 7
    assert [c.frame_id for c in a.claim_expired()] == [3]

