"""Where decisions and rejected messages go: what the edge and the cloud tiers both write.

- `RECORD_RESULT` + `record_and_publish`: a frame's decision is recorded in `ada:{site}:results`
  at most once (a result marker set with NX) and then published on `ada/{site}/results`. The
  edge records through its own script (`edge.frame_store`), built on `RECORD_BODY`, which also
  releases the frame's claim lease in the same step.
- `add_dead_letter`: a message that cannot be processed goes to `ada:{site}:deadletter` with its
  reason (and a bounded prefix of its payload), and the site's `deadletter` counter goes up.
"""

from __future__ import annotations

import logging
from typing import Any

import paho.mqtt.client as mqtt
import redis

from pipeline.wire import names
from pipeline.wire.messages import Decision

log = logging.getLogger(__name__)

DEADLETTER_MAXLEN = 10_000  # dead letters kept (approximate trim: it is a diagnostic log)
DEADLETTER_PAYLOAD_MAX = 4096  # bytes of a rejected payload kept with its reason
PUBLISH_TIMEOUT_S = 30.0  # wait this long for the broker to acknowledge a published message

# Lua: record a result once. KEYS[1] result marker, KEYS[2] results stream; ARGV: frame id,
# payload, owner, marker ttl ms, stream maxlen. Leaves `first` = 1 when this call recorded it.
RECORD_BODY = """
local first = 0
if redis.call('SET', KEYS[1], ARGV[3], 'NX', 'PX', ARGV[4]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'frame', ARGV[1], 'msg', ARGV[2])
  first = 1
end
"""
RECORD_RESULT = RECORD_BODY + "return first\n"


def record_and_publish(client: redis.Redis, record: Any, mq: mqtt.Client | None, dec: Decision, ttl_ms: int,
                       maxlen: int, republish: bool = False,
                       extra_keys: tuple[str, ...] = ()) -> mqtt.MQTTMessageInfo | None:
    """Record `dec` in the results stream unless the frame already has a result, then publish it.

    `record` is `RECORD_RESULT` (or a script built on `RECORD_BODY` that takes `extra_keys` after
    the marker and the stream) registered on `client`. Returns the MQTT publish info (wait on it
    before acknowledging upstream), or None when the frame already had a result (and
    `republish` is False)."""
    raw = dec.encode()
    first = record(keys=[names.result_key(dec.site, dec.frame_id), names.results_stream(dec.site), *extra_keys],
                   args=[dec.frame_id, raw, dec.by, ttl_ms, maxlen])
    if not first:
        log.info("site %r frame %d: already decided; %s", dec.site, dec.frame_id,
                 "publishing again" if republish else "not recorded twice")
        if not republish:
            client.hincrby(names.counters_key(dec.site), "result_conflicts", 1)
            return None
    if mq is None:
        return None
    return mq.publish(names.results_topic(dec.site), raw, qos=1)


def add_dead_letter(client: redis.Redis, site: str, source: str, payload: bytes, reason: str, by: str) -> None:
    """Add a rejected message to `ada:{site}:deadletter` with its reason and count it."""
    client.xadd(names.deadletter_stream(site),
                {"source": source, "reason": reason[:1000], "by": by,
                 "payload": bytes(payload[:DEADLETTER_PAYLOAD_MAX])},
                maxlen=DEADLETTER_MAXLEN, approximate=True)
    client.hincrby(names.counters_key(site), "deadletter", 1)
