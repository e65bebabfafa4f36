"""WallClockTimer on a plain Tornado loop: aligned ticks, skipped (never bunched) when late."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from tornado.ioloop import IOLoop

from concur_magics.schedule import WallClockTimer

pytestmark = pytest.mark.usefixtures("no_leaks")


def test_ticks_land_on_multiples_and_a_blocked_loop_skips_them() -> None:
    calls: list[tuple[float, float]] = []  # (due, called at)

    async def main() -> WallClockTimer:
        timer = WallClockTimer(IOLoop.current(), 0.2, lambda due: calls.append((due, time.time())))
        timer.start()
        await asyncio.sleep(0.7)
        time.sleep(0.9)  # block the loop: four or five ticks can't happen on time
        await asyncio.sleep(0.7)
        timer.stop()
        await asyncio.sleep(0.3)
        return timer

    timer = asyncio.run(main())
    dues = [due for due, _ in calls]
    assert all(math.isclose(due / 0.2, round(due / 0.2), abs_tol=1e-6) for due in dues)
    assert dues == sorted(set(dues)), "each multiple at most once"
    assert max(b - a for a, b in zip(dues, dues[1:])) >= 0.8 - 1e-6, "the blocked ticks were skipped"
    assert timer.skipped >= 3
    # After the block one late tick runs at once, then ticks wait for their multiples again: the
    # missed ones are not made up in a burst. (0.1 s: generous for a loaded machine.)
    late = [at - due for due, at in calls if at - due > 0.1]
    assert len(late) <= 1, late
    assert len(calls) <= int((0.7 + 0.7) / 0.2) + 3


def test_interval_must_be_positive() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="an interval must be more than 0"):
            WallClockTimer(IOLoop.current(), 0, lambda due: None)

    asyncio.run(main())
