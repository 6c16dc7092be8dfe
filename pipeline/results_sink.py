"""Where decisions and rejected messages go: what the edge and the cloud tiers both write.

- `RECORD_RESULT` + `record_and_publish`: a frame's decision is recorded in `ada:{site}:results`
  at most once (a result marker set with NX) and then published on `ada/{site}/results`. The edge
  also passes its claim lease keys, so that recording a result releases the lease atomically.
- `add_dead_letter`: a message that cannot be processed goes to `ada:{site}:deadletter` with its
  reason (and a bounded prefix of its payload), and the site's `deadletter` counter goes up.

Both tiers import this module; neither imports the other.
"""

from __future__ import annotations

import logging
from typing import Any

import paho.mqtt.client as mqtt
import redis

from pipeline import topics
from pipeline.messages import Decision

log = logging.getLogger(__name__)

DEADLETTER_MAXLEN = 10_000  # dead letters kept (approximate trim: it is a diagnostic log)
DEADLETTER_PAYLOAD_MAX = 4096  # bytes of a rejected payload kept with its reason
PUBLISH_TIMEOUT_S = 30.0  # wait this long for the broker to acknowledge a published result

# KEYS: result marker, results stream[, claimed zset, claimed frame hash, escalated marker]
# ARGV: frame id, payload, owner, marker ttl ms, stream maxlen
# With the optional keys (the edge), the claim lease is released in the same step, whether the
# result is recorded or refused, and a frame already escalated to the cloud gets no edge result.
RECORD_RESULT = """
local lease = #KEYS >= 5
if lease and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('DEL', KEYS[4])
  return 0
end
local first = 0
if redis.call('SET', KEYS[1], ARGV[3], 'NX', 'PX', ARGV[4]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'frame', ARGV[1], 'msg', ARGV[2])
  first = 1
end
if lease then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('DEL', KEYS[4])
end
return first
"""


def record_and_publish(client: redis.Redis, record: Any, mq: mqtt.Client | None, dec: Decision, ttl_ms: int,
                       maxlen: int, republish: bool = False,
                       lease_keys: tuple[str, str, str] | None = None) -> mqtt.MQTTMessageInfo | None:
    """Record `dec` in the results stream unless the frame already has a result, then publish it.

    `record` is `RECORD_RESULT` registered on `client`. `lease_keys` (the edge's claimed zset,
    claimed frame hash and escalated marker) release the frame's claim lease in the same script.
    Returns the MQTT publish info (wait on it before acknowledging upstream), or None when the
    frame already had a result (and `republish` is False)."""
    raw = dec.encode()
    first = record(keys=[topics.result_key(dec.site, dec.frame_id), topics.results_stream(dec.site),
                         *(lease_keys or ())],
                   args=[dec.frame_id, raw, dec.by, ttl_ms, maxlen])
    if not first:
        log.info("site %r frame %d: already decided; %s", dec.site, dec.frame_id,
                 "publishing again" if republish else "not recorded twice")
        if not republish:
            client.hincrby(topics.counters_key(dec.site), "result_conflicts", 1)
            return None
    if mq is None:
        return None
    return mq.publish(topics.results_topic(dec.site), raw, qos=1)


def add_dead_letter(client: redis.Redis, site: str, source: str, payload: bytes, reason: str, by: str) -> None:
    """Add a rejected message to `ada:{site}:deadletter` with its reason and count it."""
    client.xadd(topics.deadletter_stream(site),
                {"source": source, "reason": reason[:1000], "by": by,
                 "payload": bytes(payload[:DEADLETTER_PAYLOAD_MAX])},
                maxlen=DEADLETTER_MAXLEN, approximate=True)
    client.hincrby(topics.counters_key(site), "deadletter", 1)
