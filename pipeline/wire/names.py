"""Every MQTT topic, Redis key and Redis stream name, built in one place with the site as prefix.

    MQTT                                          Redis
    ada/{site}/cam/{cam}/obs      QoS 1           ada:{site}:frame:{id}        hash, TTL
    ada/{site}/cam/{cam}/status   retained, LWT   ada:{site}:escalations       stream (edge -> cloud)
    ada/{site}/results            QoS 1           ada:{site}:results           stream (every decision)
    ada/{site}/clock              retained        ada:{site}:losses            stream (frames cameras shed)
    ada/{site}/edge/flow/{id}     retained        ada:{site}:front             hash (admission front per camera)
    ada/{site}/cam/{cam}/shed     QoS 1           ada:{site}:awaiting          frames waiting for features (lazy)
    ada/{site}/cam/{cam}/feat     QoS 1 (lazy)
    ada/{site}/edge/request       QoS 1 (lazy)    ada:{site}:deadletter        stream (rejected messages)
                                                  ada:{site}:decided:{id}      claim marker, TTL
                                                  ada:{site}:claimed           claimed frames by lease expiry
                                                  ada:{site}:claimed:{id}      a claimed frame's hash, TTL
                                                  ada:{site}:escalated:{id}    escalation marker, TTL
                                                  ada:{site}:result:{id}       result marker, TTL
                                                  ada:{site}:shed:{id}         a camera shed it, TTL
                                                  ada:{site}:pending           open frames by deadline
                                                  ada:{site}:gaps              frames no observation reached
                                                  ada:{site}:ahead             ids refused as ahead, TTL
                                                  ada:{site}:counters          hash of counters
                                                  ada:{site}:feature_wait      hash: feature waits (lazy)
                                                  ada:{site}:heartbeat:{role}:{id}  liveness, TTL
                                                  ada:{site}:edge_sessions     hash: persistent MQTT sessions of aggregators
                                                  ada:{site}:reap:{id}         lock: taking over a dead one's session
                                                  ada:sites                    set: sites edges announced

In a Redis key the braces are there literally: site `s0`'s frame 7 is `ada:{s0}:frame:7`. The
site is the key's hash tag, so every key of a site lives in one slot of a Redis Cluster and a
script or pipeline over one site's keys never crosses slots. (Keys before this layout were
`ada:s0:frame:7`; nothing reads them any more: see docs/STREAMING.md.)

A site id is letters, digits, '-' and '_' only, so it can never add a topic level, an MQTT
wildcard, a Redis key separator or a brace.
"""

from __future__ import annotations

import hashlib
import re

SITE_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")  # \Z, not $: "site\n" is no site id
SERVICE_RE = re.compile(r"\A[A-Za-z0-9_.-]{1,128}\Z")
SHARE_GROUP = "edge"  # MQTT v5 shared-subscription group of the aggregators
CLOUD_GROUP = "cloud"  # Redis consumer group of the cloud workers


def _level(value: object, what: str) -> str:
    """One topic level (and key part): letters, digits, - and _ (no /, +, # nor :)."""
    if not isinstance(value, str) or not SITE_RE.match(value):
        raise ValueError(f"{what} must match {SITE_RE.pattern}, got {value!r}")
    return value


def check_group(group: object) -> str:
    """A Redis consumer group name (the cloud workers'), spelled like a site id."""
    return _level(group, "consumer group")


def check_site(site: object) -> str:
    return _level(site, "site id")


def check_service_id(service_id: object, what: str = "service id") -> str:
    """A service id (the edge's or the cloud's `--service-id`): letters, digits, '.', '-' and '_'."""
    if not isinstance(service_id, str) or not SERVICE_RE.match(service_id):
        raise ValueError(f"{what} must match {SERVICE_RE.pattern} (up to 128 letters, digits, '.', '-' or '_'), "
                         f"got {service_id!r}")
    return service_id


def check_share_group(group: object) -> str:
    """A shared-subscription group is one topic level, spelled like a site id."""
    return _level(group, "share group")


def _cam(cam: int) -> int:
    if isinstance(cam, bool) or not isinstance(cam, int) or cam < 0:
        raise ValueError(f"camera id must be a non-negative int, got {cam!r}")
    return cam


# --- MQTT ---------------------------------------------------------------------------------

def obs_topic(site: str, cam: int) -> str:
    return f"ada/{check_site(site)}/cam/{_cam(cam)}/obs"


def obs_filter(site: str) -> str:
    """All cameras' observations of a site."""
    return f"ada/{check_site(site)}/cam/+/obs"


def shared_obs_filter(site: str, group: str = SHARE_GROUP) -> str:
    """MQTT v5 shared subscription: the broker hands each observation to one member of `group`."""
    return f"$share/{check_share_group(group)}/{obs_filter(site)}"


def status_topic(site: str, cam: int) -> str:
    return f"ada/{check_site(site)}/cam/{_cam(cam)}/status"


def status_filter(site: str) -> str:
    return f"ada/{check_site(site)}/cam/+/status"


def results_topic(site: str) -> str:
    return f"ada/{check_site(site)}/results"


def clock_topic(site: str) -> str:
    """Retained SiteClock: the capture schedule the site's cameras share."""
    return f"ada/{check_site(site)}/clock"


def flow_id(service_id: str) -> str:
    """The name an aggregator's flow status goes by (its topic, its `by`): a digest of its service
    id, which stays secret (it is its MQTT client id: whoever can read the topic could otherwise take
    over its session). `ada-ddnn status` matches it to the service ids of the heartbeats."""
    return hashlib.sha256(service_id.encode()).hexdigest()[:16]


def flow_topic(site: str, service_id: str) -> str:
    """Retained FlowStatus of one aggregator."""
    return f"ada/{check_site(site)}/edge/flow/{check_service_id(service_id)}"


def site_filter(site: str) -> str:
    """Every topic of a site (a replay on a shared broker empties its retained ones at the end)."""
    return f"ada/{check_site(site)}/#"


def flow_filter(site: str) -> str:
    return f"ada/{check_site(site)}/edge/flow/+"


def shed_topic(site: str, cam: int) -> str:
    """ShedNotice: frames camera `cam` captured and did not send."""
    return f"ada/{check_site(site)}/cam/{_cam(cam)}/shed"


def shared_shed_filter(site: str, group: str = SHARE_GROUP) -> str:
    return f"$share/{check_share_group(group)}/ada/{check_site(site)}/cam/+/shed"


def features_topic(site: str, cam: int) -> str:
    """Lazy upload: CameraFeatures, camera `cam`'s answer to a FeatureRequest."""
    return f"ada/{check_site(site)}/cam/{_cam(cam)}/feat"


def shared_features_filter(site: str, group: str = SHARE_GROUP) -> str:
    """Every camera's feature answers, shared among the aggregators like the observations."""
    return f"$share/{check_share_group(group)}/ada/{check_site(site)}/cam/+/feat"


def request_topic(site: str) -> str:
    """Lazy upload: FeatureRequests of the site's aggregators; every camera of the site listens."""
    return f"ada/{check_site(site)}/edge/request"


# --- Redis --------------------------------------------------------------------------------
# Every key of a site starts with `_site_prefix(site)`, `ada:{site}:`, the site as hash tag.
# Scripts get each key they touch from these functions, in KEYS: no script builds a key.

FRAME, DECIDED, CLAIMED, ESCALATED, RESULT, SHED = "frame", "decided", "claimed", "escalated", "result", "shed"
FRAME_KINDS = (FRAME, DECIDED, CLAIMED, ESCALATED, RESULT, SHED)
SITES_KEY = "ada:sites"


def _site_prefix(site: str) -> str:
    return "ada:{" + check_site(site) + "}:"


def per_frame_key(site: str, kind: str, frame_id: int) -> str:
    """`ada:{site}:{kind}:{id}`, one of a frame's keys (`kind` one of FRAME_KINDS)."""
    if kind not in FRAME_KINDS:
        raise ValueError(f"per-frame key kind must be one of {FRAME_KINDS}, got {kind!r}")
    return f"{_site_prefix(site)}{kind}:{int(frame_id)}"


def frame_key(site: str, frame_id: int) -> str:
    """A frame's observations (hash, camera -> payload) while it assembles; TTL."""
    return per_frame_key(site, FRAME, frame_id)


def decided_key(site: str, frame_id: int) -> str:
    """Claim marker (owner id; "<owner> exit1" when claimed at a summary under T1, lazy upload) set
    when a frame is claimed: later observations are late."""
    return per_frame_key(site, DECIDED, frame_id)


def claimed_key(site: str) -> str:
    """Sorted set of claimed, not yet decided frames scored by their lease expiry (ms since the epoch)."""
    return f"{_site_prefix(site)}claimed"


def claimed_frame_key(site: str, frame_id: int) -> str:
    """A claimed frame's observations (its frame hash, renamed on claim) until it is decided."""
    return per_frame_key(site, CLAIMED, frame_id)


def escalated_key(site: str, frame_id: int) -> str:
    """Marker set by whoever escalates the frame first; a second escalation is refused."""
    return per_frame_key(site, ESCALATED, frame_id)


def result_key(site: str, frame_id: int) -> str:
    """Marker set by whoever records the frame's result first; a second result is refused."""
    return per_frame_key(site, RESULT, frame_id)


def shed_key(site: str, frame_id: int) -> str:
    """The cameras that named their view of a frame shed (a set; a loss already): the gap it
    leaves in the frame ids is not named again, and an observation of such a view coming after
    all is late; as long as a decided marker."""
    return per_frame_key(site, SHED, frame_id)


def awaiting_key(site: str) -> str:
    """Lazy upload: sorted set of frames whose features were requested, scored by the second
    deadline (ms since the epoch), when they are decided with the features that came."""
    return f"{_site_prefix(site)}awaiting"


def pending_key(site: str) -> str:
    """Sorted set of open frames scored by their deadline (ms since the epoch)."""
    return f"{_site_prefix(site)}pending"


def escalations_stream(site: str) -> str:
    return f"{_site_prefix(site)}escalations"


def results_stream(site: str) -> str:
    return f"{_site_prefix(site)}results"


def deadletter_stream(site: str) -> str:
    return f"{_site_prefix(site)}deadletter"


def losses_stream(site: str) -> str:
    """Named losses: (frame, camera, where, why) of every observation a camera shed."""
    return f"{_site_prefix(site)}losses"


def feature_wait_key(site: str) -> str:
    """Lazy upload: hash of how long requested frames waited for their features, from the
    request to the claim by the last answer or at the second deadline (bin -> frames; bins of
    0.1 ms below 100 ms, of 1 ms above, named in tenths of a ms: `edge.frame_store.wait_percentiles`)."""
    return f"{_site_prefix(site)}feature_wait"


def ahead_key(site: str) -> str:
    """Hash camera -> highest frame id refused as ahead of the admission window, TTL: a majority of
    the cameras ahead together is the site moving on (after a long outage), and is admitted."""
    return f"{_site_prefix(site)}ahead"


def gaps_key(site: str) -> str:
    """Sorted set of frame ids that no camera's observation had reached when one of a later frame
    came (a gap in the site's frame ids), scored by when they are named lost if none comes (ms
    since the epoch)."""
    return f"{_site_prefix(site)}gaps"


def front_key(site: str) -> str:
    """Hash camera -> highest frame id it sent: the edge admits frame ids near what two cameras reached."""
    return f"{_site_prefix(site)}front"


def edge_sessions_key(site: str) -> str:
    """Hash service id -> session expiry (s) of the aggregators with a persistent MQTT session, so
    that a live one takes over the session of one that died (`edge.sessions`)."""
    return f"{_site_prefix(site)}edge_sessions"


def edge_reap_lock_key(site: str, service_id: str) -> str:
    """Lock held by the aggregator taking over dead aggregator `service_id`'s session."""
    return f"{_site_prefix(site)}reap:{check_service_id(service_id)}"


def counters_key(site: str) -> str:
    return f"{_site_prefix(site)}counters"


def sites_key() -> str:
    """Set of the site ids whose edges announced themselves (`ada-ddnn cloud --sites '*'` serves
    them). The one key of no site: on a cluster it has a slot of its own and is touched alone."""
    return SITES_KEY


def heartbeat_key(site: str, role: str, service_id: str) -> str:
    return heartbeat_prefix(site, role) + check_service_id(service_id)


def heartbeat_prefix(site: str, role: str) -> str:
    if not SERVICE_RE.match(role):
        raise ValueError(f"bad role {role!r}")
    return f"{_site_prefix(site)}heartbeat:{role}:"


def heartbeat_pattern(site: str, role: str) -> str:
    """SCAN MATCH pattern of the heartbeats (braces are no glob characters in Redis)."""
    return heartbeat_prefix(site, role) + "*"


def site_pattern(site: str) -> str:
    """Every Redis key of a site (for cleanup in tests and `replay`), as a SCAN MATCH pattern."""
    return f"{_site_prefix(site)}*"
