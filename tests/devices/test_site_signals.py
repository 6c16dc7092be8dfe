import time
from types import SimpleNamespace

from devices.site_signals import MIN_KEEP, SiteSignals
from pipeline.wire import names
from pipeline.wire.control import FlowStatus


def flow(signals: SiteSignals, lag_ms: float, by: str = "e1") -> None:
    status = FlowStatus(signals.site, by, lag_ms, 0, time.time())
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
