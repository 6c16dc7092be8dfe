import time
from types import SimpleNamespace

from devices.site_signals import MAX_FLOW_SOURCES, MIN_KEEP, SiteSignals
from pipeline.wire import names
from pipeline.wire.control import FlowStatus


def flow(signals: SiteSignals, lag_ms: float, by: str = "e1", at: float | None = None) -> None:
    status = FlowStatus(signals.site, by, lag_ms, 0, time.time() if at is None else at)
    signals.on_message(SimpleNamespace(topic=names.flow_topic(signals.site, by), payload=status.encode()))


def test_the_kept_share_follows_the_edges_lag_and_is_spread_evenly():
    s = SiteSignals("s", shed_lag_ms=1000)
    assert s.split(list(range(10))) == (list(range(10)), [])  # nobody says anything: send all
    flow(s, 5000)
    kept, shed = s.split(list(range(10)))
    assert s.keep == 0.7 and 6 <= len(kept) <= 7 and sorted(kept + shed) == list(range(10))
    assert max(b - a for a, b in zip(kept, kept[1:])) <= 2  # spread, not a burst then a gap
    for _ in range(30):
        time.sleep(0.001)  # each status needs a later timestamp to count as new
        flow(s, 5000)
        s.split([0])
    assert s.keep == MIN_KEEP
    s.split([0])
    assert s.keep == MIN_KEEP  # the same status again changes nothing
    time.sleep(0.001)
    flow(s, 700)  # between half the limit and the limit: hold the share
    s.split([0])
    assert s.keep == MIN_KEEP
    time.sleep(0.001)
    flow(s, 100)
    s.split([0])
    assert s.keep > MIN_KEEP


def test_overloaded_has_hysteresis_and_a_cleared_status_ends_it():
    s = SiteSignals("s", shed_lag_ms=1000)
    flow(s, 1200)
    assert s.overloaded()
    flow(s, 600)
    assert s.overloaded()  # still above half the limit
    flow(s, 400)
    assert not s.overloaded()
    flow(s, 1500)
    s.on_message(SimpleNamespace(topic=names.flow_topic("s", "e1"), payload=b""))  # that aggregator stopped
    assert not s.overloaded() and s.flow == {}


def test_a_bad_control_message_is_ignored():
    s = SiteSignals("s", shed_lag_ms=1000)
    s.on_message(SimpleNamespace(topic=names.clock_topic("s"), payload=b"\x93junk"))
    assert s.clock is None and not s.clock_seen.is_set()


def test_a_flow_status_dated_ahead_is_ignored_and_counted():
    # A retained status dated ten days ahead would stay "fresh" for ten days and keep the cameras
    # shedding, whatever the real aggregators say.
    s = SiteSignals("s", shed_lag_ms=1000)
    flow(s, 5000, by="liar", at=time.time() + 10 * 86400)
    assert s.flow == {} and s.refused == 1 and not s.overloaded()
    flow(s, 5000, by="e1", at=time.time() + 1.0)  # a clock a second off is tolerated
    assert "e1" in s.flow and s.refused == 1


def test_the_flow_table_is_bounded():
    s = SiteSignals("s", shed_lag_ms=1000)
    for i in range(MAX_FLOW_SOURCES):
        flow(s, 10, by=f"e{i}")
    flow(s, 10, by="one-too-many")
    assert len(s.flow) == MAX_FLOW_SOURCES and "one-too-many" not in s.flow and s.refused == 1
    flow(s, 20, by="e0")  # a known aggregator still updates its status
    assert s.flow["e0"].lag_ms == 20
    for by in list(s.flow)[:10]:  # ten went stale: room for a new one
        flow(s, 10, by=by, at=time.time() - 60)
    flow(s, 10, by="newcomer")
    assert "newcomer" in s.flow and len(s.flow) == MAX_FLOW_SOURCES - 9


def test_a_flow_status_of_another_site_or_on_another_aggregators_topic_is_ignored():
    # A retained flow status of another site, or naming another aggregator than its topic does,
    # once made the cameras shed (an 'overload' nobody at this site reported).
    s = SiteSignals("s", shed_lag_ms=1000)
    for site, by, topic_id in (("other", "e1", "e1"), ("s", "e1", "e2")):
        status = FlowStatus(site, by, 99999.0, 0, time.time())
        s.on_message(SimpleNamespace(topic=names.flow_topic("s", topic_id), payload=status.encode()))
    assert s.refused == 2 and not s.overloaded() and s.split(list(range(10))) == (list(range(10)), [])
    flow(s, 99999.0)  # its own site, on its own topic
    assert s.overloaded()
