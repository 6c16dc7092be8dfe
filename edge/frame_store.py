"""The edge's frame store in Redis: frames assembled from observations, claims held as leases,
the hand-off to the cloud and the release of a lease with the frame's result. Every Lua script
of that protocol is here; every key comes from `pipeline.wire.names`.

1. `add` (ADD_OBSERVATION, atomic) stores an observation in the frame's hash
   `ada:{site}:frame:{id}` (TTL); a duplicate delivery (QoS 1) and an observation for a frame
   already claimed are dropped and counted. The first observation puts the frame in the pending
   set with a deadline (Redis clock + deadline). The observation that completes the frame
   claims it in the same script.
2. `claim_expired` claims frames whose deadline has passed with the cameras they have, so a dead
   camera does not stall its frames: DUE_FRAMES reads the due frame ids, then CLAIM_DUE, one call
   per frame with that frame's keys, claims each one still due. A claim sets
   `ada:{site}:decided:{id}` with SET NX, so exactly one aggregator gets each frame.
3. A claim is a lease, so that an aggregator that dies holding frames loses none of them. The
   claim renames the frame hash to `ada:{site}:claimed:{id}` (the observations stay in Redis)
   and adds the frame to the sorted set `ada:{site}:claimed`, scored by Redis TIME + lease. The
   same `claim_expired` sweep takes over every lease that has expired (the owner died or is
   stalled; RECLAIM_LEASE, per frame, checks the expiry again): it renews the lease in its own
   name and hands the observations back, counting `reclaimed` in `ada:{site}:counters`.
4. `escalate` (ESCALATE) adds a frame to `ada:{site}:escalations` once (marker
   `ada:{site}:escalated:{id}` with NX; a frame that already has a result is refused) and
   refuses to add beyond maxlen (the caller waits, its lease extended; nothing is trimmed).
   `record` (RECORD_AND_RELEASE) records a result once and refuses a frame already escalated.
   Either script releases the lease (ZREM + DEL of the claimed hash) in the same step, so a
   slow owner that finishes after its lease was taken over changes nothing: the frame still
   gets exactly one result (its second attempt is counted in `result_conflicts` or
   `escalation_conflicts`).

5. Lazy upload (cameras send a `CameraSummary` first): a frame is also claimed as soon as a
   summary under T1 arrives (`claim_confident`, CLAIM_CONFIDENT, after the rest of the drained
   batch is stored, so its other summaries count too; counted in `exit1_early`). A claimed frame
   that does not leave at exit 1 is handed to the feature wait (`request`, REQUEST_FEATURES): its
   lease is released, the number of cameras asked is written in the claimed hash (`_want`), and
   the frame is scored in `ada:{site}:awaiting` by a second deadline. The aggregator publishes
   the FeatureRequest just before (the round trip off the latency path): an answer stored
   before the request is registered is counted then. Each answer (`add_features`, ADD_FEATURE) is stored in the same
   hash (field `f{camera}`); the answer that completes the set claims the frame again (a lease,
   as above), and the sweep claims the frames past their second deadline with the answers that
   came (CLAIM_AWAITING). The hash then holds summaries and features; a lease taken over returns
   both, and `requested`, so the new owner goes on where the old one stopped.

Every script gets each key it touches in KEYS (none builds a key), and all keys of a site share
the site's hash tag (`pipeline.wire.names`), so the scripts and pipelines run on one Redis or in
the site's slot of a Redis Cluster alike.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple

import redis
from redis.commands.core import Script

from pipeline.transport.redis_client import run_script_batch
from pipeline.transport.results_sink import RECORD_BODY
from pipeline.wire import names
from pipeline.wire.messages import MAX_FRAME_ID, CameraFeatures, CameraObservation, CameraSummary, Decision

log = logging.getLogger(__name__)

LOSSES_MAXLEN = 1_000_000  # named losses kept (approximate trim)
MAX_GAP = 36_000  # ids of one gap in the frame ids named lost at most (an hour of a site at 10 fps)

# Lua: `now` in ms from the Redis server's clock, so every aggregator shares one clock.
REDIS_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Lua: the k-th highest of a list of numbers (1 = the highest), nil when it has fewer than k: the
# admission front (the second most advanced camera's, or the only one's) and the majority's front
# (more than half of the expected cameras) of ADD_OBSERVATION and RECORD_SHED.
KTH_HIGHEST = """
local function kth_highest(values, k)
  local v = {}
  for i = 1, #values do
    v[i] = values[i]
  end
  table.sort(v, function(a, b) return a > b end)
  return v[k]
end
"""

# Lua: the payloads of a frame hash, without its bookkeeping fields (names starting with '_').
PAYLOADS = """
local function payloads(key)
  local all = redis.call('HGETALL', key)
  local out = {}
  for i = 1, #all, 2 do
    if string.byte(all[i], 1) ~= 95 then
      out[#out + 1] = all[i + 1]
    end
  end
  return out
end
"""

# Lua: a requested frame's wait for its features, from the request ('_asked', microseconds by the
# Redis clock) to `t` (REDIS_NOW's TIME), counted in the wait histogram `hist` (`wait_percentiles`
# reads it).
COUNT_WAIT = """
local function count_wait(frame, hist, t)
  local asked = redis.call('HGET', frame, '_asked')
  if not asked then
    return
  end
  local us = math.max(0, tonumber(t[1]) * 1000000 + tonumber(t[2]) - tonumber(asked))
  local bin = math.floor(us / 100)
  if bin >= 1000 then
    bin = math.floor(us / 1000) * 10
  end
  redis.call('HINCRBY', hist, string.format('%d', bin), 1)
end
"""

# KEYS: frame hash, decided marker, pending zset, counters, claimed zset, claimed frame hash, admission front,
#       gaps zset, ahead marks, shed marker
# ARGV: camera field, payload, expected cameras, deadline ms, frame ttl ms, frame id, owner, decided ttl ms,
#       lease ms, admission window (frames; 0 = none), kind ('obs': an observation, 'sum': a summary),
#       gap grace ms (0 = gaps not tracked), most ids of one gap
# A duplicate delivery of a frame neither pending nor claimed (its first run stopped after storing
# it: Redis refused a later command, a key of ours overwritten by hand) mends it, as that run would
# have left it (`frames_mended`).
# Bytes stored are counted in observation_bytes or summary_bytes, and those of a late one in late_bytes;
# a summary after its frame left at exit 1 on a confident summary (claim marker "<owner> exit1") is
# expected, not late: it counts in summary_bytes, camera_bytes_exit1 and summaries_after_exit1.
# Admission: each camera's front (the highest frame id it sent and the edge admitted) is kept in a
# hash; an observation whose id is more than the window beyond the second most advanced camera's
# front, counting its own (the only one's, while a single camera has reported), is refused as
# 'ahead', so that no camera alone can claim, and so decide, frames that the others have not
# captured yet. A refused id does not move its camera's front (else two forged ids, on two
# cameras, would move the window for good); it is kept in the camera's ahead mark (for a frame
# ttl), and an id within the window of the majority's (more than half of the expected cameras,
# each at the higher of its front and its mark) is admitted: all the cameras ahead together is the
# site moving on (an edge back from an outage longer than the window, a broker that dropped its
# queue), which would otherwise be refused for good. A few devices forging ids cannot do that.
# Ids from 2^53 on are refused as ahead: Lua's numbers cannot tell them apart.
# A view its camera named shed (RECORD_SHED: the camera is in the frame's shed marker) is late
# (counted in `late_after_shed` too): it is named lost, so it never also counts in a decision (a
# restarted camera process can shed a frame whose observation its predecessor had queued).
# Gaps: when an observation moves the majority's front (the front that more than half of the
# expected cameras have reached) by more than one, the ids it passed go into the gaps zset (NX),
# due the grace later, when NAME_GAP names those still without an observation lost (a broker that
# dropped a whole stretch of observations, e.g. past its queue limit for an aggregator that was
# down, leaves no other trace). Those a majority has passed only: one or two devices running
# ahead (or forging ids) never make the ids the others are still to send count as gaps. Beyond
# MAX_GAP ids of one jump they are only counted (`ids_jumped`): a jump that long is more likely a
# clock restarted further on, whose ids were never captured.
ADD_OBSERVATION = KTH_HIGHEST + """
local window = tonumber(ARGV[10])
if window > 0 then
  local id = tonumber(ARGV[6])
  if id >= 9007199254740992 then
    redis.call('HINCRBY', KEYS[4], 'ahead', 1)
    return {'ahead'}
  end
  local fronts = redis.call('HGETALL', KEYS[7])
  local mine, others = -1, {}
  for i = 1, #fronts, 2 do
    local v = tonumber(fronts[i + 1])  -- nil for a value no aggregator wrote: ignored (ours is rewritten below)
    if fronts[i] == ARGV[1] then
      mine = v or -1
    elseif v then
      others[#others + 1] = v
    end
  end
  local need = math.floor(tonumber(ARGV[3]) / 2) + 1
  local now_levels = {math.max(mine, id), unpack(others)}
  if id > kth_highest(now_levels, math.min(2, #now_levels)) + window then
    local mark = tonumber(redis.call('HGET', KEYS[9], ARGV[1]))
    if not mark or mark < id then
      redis.call('HSET', KEYS[9], ARGV[1], ARGV[6])
    end
    redis.call('PEXPIRE', KEYS[9], ARGV[5])
    local best = {}
    for i = 1, #fronts, 2 do
      best[fronts[i]] = tonumber(fronts[i + 1])
    end
    local marks = redis.call('HGETALL', KEYS[9])
    for i = 1, #marks, 2 do
      local v = tonumber(marks[i + 1])
      if v and (not best[marks[i]] or v > best[marks[i]]) then
        best[marks[i]] = v
      end
    end
    local levels = {}
    for _, v in pairs(best) do
      levels[#levels + 1] = v
    end
    local majority = kth_highest(levels, need)
    if not majority or id > majority + window then
      redis.call('HINCRBY', KEYS[4], 'ahead', 1)
      return {'ahead'}
    end
    redis.call('HINCRBY', KEYS[4], 'ahead_admitted', 1)
  end
  local grace = tonumber(ARGV[12])
  local before = grace > 0 and kth_highest({mine, unpack(others)}, need) or -1
  local after = grace > 0 and kth_highest(now_levels, need) or -1
  if before >= 0 and after > before + 1 then
    local gt = redis.call('TIME')
    local due = tonumber(gt[1]) * 1000 + math.floor(tonumber(gt[2]) / 1000) + grace
    local top = before
    local last = math.min(after - 1, top + tonumber(ARGV[13]))
    if last < after - 1 then
      redis.call('HINCRBY', KEYS[4], 'ids_jumped', math.min(after - 1 - last, 1000000000000))
    end
    local g = top + 1
    while g <= last do
      local args = {}
      while g <= last and #args < 2000 do
        args[#args + 1] = due
        args[#args + 1] = g
        g = g + 1
      end
      redis.call('ZADD', KEYS[8], 'NX', unpack(args))
    end
  end
  if id > mine then
    redis.call('HSET', KEYS[7], ARGV[1], ARGV[6])
  end
end
local shed = redis.call('SISMEMBER', KEYS[10], ARGV[1]) == 1
local claim = redis.call('GET', KEYS[2])
if shed or claim then
  if shed then
    redis.call('HINCRBY', KEYS[4], 'late_after_shed', 1)
  elseif ARGV[11] == 'sum' and string.sub(claim, -6) == ' exit1' then
    redis.call('HINCRBY', KEYS[4], 'summaries_after_exit1', 1)
    redis.call('HINCRBY', KEYS[4], 'summary_bytes', string.len(ARGV[2]))
    redis.call('HINCRBY', KEYS[4], 'camera_bytes_exit1', string.len(ARGV[2]))
    return {'late'}
  end
  if ARGV[11] == 'sum' then
    redis.call('HINCRBY', KEYS[4], 'late_summaries', 1)
  else
    redis.call('HINCRBY', KEYS[4], 'late', 1)
  end
  redis.call('HINCRBY', KEYS[4], 'late_bytes', string.len(ARGV[2]))
  return {'late'}
end
local fresh = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1
local n = redis.call('HLEN', KEYS[1])
local complete = n >= tonumber(ARGV[3])
if not fresh then
  redis.call('HINCRBY', KEYS[4], 'duplicate_observations', 1)
  -- A duplicate of an unclaimed frame that is complete, or not pending: the script of its first
  -- delivery stopped after storing it (Redis refused a later command: a key of ours overwritten)
  -- and the delivery was retried. Mended here: pending, or claimed, as the first run would have.
  if not complete and redis.call('ZSCORE', KEYS[3], ARGV[6]) then
    return {'duplicate'}
  end
  redis.call('HINCRBY', KEYS[4], 'frames_mended', 1)
elseif ARGV[11] == 'sum' then
  redis.call('HINCRBY', KEYS[4], 'summary_bytes', string.len(ARGV[2]))
else
  redis.call('HINCRBY', KEYS[4], 'observation_bytes', string.len(ARGV[2]))
end
if fresh and n > 1 and not complete then
  return {'added'}
end
""" + REDIS_NOW + """
if not complete then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[6])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {fresh and 'added' or 'duplicate'}
end
redis.call('SET', KEYS[2], ARGV[7], 'PX', ARGV[8])
redis.call('RENAME', KEYS[1], KEYS[6])
redis.call('PEXPIRE', KEYS[6], ARGV[8])
redis.call('ZREM', KEYS[3], ARGV[6])
redis.call('ZADD', KEYS[5], now + tonumber(ARGV[9]), ARGV[6])
return {'claimed', redis.call('HVALS', KEYS[6])}
"""

# KEYS: pending zset, claimed zset, awaiting zset, gaps zset; ARGV: max frames of each
# Returns {frames past their deadline, frames whose lease expired, frames past their second
# deadline, gaps past their grace}, by the Redis clock. The sweep then runs CLAIM_DUE, RECLAIM_LEASE or CLAIM_AWAITING on
# each (one pipelined round trip a kind), each frame's keys in KEYS: a script never builds a key,
# so each runs in the site's slot of a Redis Cluster.
DUE_FRAMES = REDIS_NOW + """
local limit = tonumber(ARGV[1])
return {redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit),
        redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit),
        redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, limit),
        redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, limit)}
"""

# KEYS: gaps zset, frame hash, decided marker, claimed frame hash, result marker, escalated marker, shed
#       marker, losses stream, counters
# ARGV: frame id, claim marker ("<owner> lost"), decided ttl ms, losses maxlen, cameras expected
# A gap past its grace (DUE_FRAMES' fourth list): taken out of the zset (one aggregator goes on);
# if no observation of the frame has come and no camera named it shed (no frame hash, claim or
# marker), it is named lost, one
# entry a camera (where 'edge', why 'never received'), counted in `never_received`, and marked
# decided ("<owner> lost"), so that an observation arriving after all is late, not a second
# outcome. 1 when named, else 0.
NAME_GAP = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
for i = 2, 7 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    return 0
  end
end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
for k = 0, tonumber(ARGV[5]) - 1 do
  redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[4], '*', 'frame', ARGV[1], 'camera', k, 'where', 'edge',
             'why', 'never received')
end
redis.call('HINCRBY', KEYS[9], 'never_received', 1)
return 1
"""

# KEYS: pending zset, frame hash, decided marker, claimed zset, claimed frame hash, counters
# ARGV: frame id, owner, decided ttl ms, lease ms
# {'claimed', observations} when this call claimed the frame (counted in `deadline_claims`: frames
# decided with the cameras that had come by the deadline); {'gone'} when it is no longer due
# (another aggregator's sweep or its last observation claimed it since DUE_FRAMES read it) or
# its observations expired. Only the call whose ZREM takes the frame out of the pending set goes
# on, and the claim itself is a SET NX: one aggregator gets each frame.
CLAIM_DUE = REDIS_NOW + """
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not deadline or tonumber(deadline) > now or redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return {'gone'}
end
if redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[3]) and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[5])
  redis.call('PEXPIRE', KEYS[5], ARGV[3])
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[4]), ARGV[1])
  redis.call('HINCRBY', KEYS[6], 'deadline_claims', 1)
  return {'claimed', redis.call('HVALS', KEYS[5])}
end
return {'gone'}
"""

# KEYS: claimed zset, claimed frame hash, decided marker, result marker, escalated marker, counters
# ARGV: frame id, owner, decided ttl ms, lease ms
# A lease still expired now (by the Redis clock: another aggregator may have renewed or released
# it since DUE_FRAMES read it) is taken over: {'reclaimed', payloads, previous owner, cameras asked
# for features or ''}. A frame that already has a result or an escalation is only released:
# {'gone'}. One whose observations expired with it is {'lost'} (counted in claims_lost).
RECLAIM_LEASE = REDIS_NOW + PAYLOADS + """
local lease = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not lease or tonumber(lease) > now then
  return {'gone'}
end
if redis.call('EXISTS', KEYS[4]) == 1 or redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
  return {'gone'}
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HINCRBY', KEYS[6], 'claims_lost', 1)
  return {'lost'}
end
local prev = redis.call('GET', KEYS[3]) or ''
redis.call('SET', KEYS[3], ARGV[2], 'XX', 'KEEPTTL')
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('HINCRBY', KEYS[6], 'reclaimed', 1)
return {'reclaimed', payloads(KEYS[2]), prev, redis.call('HGET', KEYS[2], '_want') or ''}
"""

# KEYS: frame hash, decided marker, pending zset, claimed zset, claimed frame hash, counters
# ARGV: frame id, claim marker ("<owner> exit1"), decided ttl ms, lease ms
# Lazy upload: a frame one of whose summaries is under T1 is claimed at once with the summaries it
# has ({'claimed', payloads}), its claim marker "<owner> exit1"; {'gone'} when it was claimed already
# (completed, or by a sweep).
CLAIM_CONFIDENT = REDIS_NOW + """
if redis.call('EXISTS', KEYS[1]) == 0 or not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return {'gone'}
end
redis.call('RENAME', KEYS[1], KEYS[5])
redis.call('PEXPIRE', KEYS[5], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[4]), ARGV[1])
redis.call('HINCRBY', KEYS[6], 'exit1_early', 1)
return {'claimed', redis.call('HVALS', KEYS[5])}
"""

# KEYS: claimed zset, claimed frame hash, awaiting zset, counters, result marker, escalated marker
# ARGV: frame id, cameras asked (count), second deadline ms, hash ttl ms, request bytes (as the cameras
#       receive it), then per camera asked its marker field ('_c' .. id) and its features field ('f' .. id)
# Lazy upload: a claimed frame that did not leave at exit 1 waits for its features: the lease is
# released, the cameras asked are counted in `_want` and each marked `_c<id>`, `_cams` saying so (a
# request without `_cams`, from an aggregator before this check, accepts any camera; the answers of those
# already stored in `_got`; if that is all of them, the frame is due at once), and the
# frame is scored in the awaiting set by its second deadline: 'awaiting'. The caller has just
# published the FeatureRequest (an answer stored before this call is counted in `_got` above).
# 'already': someone asked already (a slow owner after a take-over); 'gone': the frame has a result
# or an escalation, or no hash any more: that request went out for nothing, counted in
# `requests_void` (its bytes in request_bytes, as the cameras received it).
REQUEST_FEATURES = REDIS_NOW + """
if redis.call('EXISTS', KEYS[5]) == 1 or redis.call('EXISTS', KEYS[6]) == 1 or redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
  redis.call('HINCRBY', KEYS[4], 'requests_void', 1)
  redis.call('HINCRBY', KEYS[4], 'request_bytes', ARGV[5])
  return 'gone'
end
if redis.call('HSETNX', KEYS[2], '_want', ARGV[2]) == 0 then
  redis.call('HINCRBY', KEYS[4], 'requests_void', 1)
  redis.call('HINCRBY', KEYS[4], 'request_bytes', ARGV[5])
  return 'already'
end
local got = 0
redis.call('HSET', KEYS[2], '_cams', 1)
for i = 6, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], 1)
  got = got + redis.call('HEXISTS', KEYS[2], ARGV[i + 1])
end
redis.call('HSET', KEYS[2], '_got', got)
redis.call('HSET', KEYS[2], '_asked', string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2])))
redis.call('ZREM', KEYS[1], ARGV[1])
if got >= tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[3], now, ARGV[1])
else
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('HINCRBY', KEYS[4], 'requests', 1)
redis.call('HINCRBY', KEYS[4], 'request_bytes', ARGV[5])
return 'awaiting'
"""

# KEYS: claimed frame hash, awaiting zset, claimed zset, counters, result marker, escalated marker, decided marker,
#       wait histogram
# ARGV: field ('f' .. camera), payload, frame id, lease ms, owner, the camera's request marker ('_c' .. camera)
# Lazy upload: a camera's features for a frame. Stored once (HSETNX; counted in feature_bytes);
# {'late'} when the frame was decided, escalated or claimed for good already (late_features,
# late_bytes); {'unasked'} for features of a camera the request did not name (unasked_features,
# late_bytes: never stored, never counted towards the answers); {'duplicate'} for a second
# delivery; the answer that completes the cameras asked claims the frame (a lease):
# {'claimed', payloads}; else {'added'}.
ADD_FEATURE = PAYLOADS + COUNT_WAIT + """
local want = redis.call('HGET', KEYS[1], '_want')
local late = redis.call('EXISTS', KEYS[5]) == 1 or redis.call('EXISTS', KEYS[6]) == 1 or
             redis.call('EXISTS', KEYS[1]) == 0 or (want and not redis.call('ZSCORE', KEYS[2], ARGV[3]))
if late then
  redis.call('HINCRBY', KEYS[4], 'late_features', 1)
  redis.call('HINCRBY', KEYS[4], 'late_bytes', string.len(ARGV[2]))
  return {'late'}
end
if want and redis.call('HEXISTS', KEYS[1], '_cams') == 1 and redis.call('HEXISTS', KEYS[1], ARGV[6]) == 0 then
  redis.call('HINCRBY', KEYS[4], 'unasked_features', 1)
  redis.call('HINCRBY', KEYS[4], 'late_bytes', string.len(ARGV[2]))
  return {'unasked'}
end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  redis.call('HINCRBY', KEYS[4], 'duplicate_features', 1)
  return {'duplicate'}
end
redis.call('HINCRBY', KEYS[4], 'feature_bytes', string.len(ARGV[2]))
if not want then
  return {'added'}
end
local got = redis.call('HINCRBY', KEYS[1], '_got', 1)
if got < tonumber(want) or redis.call('ZREM', KEYS[2], ARGV[3]) == 0 then
  return {'added'}
end
""" + REDIS_NOW + """
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[3])
redis.call('SET', KEYS[7], ARGV[5], 'XX', 'KEEPTTL')
count_wait(KEYS[1], KEYS[8], t)
return {'claimed', payloads(KEYS[1])}
"""

# KEYS: awaiting zset, claimed frame hash, claimed zset, counters, decided marker, wait histogram
# ARGV: frame id, lease ms, owner
# Lazy upload: a frame past its second deadline is claimed with the features that came (a lease):
# {'claimed', payloads}; {'gone'} when it is no longer due (its last answer or another sweep took
# it); {'lost'} when its hash expired (claims_lost).
CLAIM_AWAITING = REDIS_NOW + PAYLOADS + COUNT_WAIT + """
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not deadline or tonumber(deadline) > now or redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return {'gone'}
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HINCRBY', KEYS[4], 'claims_lost', 1)
  return {'lost'}
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
redis.call('SET', KEYS[5], ARGV[3], 'XX', 'KEEPTTL')
count_wait(KEYS[2], KEYS[6], t)
return {'claimed', payloads(KEYS[2])}
"""

# KEYS: escalation stream, escalated marker, result marker, claimed zset, claimed frame hash, counters
# ARGV: maxlen, frame id, payload, owner, marker ttl ms, lease ms
# 1 = added (lease released); 0 = the stream is full: the caller waits, its lease is extended;
# -1 = the frame was already escalated or has a result (a slow owner after a take-over): lease released.
ESCALATE = """
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('ZREM', KEYS[4], ARGV[2])
  redis.call('DEL', KEYS[5])
  return -1
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
""" + REDIS_NOW + """
  redis.call('ZADD', KEYS[4], 'XX', now + tonumber(ARGV[6]), ARGV[2])
  return 0
end
-- the XADD before the marker, as in RECORD_BODY: a stream Redis refuses leaves nothing written
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '*', 'frame', ARGV[2], 'msg', ARGV[3])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.call('HINCRBY', KEYS[6], 'escalated_bytes', string.len(ARGV[3]))
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('DEL', KEYS[5])
return 1
"""

# KEYS: result marker, results stream, claimed zset, claimed frame hash, escalated marker, counters
# ARGV: frame id, payload, owner, marker ttl ms, stream maxlen (as RECORD_BODY)
# The lease is released whether the result is recorded or refused (counted in result_conflicts);
# a frame already escalated to the cloud gets no edge result.
RECORD_AND_RELEASE = """
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('DEL', KEYS[4])
  redis.call('HINCRBY', KEYS[6], 'result_conflicts', 1)
  return 0
end
""" + RECORD_BODY + """
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
if first == 0 then
  redis.call('HINCRBY', KEYS[6], 'result_conflicts', 1)
end
return first
"""

# KEYS: decided marker, losses stream, counters, shed marker, admission front, frame hash
# ARGV: frame id, camera, where, why, losses maxlen, shed marker ttl ms (the decided ttl), admission window (0 = none)
# A camera's notice that it shed its view of a frame is named in the losses stream (counted in
# `shed`) unless the frame was claimed already: its decision names the cameras it had in its
# `present`, and a camera process restarted on a running clock sheds frames an earlier process
# did send, so a loss now could contradict the decision. Likewise when the frame, still assembling,
# holds that camera's observation already. Counted in `shed_after_claim`, not named. (The camera's
# own front is no test: the observations of the same batch, or another aggregator's, move it past
# ids the camera shed before them; a restarted camera does not shed what was due before it joined,
# `devices.camera.CameraFeed.first_own_frame`.) A view named once is not named again (`shed_again`:
# a camera process restarted on a running clock, or a replay run again). A named one adds its
# camera to the frame's shed marker, a set that lives as long as a decided marker: an observation
# of that view arriving afterwards is late (ADD_OBSERVATION), never a second outcome. NAME_GAP
# leaves a frame with a shed marker alone. An id beyond the admission window of the second most
# advanced camera's front (as ADD_OBSERVATION) is refused (-1, counted in `shed_ahead`): no device
# names frames the site has not reached; so is an id from 2^53 on, always (while the site has no
# front yet, the first notices of a camera are not judged otherwise, as its first observations).
RECORD_SHED = KTH_HIGHEST + """
local window = tonumber(ARGV[7])
if window > 0 then
  if tonumber(ARGV[1]) >= 9007199254740992 then
    redis.call('HINCRBY', KEYS[3], 'shed_ahead', 1)
    return -1
  end
  local fronts = {}
  for _, v in ipairs(redis.call('HVALS', KEYS[5])) do
    fronts[#fronts + 1] = tonumber(v)  -- a value no aggregator wrote (nil) is left out
  end
  if #fronts > 0 and tonumber(ARGV[1]) > kth_highest(fronts, math.min(2, #fronts)) + window then
    redis.call('HINCRBY', KEYS[3], 'shed_ahead', 1)
    return -1
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HEXISTS', KEYS[6], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'shed_after_claim', 1)
  return 0
end
if redis.call('SADD', KEYS[4], ARGV[2]) == 0 then
  redis.call('HINCRBY', KEYS[3], 'shed_again', 1)
  return 0
end
redis.call('PEXPIRE', KEYS[4], ARGV[6])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'frame', ARGV[1], 'camera', ARGV[2], 'where', ARGV[3],
           'why', ARGV[4])
redis.call('HINCRBY', KEYS[3], 'shed', 1)
return 1
"""


def wait_percentiles(hist: Mapping[bytes | str, bytes | str | int]) -> dict:
    """p50 / p95 / p99 (ms, each the middle of its bin), mean and count of a feature-wait
    histogram (`names.feature_wait_key`, filled by COUNT_WAIT): how long the frames whose features
    the edge asked for waited for them, from the request to the claim that decides them."""
    bins = sorted((int(k), int(v)) for k, v in hist.items())
    n = sum(v for _, v in bins)
    if not n:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "n": 0}
    mids = [(b + (0.5 if b < 1000 else 5)) / 10 for b, _ in bins]  # bins of 0.1 ms below 100 ms, 1 ms above
    cum = list(itertools.accumulate(v for _, v in bins))
    out = {f"p{q}": round(mids[next(i for i, c in enumerate(cum) if c >= q / 100 * n)], 2) for q in (50, 95, 99)}
    return {**out, "mean": round(sum(m * v for m, (_, v) in zip(mids, bins)) / n, 2), "n": n}


@dataclass(frozen=True)
class StoreTimes:
    """The frame store's clock settings, all in milliseconds except the counts."""

    expected: int  # cameras per frame: the frame is claimed when this many have reported
    admit_window: int  # frames an observation may be ahead of the second most advanced camera (0 = any)
    deadline_ms: int  # after its first observation, a frame is claimed with the cameras it has
    frame_ttl_ms: int  # an unclaimed frame hash expires after this (every aggregator dead)
    decided_ttl_ms: int  # how long a decided frame refuses late observations (markers live as long)
    lease_ms: int  # a claim not released within this is taken over
    claim_batch: int  # frames claimed per scan at most
    escalation_maxlen: int  # escalations waiting for the cloud; beyond, `escalate` answers 0
    results_maxlen: int  # results kept in the results stream (approximate trim)
    gap_grace_ms: int = 0  # frame ids skipped by every camera are named lost this long after a later one came (0 = never; needs admit_window)


class Claim(NamedTuple):
    """A frame this aggregator now holds (or one it found lost): what the sweep and the scripts return."""

    frame_id: int
    payloads: list[bytes]  # the frame's stored messages: observations, summaries, features
    kind: str  # "claimed" | "reclaimed" (lease taken over) | "lost" (its observations expired with its claim) | "never" (a gap named lost: no observation came)
    prev: str = ""  # the previous owner of a reclaimed lease
    requested: bool = False  # lazy upload: its features were asked for; decide it with those that came


def frame_id_of(member: bytes | str) -> int | None:
    """The frame id a member of a frame set (pending, claimed, awaiting, gaps) names: a decimal
    integer from 0 to MAX_FRAME_ID written as `str(int)` writes it (as the scripts write them);
    None for anything else, which no script of ours wrote."""
    text = member.decode("ascii", "replace") if isinstance(member, bytes) else str(member)
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0") or len(text) > 19:
        return None
    fid = int(text)
    return fid if fid <= MAX_FRAME_ID else None


class FrameStore:
    """One aggregator's handle on a site's frames in Redis (`owner` is its service id)."""

    def __init__(self, client: redis.Redis, site: str, owner: str, times: StoreTimes) -> None:
        self.redis, self.site, self.owner, self.times = client, site, owner, times
        self.on_reload: Callable[[], None] | None = None  # called when Redis forgot the scripts (it restarted)
        self._add = client.register_script(ADD_OBSERVATION)
        self._due = client.register_script(DUE_FRAMES)
        self._claim = client.register_script(CLAIM_DUE)
        self._reclaim = client.register_script(RECLAIM_LEASE)
        self._escalate = client.register_script(ESCALATE)
        self._record = client.register_script(RECORD_AND_RELEASE)
        self._confident = client.register_script(CLAIM_CONFIDENT)
        self._request = client.register_script(REQUEST_FEATURES)
        self._feature = client.register_script(ADD_FEATURE)
        self._awaited = client.register_script(CLAIM_AWAITING)
        self._shed = client.register_script(RECORD_SHED)
        self._gap = client.register_script(NAME_GAP)
        self._scripts = (self._add, self._due, self._claim, self._reclaim, self._escalate, self._record,
                         self._confident, self._request, self._feature, self._awaited, self._shed, self._gap)
        for script in self._scripts:
            client.script_load(script.script)  # loaded now, so that a NOSCRIPT later means Redis restarted

    def add(self, items: Iterable[tuple[CameraObservation | CameraSummary, bytes]]) -> list[tuple[str, list[bytes]]]:
        """Store observations or summaries in one pipelined round trip; for each, ("added" | "late" |
        "duplicate" | "ahead", []) or ("claimed", the frame's payloads) when it completed its frame."""
        site, t = self.site, self.times
        replies = self._pipelined(self._add, [
            ([names.frame_key(site, obs.frame_id), names.decided_key(site, obs.frame_id), names.pending_key(site),
              names.counters_key(site), names.claimed_key(site), names.claimed_frame_key(site, obs.frame_id),
              names.front_key(site), names.gaps_key(site), names.ahead_key(site), names.shed_key(site, obs.frame_id)],
             [obs.camera, payload, t.expected, t.deadline_ms, t.frame_ttl_ms, obs.frame_id, self.owner,
              t.decided_ttl_ms, t.lease_ms, t.admit_window, "sum" if isinstance(obs, CameraSummary) else "obs",
              t.gap_grace_ms, MAX_GAP])
            for obs, payload in items])
        out = []
        for res in replies:
            status = res[0].decode()
            out.append((status, list(res[1]) if status == "claimed" else []))
        return out

    def claim_confident(self, frame_ids: list[int]) -> list[Claim]:
        """Lazy upload: claim frames that have a summary under T1, with the summaries they have."""
        site, t = self.site, self.times
        replies = self._pipelined(self._confident, [
            ([names.frame_key(site, fid), names.decided_key(site, fid), names.pending_key(site),
              names.claimed_key(site), names.claimed_frame_key(site, fid), names.counters_key(site)],
             [fid, f"{self.owner} exit1", t.decided_ttl_ms, t.lease_ms]) for fid in frame_ids])
        return [Claim(fid, list(res[1]), "claimed") for fid, res in zip(frame_ids, replies) if res[0] == b"claimed"]

    def request(self, items: Iterable[tuple[int, tuple[int, ...], int]], second_deadline_ms: int) -> list[str]:
        """Lazy upload: hand claimed frames (id, cameras asked, request bytes on the camera links),
        whose requests were just published, to the feature wait, in one round trip; for each
        "awaiting", "already" (someone asked before: a void request) or "gone" (decided or
        escalated meanwhile: a void request)."""
        site, t = self.site, self.times
        return [x.decode() for x in self._pipelined(self._request, [
            ([names.claimed_key(site), names.claimed_frame_key(site, fid), names.awaiting_key(site),
              names.counters_key(site), names.result_key(site, fid), names.escalated_key(site, fid)],
             [fid, len(wanted), second_deadline_ms, t.decided_ttl_ms, nbytes,
              *(field for k in wanted for field in (f"_c{k}", f"f{k}"))])
            for fid, wanted, nbytes in items])]

    def add_features(self, items: Iterable[tuple[CameraFeatures, bytes]]) -> list[Claim | str]:
        """Lazy upload: store camera features in one round trip; for each, "added" | "late" |
        "duplicate" | "unasked" (a camera the request did not name), or the Claim of the frame it
        completed (requested=True)."""
        site, t = self.site, self.times
        items = list(items)
        replies = self._pipelined(self._feature, [
            ([names.claimed_frame_key(site, f.frame_id), names.awaiting_key(site), names.claimed_key(site),
              names.counters_key(site), names.result_key(site, f.frame_id), names.escalated_key(site, f.frame_id),
              names.decided_key(site, f.frame_id), names.feature_wait_key(site)],
             [f"f{f.camera}", payload, f.frame_id, t.lease_ms, self.owner, f"_c{f.camera}"]) for f, payload in items])
        out: list[Claim | str] = []
        for (f, _), res in zip(items, replies):
            status = res[0].decode()
            out.append(Claim(f.frame_id, list(res[1]), "claimed", requested=True) if status == "claimed" else status)
        return out

    def claim_expired(self) -> list[Claim]:
        """Frames past their deadline ("claimed"), leases taken over ("reclaimed"), claims whose
        observations expired ("lost"), frames past their second deadline (claimed with the
        features that came, requested) and gaps this call named lost ("never": no payloads): the
        due frames in one round trip, then one script per frame, pipelined (a round trip per kind)."""
        past_deadline, leases_expired, awaited, gaps = self.due()
        return (self.claim(past_deadline) + self.reclaim(leases_expired) + self.claim_awaited(awaited)
                + [Claim(fid, [], "never") for fid in self.name_gaps(gaps)])

    def due(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """Ids of the frames past their deadline, of those whose lease expired, of those past
        their second deadline and of the gaps past their grace (`claim_batch` at most of each), by
        the Redis clock. Another aggregator may take any of them first."""
        site = self.site
        keys = [names.pending_key(site), names.claimed_key(site), names.awaiting_key(site), names.gaps_key(site)]
        lists = self._pipelined(self._due, [(keys, [self.times.claim_batch])])[0]
        ids, junk = [], []
        for key, members in zip(keys, lists):
            ids.append([])
            for m in members:
                fid = frame_id_of(m)
                if fid is None:
                    junk.append((key, m))
                else:
                    ids[-1].append(fid)
        if junk:  # no frame of ours: an operator's or a forger's; dropped, so it cannot stall every sweep
            with self.redis.pipeline(transaction=False) as p:
                for key, m in junk:
                    p.zrem(key, m)
                p.hincrby(names.counters_key(site), "junk_ids", len(junk))
                p.execute()
            log.error("site %r: %d members of the frame sets that are no frame id (%s) removed", site, len(junk),
                      ", ".join(f"{m[:40]!r} in {key}" for key, m in junk[:4]) + (" ..." if len(junk) > 4 else ""))
        pending, leases, awaited, gaps = ids
        return pending, leases, awaited, gaps

    def name_gaps(self, frame_ids: list[int]) -> list[int]:
        """Name lost (NAME_GAP) those of the due gaps `frame_ids` that no observation reached; their ids."""
        site, t = self.site, self.times
        named = self._pipelined(self._gap, [
            ([names.gaps_key(site), names.frame_key(site, fid), names.decided_key(site, fid),
              names.claimed_frame_key(site, fid), names.result_key(site, fid), names.escalated_key(site, fid),
              names.shed_key(site, fid), names.losses_stream(site), names.counters_key(site)],
             [fid, f"{self.owner} lost", t.decided_ttl_ms, LOSSES_MAXLEN, t.expected]) for fid in frame_ids])
        return [fid for fid, ok in zip(frame_ids, named) if ok]

    def claim(self, frame_ids: list[int]) -> list[Claim]:
        """Claim those of `frame_ids` still past their deadline and unclaimed."""
        site, t = self.site, self.times
        replies = self._pipelined(self._claim, [
            ([names.pending_key(site), names.frame_key(site, fid), names.decided_key(site, fid),
              names.claimed_key(site), names.claimed_frame_key(site, fid), names.counters_key(site)],
             [fid, self.owner, t.decided_ttl_ms, t.lease_ms]) for fid in frame_ids])
        return [Claim(fid, list(res[1]), "claimed") for fid, res in zip(frame_ids, replies) if res[0] == b"claimed"]

    def reclaim(self, frame_ids: list[int]) -> list[Claim]:
        """Take over the leases of `frame_ids` that are still expired ("reclaimed", with the previous
        owner, and requested when the frame's features had been asked for), or "lost" for a claim
        whose observations expired."""
        site, t = self.site, self.times
        replies = self._pipelined(self._reclaim, [
            ([names.claimed_key(site), names.claimed_frame_key(site, fid), names.decided_key(site, fid),
              names.result_key(site, fid), names.escalated_key(site, fid), names.counters_key(site)],
             [fid, self.owner, t.decided_ttl_ms, t.lease_ms]) for fid in frame_ids])
        out = []
        for fid, res in zip(frame_ids, replies):
            kind = res[0].decode()
            if kind == "reclaimed":
                out.append(Claim(fid, list(res[1]), kind, res[2].decode(), requested=bool(res[3])))
            elif kind == "lost":
                out.append(Claim(fid, [], kind))
        return out

    def claim_awaited(self, frame_ids: list[int]) -> list[Claim]:
        """Lazy upload: claim those of `frame_ids` still past their second deadline, with the
        features that came (requested), or "lost" when their hash expired."""
        site, t = self.site, self.times
        replies = self._pipelined(self._awaited, [
            ([names.awaiting_key(site), names.claimed_frame_key(site, fid), names.claimed_key(site),
              names.counters_key(site), names.decided_key(site, fid), names.feature_wait_key(site)],
             [fid, t.lease_ms, self.owner])
            for fid in frame_ids])
        out = []
        for fid, res in zip(frame_ids, replies):
            if res[0] == b"claimed":
                out.append(Claim(fid, list(res[1]), "claimed", requested=True))
            elif res[0] == b"lost":
                out.append(Claim(fid, [], "lost"))
        return out

    def escalate(self, items: Iterable[tuple[int, bytes]]) -> list[int]:
        """Hand frames (id, encoded Escalation) to the cloud in one round trip; for each: 1 added
        (lease released), 0 stream full (lease extended: retry later), -1 already escalated or
        decided (lease released)."""
        site, t = self.site, self.times
        return [int(x) for x in self._pipelined(self._escalate, [
            ([names.escalations_stream(site), names.escalated_key(site, frame_id), names.result_key(site, frame_id),
              names.claimed_key(site), names.claimed_frame_key(site, frame_id), names.counters_key(site)],
             [t.escalation_maxlen, frame_id, payload, self.owner, t.decided_ttl_ms, t.lease_ms])
            for frame_id, payload in items])]

    def record(self, decisions: Iterable[tuple[Decision, bytes]]) -> list[bool]:
        """Record the edge's decisions (with their encoded form) once each and release their
        leases, in one round trip; True where this call recorded the result."""
        site, t = self.site, self.times
        return [bool(x) for x in self._pipelined(self._record, [
            ([names.result_key(site, dec.frame_id), names.results_stream(site), names.claimed_key(site),
              names.claimed_frame_key(site, dec.frame_id), names.escalated_key(site, dec.frame_id),
              names.counters_key(site)],
             [dec.frame_id, raw, dec.by, t.decided_ttl_ms, t.results_maxlen])
            for dec, raw in decisions])]

    def _pipelined(self, script: Script, calls: list[tuple[list[str], list]]) -> list:
        """`run_script_batch` with every script of the store reloaded after a Redis restart (each
        is safe to run twice: markers and HSETNX make the second run a no-op)."""
        return run_script_batch(self.redis, script, calls, self._scripts, self.on_reload)

    def release(self, frame_ids: list[int]) -> None:
        """Drop the claim leases of frames that reached an end other than a result (the dead letters)."""
        with self.redis.pipeline(transaction=True) as p:
            for fid in frame_ids:
                p.zrem(names.claimed_key(self.site), fid)
                p.delete(names.claimed_frame_key(self.site, fid))
            p.execute()

    def record_shed(self, losses: list[tuple[int, int, str, str]]
                    ) -> tuple[list[tuple[int, int, str, str]], list[tuple[int, int, str, str]]]:
        """Name the views cameras shed, (frame id, camera, where, why), in one round trip
        (RECORD_SHED): (those named: frames not claimed yet, those refused: ids beyond the
        admission window); the others count in `shed_after_claim` or `shed_again`."""
        t = self.times
        out = self._pipelined(self._shed, [
            ([names.decided_key(self.site, fid), names.losses_stream(self.site), names.counters_key(self.site),
              names.shed_key(self.site, fid), names.front_key(self.site), names.frame_key(self.site, fid)],
             [fid, camera, where, why, LOSSES_MAXLEN, t.decided_ttl_ms, t.admit_window])
            for fid, camera, where, why in losses])
        return [loss for loss, r in zip(losses, out) if r == 1], [loss for loss, r in zip(losses, out) if r == -1]

    def record_losses(self, losses: list[tuple[int, int, str, str]], counter: str) -> None:
        """Name observations that never came: (frame id, camera, where, why), counted in `counter`."""
        if not losses:
            return
        with self.redis.pipeline(transaction=False) as p:
            for frame_id, camera, where, why in losses:
                p.xadd(names.losses_stream(self.site), {"frame": frame_id, "camera": camera, "where": where,
                                                        "why": why}, maxlen=LOSSES_MAXLEN, approximate=True)
            p.hincrby(names.counters_key(self.site), counter, len(losses))
            p.execute()

    def count(self, counter: str, n: int = 1) -> None:
        self.redis.hincrby(names.counters_key(self.site), counter, n)

    def count_many(self, counts: dict[str, int]) -> None:
        """Add to several counters of the site in one round trip (zeros skipped)."""
        counts = {k: n for k, n in counts.items() if n}
        if not counts:
            return
        with self.redis.pipeline(transaction=False) as p:
            for counter, n in counts.items():
                p.hincrby(names.counters_key(self.site), counter, n)
            p.execute()


__all__ = ["FrameStore", "frame_id_of", "StoreTimes", "Claim", "ADD_OBSERVATION", "DUE_FRAMES", "CLAIM_DUE",
           "RECLAIM_LEASE", "CLAIM_CONFIDENT", "REQUEST_FEATURES", "ADD_FEATURE", "CLAIM_AWAITING", "ESCALATE", "RECORD_AND_RELEASE",
           "RECORD_SHED", "NAME_GAP", "REDIS_NOW"]
