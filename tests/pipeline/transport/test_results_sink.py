"""Recording results once (`pipeline.transport.results_sink`) against a real Redis."""

import time

import pytest
import redis

from pipeline.transport.results_sink import RECORD_RESULT, record_results
from pipeline.wire import names
from pipeline.wire.messages import Decision

pytestmark = pytest.mark.services


def decision(site: str, frame_id: int) -> tuple[Decision, bytes]:
    d = Decision(site, frame_id, "cloud", 3, 0.2, None, (0, 1, 2, 3, 4, 5), time.time(), time.time(), "w1")
    return d, d.encode()


def test_a_result_is_recorded_once(redis_conn, site):
    record = redis_conn.register_script(RECORD_RESULT)
    assert record_results(redis_conn, record, [decision(site, 1), decision(site, 2)], 60_000, 100) == [True, True]
    assert record_results(redis_conn, record, [decision(site, 1)], 60_000, 100) == [False]
    assert redis_conn.xlen(names.results_stream(site)) == 2
    assert int(redis_conn.hget(names.counters_key(site), "result_conflicts")) == 1


def test_a_results_key_redis_refuses_leaves_no_marker_so_the_retry_records_it(redis_conn, site):
    # The marker was set before the XADD, and Redis keeps a script's writes when a later command
    # fails: the result was never in the stream, and every retry was refused as already decided.
    record = redis_conn.register_script(RECORD_RESULT)
    redis_conn.set(names.results_stream(site), "not a stream")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        record_results(redis_conn, record, [decision(site, 7)], 60_000, 100)
    assert not redis_conn.exists(names.result_key(site, 7))
    redis_conn.delete(names.results_stream(site))  # the operator mends the key
    assert record_results(redis_conn, record, [decision(site, 7)], 60_000, 100) == [True]
    (entry,) = redis_conn.xrange(names.results_stream(site))
    assert Decision.decode(entry[1][b"msg"]).frame_id == 7
