"""Where decisions and rejected messages go: what the edge and the cloud tiers both write.

- `RECORD_RESULT` + `record_results`: a frame's decision is recorded in `ada:{site}:results` at
  most once (a result marker set with NX); the caller then publishes it on `ada/{site}/results`.
  The edge records through its own script (`edge.frame_store`), built on `RECORD_BODY`, which
  also releases the frame's claim lease in the same step.
- `add_dead_letters`: messages that cannot be processed go to `ada:{site}:deadletter`, each with its
  reason (and a bounded prefix of its payload), and the site's `deadletter` counter goes up.
"""

from __future__ import annotations

import logging

import redis
from redis.commands.core import Script

from pipeline.transport.redis_client import run_script_batch
from pipeline.wire import names
from pipeline.wire.messages import Decision

log = logging.getLogger(__name__)

DEADLETTER_MAXLEN = 10_000  # dead letters kept (approximate trim: it is a diagnostic log)
DEADLETTER_PAYLOAD_MAX = 4096  # bytes of a rejected payload kept with its reason
MAX_SOURCE = 300  # characters of a dead letter's source (a topic or a stream entry)

# Lua: record a result once. KEYS[1] result marker, KEYS[2] results stream; ARGV: frame id,
# payload, owner, marker ttl ms, stream maxlen. Leaves `first` = 1 when this call recorded it.
# The XADD goes before the marker: Redis does not undo a script's writes when a later command
# fails (a results key of another type: WRONGTYPE), and a marker without its entry would refuse
# every retry of a result nobody can read. Failing at the XADD writes nothing; the caller retries.
RECORD_BODY = """
local first = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'frame', ARGV[1], 'msg', ARGV[2])
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  first = 1
end
"""
RECORD_RESULT = RECORD_BODY + "return first\n"


def record_results(client: redis.Redis, record: Script, decisions: list[tuple[Decision, bytes]], ttl_ms: int,
                   maxlen: int) -> list[bool]:
    """Record each (decision, its encoded form) in the results stream unless its frame already
    has a result, in one round trip; True where this call recorded it. Refusals are counted in
    the site's `result_conflicts`. `record` is `RECORD_RESULT` registered on `client`."""
    firsts = [bool(x) for x in run_script_batch(client, record, [
        ([names.result_key(dec.site, dec.frame_id), names.results_stream(dec.site)],
         [dec.frame_id, raw, dec.by, ttl_ms, maxlen]) for dec, raw in decisions])]
    conflicts: dict[str, int] = {}
    for (dec, _), first in zip(decisions, firsts):
        if not first:
            log.info("site %r frame %d: already decided; not recorded twice", dec.site, dec.frame_id)
            conflicts[dec.site] = conflicts.get(dec.site, 0) + 1
    for site, n in conflicts.items():
        client.hincrby(names.counters_key(site), "result_conflicts", n)
    return firsts


def add_dead_letters(client: redis.Redis, site: str, letters: list[tuple[str, bytes, str]], by: str) -> None:
    """Add rejected messages, each (source, payload, reason), to `ada:{site}:deadletter` and
    count them, in one round trip."""
    if not letters:
        return
    with client.pipeline(transaction=False) as p:
        for source, payload, reason in letters:
            p.xadd(names.deadletter_stream(site),
                   {"source": source[:MAX_SOURCE], "reason": reason[:1000], "by": by,
                    "payload": bytes(payload[:DEADLETTER_PAYLOAD_MAX])},
                   maxlen=DEADLETTER_MAXLEN, approximate=True)
        p.hincrby(names.counters_key(site), "deadletter", len(letters))
        p.execute()

