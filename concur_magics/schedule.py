"""Clocks and periodic runs: timers on the kernel's own loops, no ``while True``.

``%clock`` ticks on the **IOPub thread's** Tornado loop, which keeps running while the shell's loop is
blocked by a computing cell; a tick only formats a time and publishes a display update, and touches
no user state. ``%%every`` runs cell code, so it uses the **shell's** loop (the main thread): a run
happens only between cells and never races a foreground cell for the namespace.

A :class:`WallClockTimer` fires on wall-clock multiples of its interval (12:00:01.000, 12:00:02.000,
...) by computing each next deadline from the wall clock: it cannot drift, and a tick that can't
happen on time (the process was stopped, or C code held the GIL) is skipped, never bunched up.
``%%every`` uses Tornado's ``PeriodicCallback``, which runs start-to-start and also skips missed runs.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from tornado.ioloop import IOLoop, PeriodicCallback

from . import compat
from .cells import compile_cell
from .deadlines import check_seconds
from .jobs import Job, loop_timer
from .output import CellOutput, enter_job
from .runtime import Runtime

__all__ = ["MIN_INTERVAL", "Clock", "WallClockTimer", "every", "start_clock", "stop_clocks"]

DEFAULT_FORMAT = "%d-%m-%Y %H:%M:%S"
# Below a millisecond a timer on a loop either spins a core or silently never keeps up.
MIN_INTERVAL = 0.001


def check_interval(seconds: float) -> float:
    """``seconds`` as a float, or ValueError unless it is between 1 ms and 24.8 days."""
    value = check_seconds(seconds, "an interval")
    if value < MIN_INTERVAL:
        raise ValueError(f"an interval must be at least 1 ms, got {seconds!r} s")
    return value


class WallClockTimer:
    """Call ``callback(scheduled_wall_time)`` on ``loop`` at every wall-clock multiple of ``interval``.

    :meth:`start` and :meth:`stop` are thread-safe: they reach the loop only through
    ``IOLoop.add_callback``.
    """

    def __init__(self, loop: IOLoop, interval: float, callback: Callable[[float], None]) -> None:
        self.loop = loop
        self.interval = check_interval(interval)
        self.callback = callback
        self.skipped = 0
        self._handle: object | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        self.loop.add_callback(self._schedule_next)

    def stop(self) -> None:
        self._stopped.set()
        self.loop.add_callback(self._cancel)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def _cancel(self) -> None:
        if self._handle is not None:
            self.loop.remove_timeout(self._handle)
            self._handle = None

    def _schedule_next(self, after: float | None = None) -> None:
        if self._stopped.is_set():
            return
        now = time.time()
        base = now if after is None else max(now, after)
        due = (math.floor(base / self.interval) + 1) * self.interval
        # Deadlines go to the loop in its monotonic time; recomputing from the wall clock at every
        # tick is what keeps the ticks on the wall clock's multiples.
        self._handle = self.loop.call_later(due - now, self._tick, due)

    def _tick(self, due: float) -> None:
        self._handle = None
        if self._stopped.is_set():
            return
        late = time.time() - due
        if late >= self.interval:
            self.skipped += int(late // self.interval)
        try:
            self.callback(due)
        finally:
            self._schedule_next(after=due)


_clock_ids = itertools.count(1)


class Clock:
    """A live clock shown in a cell; :meth:`stop` stops it (thread-safe).

    Attributes
    ----------
    id:
        The number ``%clock --stop ID`` takes.
    offsets:
        For each tick, seconds between the wall-clock second it stands for and the moment it was
        published (the last 3,600 are kept).
    """

    def __init__(self, loop: IOLoop, interval: float, fmt: str, out: CellOutput,
                 registry: dict[int, Clock] | None = None) -> None:
        self.id = next(_clock_ids)
        self.interval = check_interval(interval)
        self.registry = registry if registry is not None else {}
        self.format = fmt
        self.out = out
        self.display_id = f"concur-clock-{id(self):x}-{self.id}"
        self.offsets: list[float] = []
        self.ticks = 0
        self._timer = WallClockTimer(loop, self.interval, self._tick)
        self._last = time.time()

    def start(self) -> Clock:
        self.out.show(self._face(self._last), self.display_id)
        self._timer.start()
        self.registry[self.id] = self
        return self

    def stop(self) -> None:
        """Stop ticking; the clock's last time stays shown, marked as stopped."""
        if self._timer.stopped:
            return
        self._timer.stop()
        self.registry.pop(self.id, None)
        self.out.show(self._face(self._last, stopped=True), self.display_id, update=True)

    @property
    def running(self) -> bool:
        return not self._timer.stopped

    @property
    def skipped(self) -> int:
        """Ticks that could not happen on time and were skipped."""
        return self._timer.skipped

    def _tick(self, due: float) -> None:
        self._last = due
        self.out.show(self._face(due), self.display_id, update=True)
        self.ticks += 1
        self.offsets.append(time.time() - due)
        del self.offsets[:-3600]

    def _face(self, when: float, stopped: bool = False) -> ClockFace:
        return ClockFace(time.strftime(self.format, time.localtime(when)), stopped)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Clock {self.id} every {self.interval:g} s, {state}; %clock --stop {self.id} stops it>"


class ClockFace:
    """What a clock shows: the time, as text and as HTML."""

    def __init__(self, text: str, stopped: bool) -> None:
        self.text = text
        self.stopped = stopped

    def __repr__(self) -> str:
        return self.text + (" (stopped)" if self.stopped else "")

    def _repr_html_(self) -> str:
        colour = "#777" if self.stopped else "inherit"
        note = " <small>(stopped)</small>" if self.stopped else ""
        return (
            f"<span style='font-family:monospace;font-size:1.4em;color:{colour}'>"
            f"{html.escape(self.text)}</span>{note}"
        )


def start_clock(shell: Any, interval: float = 1.0, fmt: str = DEFAULT_FORMAT) -> Clock:
    """Show a live clock in the current cell, ticking on the kernel's IOPub loop.

    Raises
    ------
    RuntimeError
        Outside an ipykernel (a terminal has no output area to update).
    ValueError
        For an interval under 1 ms or over 24.8 days.
    """
    loop = compat.iopub_loop(shell)
    if loop is None:
        raise RuntimeError("%clock needs a Jupyter kernel (ipykernel): it updates a cell's output")
    return Clock(loop, interval, fmt, CellOutput(shell), Runtime.current().clocks).start()


def stop_clocks(clock_id: int | None = None) -> list[Clock]:
    """Stop one clock by id, or all; return those stopped.

    Raises
    ------
    KeyError
        For an id that is not a running clock.
    """
    clocks_by_id = Runtime.current().clocks
    if clock_id is not None:
        if clock_id not in clocks_by_id:
            running = ", ".join(map(str, clocks_by_id)) or "none"
            raise KeyError(f"no running clock {clock_id} (running: {running})")
        clocks = [clocks_by_id[clock_id]]
    else:
        clocks = list(clocks_by_id.values())
    for clock in clocks:
        clock.stop()
    return clocks


def every(
    source: str,
    interval: float,
    *,
    times: int | None = None,
    name: str | None = None,
    shell: Any = None,
    namespace: dict[str, Any] | None = None,
    first_line: int = 1,
    cell: str | None = None,
    run: str | None = None,
) -> Job:
    """Run cell ``source`` every ``interval`` seconds on the current (kernel) loop, as a Job.

    The first run happens as soon as the loop is free, then one every interval (start to start,
    missed runs skipped). Runs happen only while no cell is executing — or while a cell waits for
    jobs (``%jobs wait``, ``await job`` on this job): a run that falls during a cell is skipped,
    and a run suspended at an ``await`` when a cell starts is cancelled at that ``await`` (counted
    in ``skipped``), so a foreground cell never edits the namespace under a half-done run. The job
    ends after ``times`` runs (status ``done``, its value the last run's), when cancelled, or at
    the first exception (status ``error``, traceback shown in the cell) — ``SystemExit`` and
    ``KeyboardInterrupt`` included. A schedule started by an earlier run of the same cell, or with
    the same ``name``, is replaced: cancelled, with a line saying so.

    Raises
    ------
    ValueError
        For a bad interval or ``times``.
    """
    interval = check_interval(interval)
    if times is not None and times < 1:
        raise ValueError(f"times must be at least 1, got {times}")
    runtime = Runtime.current()
    runtime.route(shell)
    ns = namespace if namespace is not None else (shell.user_ns if shell is not None else {})
    compiled = compile_cell(source, shell=shell, first_line=first_line)
    out = CellOutput(shell)
    job = Job(source, "every", name, out=out, cell=cell, run=run, open_ended=times is None)
    replaced = [old for old in runtime.jobs.of_earlier_runs(job) if old.mode == "every"]
    replaced += [old for old in runtime.jobs.running()
                 if old.mode == "every" and name and old.name == name and old not in replaced]
    for old in replaced:
        # A rerun of a schedule (or one of the same name) means "this schedule, changed".
        old.cancel()
        print(f"replaced schedule {old.label}: cancelled")
    runtime.jobs.add(job)
    _Schedule(runtime, job, compiled, ns, out, interval, times).start()
    return job


class _Schedule:
    """The driver of one ``%%every`` job: a PeriodicCallback whose runs are tasks on the loop."""

    def __init__(self, runtime: Runtime, job: Job, cell: Any, ns: dict[str, Any], out: CellOutput,
                 interval: float, times: int | None) -> None:
        self.runtime, self.job, self.cell, self.ns, self.out = runtime, job, cell, ns, out
        self.times = times
        self.loop = IOLoop.current()
        self.loop_thread = threading.get_ident()
        self.runs = 0
        self.value: Any = None
        self.run: asyncio.Future[Any] | None = None  # the run in progress, if any
        self.skipped_run = False  # the run in progress was cut short by a foreground cell
        self.interval = interval
        self.last_tick: float | None = None
        self.periodic = PeriodicCallback(self.tick, interval * 1000)

    def start(self) -> None:
        aio: asyncio.AbstractEventLoop = self.loop.asyncio_loop  # type: ignore[attr-defined]
        self.job._loop = aio  # result() on the loop the runs need would block them forever
        if not self.job.begin(self.interrupt, loop_timer(aio)):
            return
        self.runtime.activity.on_start.add(self.cell_started)
        self.loop.add_callback(self.tick)
        self.periodic.start()

    def interrupt(self) -> None:
        """Stop the schedule, and cancel a run in progress at its await (thread-safe)."""
        if threading.get_ident() == self.loop_thread:
            self._interrupt_on_loop()  # on the loop already (%jobs cancel): no run is executing now
        else:
            self.loop.add_callback(self._interrupt_on_loop)

    def _interrupt_on_loop(self) -> None:
        self.periodic.stop()
        if self.run is not None and not self.run.done():
            self.run.cancel()
        else:
            self.end(self.job._stopping or "cancelled", None)

    def cell_started(self) -> None:
        """A foreground cell starts: a run suspended at an await must not go on under it."""
        if self.run is not None and not self.run.done():
            self.skipped_run = True
            self.run.cancel(msg="a cell started while this %%every run was suspended")

    def tick(self) -> None:
        if self.job.done() or self.job._stopping is not None:
            return
        now = time.monotonic()
        if self.last_tick is not None:
            # Runs that could not even be scheduled (a cell blocked the loop) count as skipped too.
            self.job.skipped += max(0, int((now - self.last_tick) / self.interval + 0.5) - 1)
        self.last_tick = now
        if (self.run is not None and not self.run.done()) or not self.runtime.activity.quiet():
            self.job.skipped += 1
            return
        # Each run in a copy of the starting cell's context, so its output goes there.
        self.skipped_run = False
        self.run = self.out.run(asyncio.ensure_future, self.run_once())

    async def run_once(self) -> None:
        __tracebackhide__ = True
        enter_job(self.job, self.out.shell)
        try:
            value = self.cell.run(self.ns) if not self.cell.is_async else await self.cell.run_async(self.ns)
        except BaseException as exc:  # noqa: BLE001 - SystemExit and friends end the job, not the loop
            if isinstance(exc, asyncio.CancelledError) and self.job._stopping is None and self.skipped_run:
                self.job.skipped += 1  # cut short by a foreground cell; the schedule goes on
                return
            status, error = self.job.outcome_of(exc)
            self.end(status, error)
            return
        self.value = value
        self.out.show_value(value)
        self.runs += 1
        if self.times is not None and self.runs >= self.times:
            self.end("done", None)

    def end(self, status: str, error: BaseException | None) -> None:
        self.periodic.stop()
        self.runtime.activity.on_start.discard(self.cell_started)
        self.job.settle(status, self.value, error, show_value=False)
