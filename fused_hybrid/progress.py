"""Progress of a long stage, with an estimate of the time left (the demo, the benchmark)."""

from __future__ import annotations

import time


class Countdown:
    """Progress of a stage of `total` units of work: a line at most every PERIOD seconds (and at the end) with the
    time left, estimated from the pace so far (silent with `enabled` false). The units are whatever the stage's
    time is proportional to: optimizer steps, or tokens measured."""

    PERIOD = 10.0

    def __init__(self, what: str, total: int, enabled: bool = True, unit: str = "step") -> None:
        self.what, self.total, self.enabled, self.unit = what, total, enabled, unit
        self.done = 0
        self.begin = self.last = time.perf_counter()

    def grow(self, count: int) -> None:
        """More work than planned (a sweep that goes on until out of memory), or less (negative: one cut short)."""
        self.total += count

    def step(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.PERIOD and self.done < self.total):
            return
        self.last = now
        elapsed = now - self.begin
        left = elapsed / self.done * (self.total - self.done)
        print(
            f"   {self.what}: {self.unit} {self.done} of {self.total}, {elapsed:.0f} s so far, about {left:.0f} s left",
            flush=True,
        )
