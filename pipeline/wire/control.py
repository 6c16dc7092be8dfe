"""Control messages of a site: the clock its cameras share, the edge's flow status, and the
frames a camera had to shed. Versioned msgpack like every message (`pipeline.wire.messages`).

    ada/{site}/clock               SiteClock     retained: frame i of start..stop is captured at epoch + (i - start) / fps
    ada/{site}/edge/flow/{id}      FlowStatus    retained, one per aggregator: how late observations arrive
    ada/{site}/cam/{k}/shed        ShedNotice    QoS 1: frame ids camera k did not send, and why
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from pipeline.errors import MessageError
from pipeline.wire.messages import MAX_CAMERAS, MAX_FRAME_ID, MAX_TIME_S, _float, _int, _Message, _set, _site, _text

MAX_SHED_IDS = 4096  # frame ids one ShedNotice names at most (a camera sends several when it sheds more)
SHED_REASONS = ("behind", "overload", "outage")  # behind schedule; the edge asked; the broker was away


MIN_FPS, MAX_FPS = 1e-3, 1e6  # the rates a site clock may run at (frames per second)


def check_fps(fps: float) -> float:
    """A camera's or a replay's --fps: 0 (as fast as possible) or a rate a site clock can run at."""
    if fps != 0 and not MIN_FPS <= fps <= MAX_FPS:
        raise ValueError(f"fps must be 0 (as fast as possible) or {MIN_FPS:g}..{MAX_FPS:g} frames per second, got {fps:g}")
    return fps


@dataclass(frozen=True)
class SiteClock(_Message):
    """The capture schedule a site's cameras share, so that separately started cameras capture
    frame i at the same moment: t(i) = epoch + (i - start) / fps."""

    TAG: ClassVar[str] = "clock"
    FIELDS: ClassVar[tuple[str, ...]] = ("site", "epoch", "fps", "start", "stop")

    site: str
    epoch: float  # seconds since the Unix epoch at which frame `start` is captured
    fps: float  # frames per second
    start: int  # the frame id captured at `epoch`
    stop: int  # one past the last frame of the run it schedules: a camera whose range starts there runs anew

    def __post_init__(self) -> None:
        _site(self.site)
        _set(self, "epoch", _float("epoch", self.epoch, 0.0, MAX_TIME_S))
        _set(self, "fps", _float("fps", self.fps, MIN_FPS, MAX_FPS))
        _set(self, "start", _int("start", self.start, 0, MAX_FRAME_ID))
        _set(self, "stop", _int("stop", self.stop, self.start + 1, MAX_FRAME_ID))

    def at(self, frame_id: int) -> float:
        """Capture time of `frame_id`."""
        return self.epoch + (frame_id - self.start) / self.fps

    def due_by(self, t: float) -> int:
        """One past the last frame due at time `t` (seconds since the Unix epoch): frames
        start..due_by(t) - 1 have been captured by then (none before the epoch: `start`)."""
        return self.start + max(0, math.floor((t - self.epoch) * self.fps) + 1)


@dataclass(frozen=True)
class FlowStatus(_Message):
    """An aggregator's view of its load: how long after capture its observations reach it."""

    TAG: ClassVar[str] = "flow"
    FIELDS: ClassVar[tuple[str, ...]] = ("site", "by", "lag_ms", "backlog", "at")

    site: str
    by: str  # the aggregator's service id
    lag_ms: float  # median (capture -> stored) delay of the observations it stored lately
    backlog: int  # observations it holds, received and not yet stored
    at: float  # when it said so (seconds since the Unix epoch); cameras ignore stale ones

    def __post_init__(self) -> None:
        _site(self.site)
        _text("by", self.by)
        _set(self, "lag_ms", _float("lag_ms", self.lag_ms, 0.0))
        _set(self, "backlog", _int("backlog", self.backlog, 0, MAX_FRAME_ID))
        _set(self, "at", _float("at", self.at, 0.0, MAX_TIME_S))


@dataclass(frozen=True)
class ShedNotice(_Message):
    """Frames a camera captured and did not send, named so that the site accounts for them."""

    TAG: ClassVar[str] = "shed"
    FIELDS: ClassVar[tuple[str, ...]] = ("site", "camera", "frame_ids", "reason", "at")

    site: str
    camera: int
    frame_ids: tuple[int, ...]
    reason: str  # one of SHED_REASONS
    at: float

    def __post_init__(self) -> None:
        _site(self.site)
        _set(self, "camera", _int("camera", self.camera, 0, MAX_CAMERAS - 1))
        if not isinstance(self.frame_ids, (tuple, list)) or not 0 < len(self.frame_ids) <= MAX_SHED_IDS:
            raise MessageError(f"frame_ids must be a list of 1..{MAX_SHED_IDS} frame ids")
        _set(self, "frame_ids", tuple(_int("frame_ids[]", f, 0, MAX_FRAME_ID) for f in self.frame_ids))
        if self.reason not in SHED_REASONS:
            raise MessageError(f"reason must be one of {SHED_REASONS}, got {self.reason!r}")
        _set(self, "at", _float("at", self.at, 0.0, MAX_TIME_S))


__all__ = ["SiteClock", "FlowStatus", "ShedNotice", "SHED_REASONS", "MAX_SHED_IDS", "MIN_FPS", "MAX_FPS", "check_fps"]
