"""Job — a future for work running alongside the notebook — its one lifecycle, and the job table.

Every kind of job (a thread, a task on the kernel's loop, a periodic schedule, a Dask task) lives
the same life, written once here:

    begin (pending -> running, status line shown) -> run -> settle exactly once
    (done / error / cancelled / timeout) -> report (traceback, value, status line) -> future set

A *driver* (``runners.py``, ``schedule.py``, ``dask_jobs.py``) only starts the work, knows how to
interrupt it, and hands the job the outcome through :meth:`Job.outcome_of` and :meth:`Job.settle`.
Whatever user code raises — ``SystemExit``, ``KeyboardInterrupt`` and ``GeneratorExit`` included —
ends the job with status ``error``; nothing escapes into the kernel's loop.

Stopping (``cancel()``, a ``--timeout``) is the lifecycle's too: it asks the driver to interrupt the
work, asks again every second while the work runs on, and settles the job :data:`SETTLE_AFTER`
seconds after the request even if the work caught the interruption and carried on (the job's line
then says its code is still running).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import html
import itertools
import threading
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Protocol

from .deadlines import CellTimeout

from .output import OutputLog

if TYPE_CHECKING:
    from .output import CellOutput
    from .table import CellActivity

__all__ = ["Job", "JobStopped", "loop_timer"]

_FINAL = {"done", "error", "cancelled", "timeout"}
# Seconds from a stop request (cancel, deadline) to the job being settled even if its code caught
# the interruption and carried on; meanwhile it is interrupted again every REPEAT seconds.
SETTLE_AFTER = 1.0
REPEAT = 1.0


class JobStopped(BaseException):
    """Raised inside a thread job to stop it (a BaseException, so ``except Exception`` lets it by)."""


class Cancellable(Protocol):
    def cancel(self) -> Any: ...


# A driver's timer: call_later(seconds, fn) -> something with cancel(). Loop drivers use the loop's
# own timers; thread and Dask drivers use the deadline engine's one thread.
Timer = Callable[[float, Callable[[], None]], Any]


def loop_timer(loop: asyncio.AbstractEventLoop) -> Timer:
    """A :data:`Timer` on ``loop`` that may be called from any thread.

    ``loop.call_later`` may only be called on the loop's own thread; a stop requested from another
    thread (a thread job cancelling a loop job, shutdown) arms its timer through the loop's one
    thread-safe door instead.
    """

    def timer(seconds: float, fn: Callable[[], None]) -> Cancellable:
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:  # no loop runs in this thread
            here = False
        if here:
            return loop.call_later(seconds, fn)
        return _LoopTimer(loop, seconds, fn)

    return timer


class _LoopTimer:
    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, fn: Callable[[], None]) -> None:
        self.loop = loop
        self.handle: asyncio.TimerHandle | None = None
        self.cancelled = False
        try:
            loop.call_soon_threadsafe(self._arm, seconds, fn)
        except RuntimeError:  # the loop has closed: nothing will run on it any more
            self.cancelled = True

    def _arm(self, seconds: float, fn: Callable[[], None]) -> None:
        if not self.cancelled:
            self.handle = self.loop.call_later(seconds, fn)

    def cancel(self) -> None:
        self.cancelled = True
        try:
            self.loop.call_soon_threadsafe(self._disarm)
        except RuntimeError:
            pass

    def _disarm(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class Job:
    """Work started by ``%%background`` (or :func:`concur_magics.background`): a future you can
    wait for, await, cancel and list.

    The outcome lives in a :class:`concurrent.futures.Future`, which does the waiting; the job adds
    what a user wants to see: a status, timing, a name and reprs. All methods are thread-safe.

    Attributes
    ----------
    id:
        A number, unique in this process.
    name:
        The name given with ``-n``, or None.
    mode:
        ``"thread"``, ``"loop"``, ``"every"`` or ``"dask"``.
    source:
        The cell body (or a description of the callable).
    skipped:
        For ``%%every`` jobs: runs skipped because a cell was executing or a run was still going.
    note:
        Set when the job settled while its code was still running (it caught the stop).
    open_ended:
        True for a schedule with no end of its own (``%%every`` without ``--times``).
    cell, run:
        Which cell started the job and which run of it (see :func:`concur_magics.background`).
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        source: str,
        mode: str,
        name: str | None = None,
        *,
        out: CellOutput | None = None,
        limit: float | None = None,
        cell: str | None = None,
        run: str | None = None,
        open_ended: bool = False,
    ) -> None:
        self.id = next(self._ids)
        self.run = run
        self.open_ended = open_ended
        self.name = name
        self.mode = mode
        self.source = source
        self.cell = cell
        self.limit = limit
        self.skipped = 0
        self.note = ""
        self._out = out
        self._future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._callbacks: list[Callable[[Job], Any]] = []
        # Reentrant: settle() may run inside a driver's interrupt while stop() holds the lock.
        self._lock = threading.RLock()
        self._status = "pending"
        self._started: float | None = None
        self._ended: float | None = None
        self._interrupt: Callable[[], object] | None = None
        self._timer: Timer | None = None
        self._timers: list[Cancellable] = []
        self._stopping: str | None = None
        self._working = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop a loop job runs on
        self._dask_future: Any = None  # the task of a dask job, once submitted
        self._on_end: Callable[[Job], None] | None = None  # the table's retention hook
        self._activity: CellActivity | None = None  # the owner's, set when added to its table
        self._on_begin: Callable[[Job], None] | None = None  # the table's: wakes the status lines
        self._began = False
        self.held_up = False  # a loop job whose loop a blocking cell holds up (StatusLines says)
        self.log = OutputLog()
        if out is not None:
            out.log = self.log
        self._code_context: contextvars.Context | None = None  # where the job's own code runs

    # ------------------------------------------------------------------ state
    @property
    def status(self) -> str:
        """One of ``pending``, ``running``, ``done``, ``error``, ``cancelled``, ``timeout``."""
        return self._status

    @property
    def elapsed(self) -> float:
        """Seconds the job has been running (or ran, once it ended); 0 while pending."""
        with self._lock:
            if self._started is None:
                return 0.0
            return (self._ended or time.monotonic()) - self._started

    @property
    def label(self) -> str:
        """``#3`` or ``#3 fetch``: how tables and messages name the job."""
        return f"#{self.id}" + (f" {self.name}" if self.name else "")

    @property
    def display_id(self) -> str:
        """The id of the status line shown for this job in its cell."""
        return f"concur-job-{id(self):x}-{self.id}"

    @property
    def first_line(self) -> str:
        """The first line of the job's source that tells it apart: not blank, a comment or an import
        (unless that is all there is)."""
        lines = [line.strip() for line in self.source.splitlines() if line.strip()]
        meaningful = [line for line in lines if not line.startswith(("#", "import ", "from "))]
        return (meaningful or lines or [""])[0]

    @property
    def output(self) -> str:
        """What the job has shown so far, as text: printed lines, displays, value, traceback.

        Bounded: the newest :data:`~concur_magics.output.LOG_LIMIT` characters are kept
        (``%jobs show`` shows it again with its rich displays).
        """
        return self.log.text()

    def refresh_status_line(self, held_up: bool = False) -> None:
        """Refresh the job's status line while it runs (its elapsed time; whether it is held up)."""
        with self._lock:  # not after settle's final refresh: that one must be the last
            if self._status != "running" or self._out is None:
                return
            self.held_up = held_up
            self._out.show(self, self.display_id, update=True)

    # ------------------------------------------------------------------ future API
    def done(self) -> bool:
        return self._future.done()

    def cancelled(self) -> bool:
        return self._status == "cancelled"

    def result(self, timeout: float | None = None) -> Any:
        """The job's value (its last expression), waiting up to ``timeout`` seconds.

        Raises
        ------
        concurrent.futures.CancelledError
            If the job was cancelled.
        concurrent.futures.TimeoutError
            If it is still running after ``timeout`` seconds.
        RuntimeError
            If waiting would block the event loop that this (loop) job needs to run on.
        BaseException
            Whatever the job raised (``CellTimeout`` for a job stopped by its ``--timeout``).
        """
        self._check_not_blocking_own_loop()
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception the job raised, or None; waits like :meth:`result`."""
        self._check_not_blocking_own_loop()
        return self._future.exception(timeout)

    def add_done_callback(self, fn: Callable[[Job], Any]) -> None:
        """Call ``fn(job)`` when the job ends (at once if it has), in the thread that ends it."""
        with self._lock:
            if not self.done():
                self._callbacks.append(fn)
                return
        fn(self)

    def remove_done_callback(self, fn: Callable[[Job], Any]) -> None:
        """Forget a callback given to :meth:`add_done_callback` (no error if it is not there)."""
        with self._lock:
            if fn in self._callbacks:
                self._callbacks.remove(fn)

    def cancel(self) -> bool:
        """Stop the job: a pending one never starts, a running loop job is cancelled at its next
        ``await``, a running thread job gets an exception at its next Python bytecode.

        A job whose code catches that and carries on is settled as ``cancelled`` a second after
        the request all the same, and interrupted again every second until it stops.

        Returns
        -------
        bool
            True if this call (or an earlier one still under way) stops the job; False if the job
            had already ended.
        """
        return self.stop("cancelled")

    def __await__(self) -> Generator[Any, None, Any]:
        """``await job`` from any event loop: waits without blocking the loop.

        Cancelling the awaiting task (``asyncio.wait_for`` timing out, say) does not cancel the job
        (use :meth:`cancel`), and leaves nothing behind on it.
        """
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()

        def wake(_: Job) -> None:
            try:
                loop.call_soon_threadsafe(_resolve, waiter)
            except RuntimeError:  # the awaiting loop has closed
                pass

        self.add_done_callback(wake)
        try:
            if self.mode == "every" and self._activity is not None:
                with self._activity.waiting_for_jobs():  # awaiting a schedule lets it run
                    yield from waiter.__await__()
            else:
                yield from waiter.__await__()
        finally:
            self.remove_done_callback(wake)
        if self._future.cancelled():
            raise asyncio.CancelledError(f"job {self.label} was cancelled")
        return self._future.result()

    # ------------------------------------------------------------------ the lifecycle
    def begin(self, interrupt: Callable[[], object], timer: Timer) -> bool:
        """pending -> running: called by the driver as the work starts; shows the status line.

        ``interrupt()`` stops the work (thread-safe); ``timer(seconds, fn)`` schedules the job's
        deadline and stop follow-ups where the driver's work runs. False if the job was cancelled
        meanwhile (the work must not start).
        """
        with self._lock:
            if self._status != "pending":
                return False
            self._status = "running"
            self._started = time.monotonic()
            self._interrupt = interrupt
            self._timer = timer
            self._working = True
            self._began = True
            if self.limit is not None:
                self._timers.append(timer(self.limit, self._deadline))
        if self._out is not None:
            self._out.refresh_line(self)
        if self._on_begin is not None:
            self._on_begin(self)
        return True

    def _deadline(self) -> None:
        self.stop("timeout")

    def outcome_of(self, exc: BaseException) -> tuple[str, BaseException | None]:
        """The status and error for an exception that ended the work; written once for all drivers."""
        stopping = self._stopping
        if isinstance(exc, (JobStopped, asyncio.CancelledError)) and stopping == "timeout":
            return "timeout", self._timeout_error(exc)
        if isinstance(exc, (JobStopped, asyncio.CancelledError)):
            return "cancelled", None
        if isinstance(exc, CellTimeout):
            return "timeout", exc
        return "error", exc  # SystemExit, KeyboardInterrupt, GeneratorExit: the job's error too

    def settle(self, status: str, value: Any = None, error: BaseException | None = None,
               *, show_value: bool = True, ended: bool = True) -> bool:
        """End the job exactly once, report it in its cell, then complete its future.

        Called by the driver when the work has ended (``ended=True``), or by the lifecycle when a
        stop is overdue and the work runs on (``ended=False``). Later calls return False and change
        nothing but the record that the work has ended.
        """
        with self._lock:
            timers: list[Cancellable] = []
            if ended:
                self._working = False
                timers, self._timers = self._timers, []
            first = self._status not in _FINAL
            if first:
                self._status = status
                self._ended = time.monotonic()
                if self._started is None:
                    self._started = self._ended
        for handle in timers:
            handle.cancel()
        if not first:
            return False
        try:
            if self._out is not None:
                self._out.report(self, status, value if show_value else None, error)
        finally:
            self._complete(status, value, error)
        return True

    def stop(self, status: str) -> bool:
        """Ask the work to stop and end as ``status`` (``cancelled`` or ``timeout``). Thread-safe."""
        with self._lock:
            if self._status in _FINAL:
                return False
            if self._stopping is not None:
                return True  # asked twice: the first request is under way
            self._stopping = status
            pending = self._status == "pending"
            if not pending and self._interrupt is not None:
                self._interrupt()
            timer = self._timer
        if pending:
            self.settle(status, None, self._timeout_error(None) if status == "timeout" else None)
        elif timer is not None:
            self._add_timer(timer(SETTLE_AFTER, self._overdue))
        return True

    def _add_timer(self, handle: Cancellable) -> None:
        with self._lock:
            if self._status in _FINAL and not self._working:
                handle.cancel()
            else:
                self._timers.append(handle)

    def _overdue(self) -> None:
        """The work has not stopped SETTLE_AFTER s after a stop request: settle the job all the
        same, and keep interrupting the work every REPEAT s until its driver reports it ended."""
        with self._lock:
            if not self._working:
                return
            interrupt, timer = self._interrupt, self._timer
            status = self._stopping or "cancelled"
            if self._status not in _FINAL:
                self.note = "its code caught the stop and is still running; it is interrupted every second"
        if self._status not in _FINAL:
            self.settle(status, None, self._timeout_error(None) if status == "timeout" else None, ended=False)
        if interrupt is not None:
            interrupt()
        if timer is not None:
            self._add_timer(timer(REPEAT, self._overdue))

    def _timeout_error(self, cause: BaseException | None) -> CellTimeout:
        step = "cancelled" if self.mode in ("loop", "every") else "raised"
        if self.mode == "dask":
            step = "worker"
        if self.note:
            step = "overdue"
        error = CellTimeout(self.limit or 0.0, self.mode, step)
        if cause is not None and cause.__traceback__ is not None:
            error = error.with_traceback(cause.__traceback__)
        return error

    def _complete(self, status: str, value: Any, error: BaseException | None) -> None:
        if status == "cancelled":
            self._future.cancel()
            # Moves it on to "cancelled and notified", which is what concurrent.futures.wait sees.
            self._future.set_running_or_notify_cancel()
        else:
            self._future.set_running_or_notify_cancel()
            if error is not None:
                self._future.set_exception(error)
            else:
                self._future.set_result(value)
        with self._lock:
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception as exc:  # noqa: BLE001 - one bad callback must not stop the others
                print(f"concur_magics: a done callback of job {self.label} failed: {exc!r}")
        if self._on_end is not None:
            self._on_end(self)

    def _check_not_blocking_own_loop(self) -> None:
        if self.done() or self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        from . import compat

        if running is self._loop or (
            threading.current_thread() is threading.main_thread()
            and compat.loop_thread_id(self._loop) == compat.main_thread_id()
        ):
            raise RuntimeError(
                f"job {self.label} runs on this thread's event loop, so waiting for it here would "
                "block it forever: use `await job` (or `%jobs wait`) instead"
            )

    # ------------------------------------------------------------------ reprs
    @property
    def _remark(self) -> str:
        if self.note:
            return self.note
        if self.held_up and self._status == "running":
            return "held up: a cell is blocking the kernel's loop"
        return ""

    def __repr__(self) -> str:
        timing = f" {self.elapsed:.1f} s" if self._started is not None else ""
        note = f" ({self._remark})" if self._remark else ""
        return f"<Job {self.label} [{self.mode}] {self.status}{timing}: {self.first_line}{note}>"

    def _repr_html_(self) -> str:
        colour = _COLOURS.get(self.status, "#555")
        timing = f" · {self.elapsed:.1f} s" if self._started is not None else ""
        note = f" <small>({html.escape(self._remark)})</small>" if self._remark else ""
        return (
            f"<span style='font-family:monospace'><b>Job {html.escape(self.label)}</b> "
            f"[{self.mode}] <span style='color:{colour}'>{self.status}</span>{timing} — "
            f"<code>{html.escape(self.first_line)}</code>{note}</span>"
        )


def _resolve(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(None)


_COLOURS = {
    "pending": "#777",
    "running": "#1a73e8",
    "done": "#188038",
    "error": "#d93025",
    "cancelled": "#b06000",
    "timeout": "#b06000",
}
