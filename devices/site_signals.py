"""What a site tells its cameras: the capture clock they share (`ada/{site}/clock`) and how late
observations reach its aggregators (`ada/{site}/edge/flow/+`), and what a camera makes of the
latter: whether to hold back (`overloaded`) or which share of its frames to send (`split`)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt

from pipeline.errors import MessageError
from pipeline.throttle import Throttle
from pipeline.wire import names
from pipeline.wire.control import FlowStatus, SiteClock

log = logging.getLogger(__name__)

FLOW_STALE_S = 3.0  # an aggregator's flow status older than this is ignored (it stopped saying)
FLOW_AHEAD_S = 5.0  # a flow status dated further ahead of this camera's clock is refused (a wrong clock would keep it fresh for ever)
MAX_FLOW_SOURCES = 256  # aggregators whose flow statuses a camera keeps at most (a flood of ids must not grow the table)
WARN_S = 10.0  # a refused control message is logged at most this often per kind (each one is counted)
MIN_KEEP = 0.02  # under overload a camera still sends at least this share of its frames (so the edge's lag is measured)
CUT, RAISE = 0.7, 1.15  # the kept share's factors at each flow status over the limit / under half of it


class SiteSignals:
    """The latest site clock and flow statuses one camera process has heard, kept by the MQTT
    network thread (`on_message` only stores them) and read by the feed's loop."""

    def __init__(self, site: str, shed_lag_ms: int, on_live_flow: Callable[[], None] | None = None) -> None:
        self.site, self.shed_lag_ms = site, shed_lag_ms
        self.on_live_flow = on_live_flow  # called for each flow status an aggregator publishes now (not retained)
        self.flow: dict[str, FlowStatus] = {}  # aggregator (digest of its id) -> its latest flow status
        self.clock: SiteClock | None = None
        self.clock_seen = threading.Event()
        self.keep = 1.0  # share of frames sent under overload
        self.refused = 0  # control messages ignored: malformed, dated ahead, or beyond MAX_FLOW_SOURCES
        self._credit, self._flow_seen, self._holding = 0.0, 0.0, False
        self._warn = Throttle(WARN_S)

    def on_message(self, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:  # a cleared retained message: that aggregator stopped
            self.flow.pop(msg.topic.rsplit("/", 1)[-1], None)
            return
        try:
            if msg.topic == names.clock_topic(self.site):
                self.clock = SiteClock.decode(msg.payload)
                self.clock_seen.set()
            else:
                self._flow(FlowStatus.decode(msg.payload), msg.topic, bool(getattr(msg, "retain", False)))
        except MessageError as err:
            self._refuse("bad", f"ignoring a bad control message on {msg.topic}: {err}")

    def _refuse(self, kind: str, why: str) -> None:
        self.refused += 1
        if self._warn(kind):
            log.warning("site %r: %s (%d control messages ignored so far; one such line per %.0f s)", self.site, why,
                        self.refused, WARN_S)

    def _flow(self, status: FlowStatus, topic: str, retained: bool) -> None:
        if status.site != self.site or status.by != topic.rsplit("/", 1)[-1]:
            self._refuse("forged", f"ignoring a flow status of site {status.site!r} by {status.by!r} on {topic}: an "
                         "aggregator reports for its own site on its own topic only")
            return
        ahead = status.at - time.time()
        if ahead > FLOW_AHEAD_S:
            self._refuse("ahead", f"ignoring the flow status of {status.by!r} on {topic}: dated {ahead:.4g} s ahead "
                         "of this camera's clock (is that aggregator's or this camera's clock set?)")
            return
        if status.by not in self.flow and len(self.flow) >= MAX_FLOW_SOURCES:
            stale = time.time() - FLOW_STALE_S
            self.flow = {by: f for by, f in list(self.flow.items()) if f.at > stale}
            if len(self.flow) >= MAX_FLOW_SOURCES:
                self._refuse("full", f"ignoring the flow status of {status.by!r} on {topic}: {len(self.flow)} "
                             "aggregators report already")
                return
        self.flow[status.by] = status
        if not retained and self.on_live_flow is not None:
            self.on_live_flow()

    def _fresh(self) -> list[FlowStatus]:
        return [f for f in list(self.flow.values()) if f.at > time.time() - FLOW_STALE_S]

    def overloaded(self) -> bool:
        """True while an aggregator reports observations arriving --shed-lag-ms late or later
        (until they arrive in less than half that: hysteresis, so holding back does not flap)."""
        if not self.shed_lag_ms:
            return False
        worst = max((f.lag_ms for f in self._fresh()), default=0.0)
        self._holding = worst >= (self.shed_lag_ms / 2 if self._holding else self.shed_lag_ms)
        return self._holding

    def split(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """(frames to send, frames to shed) of `ids`: under overload the kept share follows the
        edge's lag (cut by 30% at each flow status of --shed-lag-ms or more, raised again once
        the lag is under half that), spread evenly over the frames, so the edge gets about what
        it can take instead of on/off bursts."""
        self._adapt()
        if self.keep >= 1.0:
            return ids, []
        kept, shed = [], []
        for f in ids:
            self._credit += self.keep
            if self._credit >= 1.0:
                self._credit -= 1.0
                kept.append(f)
            else:
                shed.append(f)
        return kept, shed

    def _adapt(self) -> None:
        """One step of the kept share per new flow status."""
        fresh = self._fresh()
        latest = max((f.at for f in fresh), default=0.0)
        if not self.shed_lag_ms or latest <= self._flow_seen:
            if not fresh:
                self.keep = 1.0  # no aggregator says anything: nothing to adapt to
            return
        self._flow_seen = latest
        worst = max(f.lag_ms for f in fresh)
        if worst >= self.shed_lag_ms:
            self.keep = max(MIN_KEEP, self.keep * CUT)
        elif worst < self.shed_lag_ms / 2:
            self.keep = min(1.0, self.keep * RAISE + 0.01)
