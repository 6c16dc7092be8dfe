"""A gate for warnings that would otherwise be one line per message: open at most once per period."""

from __future__ import annotations

import time
from typing import Callable, Hashable


class Throttle:
    """`throttle(key)` is True at most once per `period_s` for each key (None: one shared gate),
    and then starts that key's next period; the first call for a key is always True.

    The processes count every event in their stats; the log line a throttle lets through carries
    the count so far, so no event goes unreported, only unrepeated."""

    def __init__(self, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not period_s > 0:
            raise ValueError(f"period_s must be positive, got {period_s!r}")
        self.period_s, self.clock = period_s, clock
        self._last: dict[Hashable, float] = {}

    def __call__(self, key: Hashable = None) -> bool:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now < last + self.period_s:
            return False
        self._last[key] = now
        return True
