import msgpack
import pytest

from pipeline.errors import MessageError
from pipeline.wire.control import MAX_SHED_IDS, FlowStatus, ShedNotice, SiteClock
from pipeline.wire.messages import unpack


def test_control_messages_round_trip():
    for m in (SiteClock("s", 1700000000.5, 30.0, 100, 400), FlowStatus("s", "edge-1", 12.5, 3, 1700000000.0),
              ShedNotice("s", 3, (5, 6, 7), "overload", 1700000000.0)):
        assert type(m).decode(m.encode()) == m


def test_site_clock_schedules_frames():
    c = SiteClock("s", 1000.0, 20.0, 100, 200)
    assert c.at(100) == 1000.0 and c.at(120) == 1001.0 and c.at(90) == 999.5
    # frames start..due_by(t) - 1 are due at t; none before the epoch (not even a fraction of a slot ahead)
    assert c.due_by(999.99) == 100 and c.due_by(1000.0) == 101 and c.due_by(1001.0) == 121


@pytest.mark.parametrize("build", [
    lambda: SiteClock("s", 1.0, 0.0, 0, 10),  # no rate
    lambda: SiteClock("s", 1.0, 10.0, 10, 10),  # an empty run
    lambda: SiteClock("s", float("nan"), 10.0, 0, 10),
    lambda: FlowStatus("s", "e", -1.0, 0, 1.0),  # negative lag
    lambda: ShedNotice("s", 1, (), "overload", 1.0),  # names nothing
    lambda: ShedNotice("s", 1, tuple(range(MAX_SHED_IDS + 1)), "overload", 1.0),
    lambda: ShedNotice("s", 1, (1,), "because", 1.0),  # unknown reason
    lambda: ShedNotice("s", 1, (-4,), "behind", 1.0),
    lambda: ShedNotice("s/x", 1, (1,), "behind", 1.0),
])
def test_control_messages_refuse_bad_fields(build):
    with pytest.raises(MessageError):
        build()


def test_shed_notice_decode_refuses_a_tampered_map():
    raw = unpack(ShedNotice("s", 3, (5,), "behind", 1.0).encode())
    raw["frame_ids"] = "5"
    with pytest.raises(MessageError):
        ShedNotice.decode(msgpack.packb(raw))
