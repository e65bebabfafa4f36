"""Job — a future for work running alongside the notebook — and the table behind ``%jobs``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import itertools
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["CellActivity", "Job", "JobTable", "JOBS", "wait_for_jobs", "wait_for_jobs_async"]

_FINAL = {"done", "error", "cancelled", "timeout"}


class CellActivity:
    """Whether a foreground cell is busy, for ``%%every`` runs that must not race it.

    The extension's pre/post_execute event handlers keep ``executing``. A cell that awaits yields
    the kernel's loop, so a periodic run could otherwise slip in between its statements — unless
    the cell is waiting for jobs (``%jobs wait``, or awaiting an ``every`` job), which is asking for
    them to run. Touched only on the kernel's main thread.
    """

    executing = False
    waiting = 0

    @classmethod
    def started(cls) -> None:
        cls.executing = True

    @classmethod
    def finished(cls) -> None:
        cls.executing = False

    @classmethod
    def quiet(cls) -> bool:
        """True when a periodic run may touch the namespace now."""
        return not cls.executing or cls.waiting > 0

    @classmethod
    @contextmanager
    def waiting_for_jobs(cls) -> Iterator[None]:
        cls.waiting += 1
        try:
            yield
        finally:
            cls.waiting -= 1


class Job:
    """Work started by ``%%background`` (or :func:`concur_magics.background`): a future you can
    wait for, await, cancel and list.

    The outcome lives in a :class:`concurrent.futures.Future`, which does the waiting and the
    callbacks; the job adds what a user wants to see: a status, timing, a name and reprs.
    All methods are thread-safe.

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
    """

    _ids = itertools.count(1)

    def __init__(self, source: str, mode: str, name: str | None = None) -> None:
        self.id = next(self._ids)
        self.name = name
        self.mode = mode
        self.source = source
        self.skipped = 0
        self._future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        # Reentrant: a runner's cancel hook may finish the job while cancel() holds the lock.
        self._lock = threading.RLock()
        self._status = "pending"
        self._started: float | None = None
        self._ended: float | None = None
        self._cancel: Callable[[], object] | None = None  # set by the runner while the job runs
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop a loop job runs on
        self._dask_future: Any = None  # the task of a dask job, once submitted

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
        lines = [line for line in self.source.strip().splitlines() if line.strip()]
        return lines[0] if lines else ""

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
        self._future.add_done_callback(lambda _: fn(self))

    def cancel(self) -> bool:
        """Stop the job: a pending one never starts, a running loop job is cancelled at its next
        ``await``, a running thread job gets an exception at its next Python bytecode.

        Returns
        -------
        bool
            False if the job had already ended.
        """
        with self._lock:
            if self._status in _FINAL:
                return False
            if self._status == "pending":
                self._cancel_now()
            elif self._cancel is not None:
                # Under the lock, so the runner can't be finishing while we interrupt it.
                self._cancel()
            return True

    def __await__(self) -> Generator[Any, None, Any]:
        """``await job`` from any event loop: waits without blocking the loop.

        Cancelling the awaiting task does not cancel the job (use :meth:`cancel`).
        """
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()

        def copy_outcome(_: concurrent.futures.Future[Any]) -> None:
            if waiter.done():
                return
            if self._future.cancelled():
                waiter.cancel()
            elif self._future.exception() is not None:
                waiter.set_exception(self._future.exception())  # type: ignore[arg-type]
            else:
                waiter.set_result(self._future.result())

        # The job may end on another thread: hand the outcome to this loop through its one
        # thread-safe door.
        self._future.add_done_callback(lambda f: loop.call_soon_threadsafe(copy_outcome, f))
        if self.mode != "every":
            return (yield from waiter.__await__())
        with CellActivity.waiting_for_jobs():  # awaiting a schedule lets it run
            return (yield from waiter.__await__())

    # ------------------------------------------------------------------ runner side
    def _mark_running(self, cancel: Callable[[], object]) -> bool:
        """Called by the runner as the work starts; False if the job was cancelled meanwhile."""
        with self._lock:
            if self._status != "pending":
                return False
            self._status = "running"
            self._started = time.monotonic()
            self._cancel = cancel
            return True

    def _finish(self, status: str, value: Any = None, error: BaseException | None = None) -> None:
        """Record the outcome (called once, by the runner)."""
        with self._lock:
            if self._status in _FINAL:
                return
            self._status = status
            self._ended = time.monotonic()
            self._cancel = None
        if status == "cancelled":
            self._future.cancel()
            return
        self._future.set_running_or_notify_cancel()
        if error is not None:
            self._future.set_exception(error)
        else:
            self._future.set_result(value)

    def _cancel_now(self) -> None:
        # Caller holds the lock; the job never started.
        self._status = "cancelled"
        self._started = self._ended = time.monotonic()
        self._future.cancel()

    def _check_not_blocking_own_loop(self) -> None:
        if self.done() or self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop or (
            threading.current_thread() is threading.main_thread() and _loop_thread_is_main(self._loop)
        ):
            raise RuntimeError(
                f"job {self.label} runs on this thread's event loop, so waiting for it here would "
                "block it forever: use `await job` (or `%jobs wait`) instead"
            )

    # ------------------------------------------------------------------ reprs
    def __repr__(self) -> str:
        timing = f" {self.elapsed:.1f} s" if self._started is not None else ""
        return f"<Job {self.label} [{self.mode}] {self.status}{timing}: {self.first_line}>"

    def _repr_html_(self) -> str:
        colour = _COLOURS.get(self.status, "#555")
        timing = f" · {self.elapsed:.1f} s" if self._started is not None else ""
        return (
            f"<span style='font-family:monospace'><b>Job {html.escape(self.label)}</b> "
            f"[{self.mode}] <span style='color:{colour}'>{self.status}</span>{timing} — "
            f"<code>{html.escape(self.first_line)}</code></span>"
        )


_COLOURS = {
    "pending": "#777",
    "running": "#1a73e8",
    "done": "#188038",
    "error": "#d93025",
    "cancelled": "#b06000",
    "timeout": "#b06000",
}


def _loop_thread_is_main(loop: asyncio.AbstractEventLoop) -> bool:
    thread_id = getattr(loop, "_thread_id", None)  # asyncio records it while the loop runs
    return thread_id is not None and thread_id == threading.main_thread().ident


class JobTable:
    """The jobs of this process, in start order: what ``%jobs`` lists. Thread-safe."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()

    def add(self, job: Job) -> Job:
        with self._lock:
            self._jobs[job.id] = job
        return job

    def __iter__(self) -> Iterator[Job]:
        with self._lock:
            return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    def find(self, key: str) -> Job:
        """The job with this id (``3`` or ``#3``) or name (the newest job of that name).

        Raises
        ------
        KeyError
            With a message listing the known ids and names.
        """
        with self._lock:
            jobs = list(self._jobs.values())
        wanted = key.lstrip("#")
        for job in jobs:
            if str(job.id) == wanted:
                return job
        for job in reversed(jobs):  # a cell run again makes a new job of the same name
            if job.name == key:
                return job
        known = ", ".join(job.label for job in jobs) or "none"
        raise KeyError(f"no job with id or name {key!r} (known: {known})")

    def clear(self) -> int:
        """Forget jobs that have ended; return how many."""
        with self._lock:
            ended = [i for i, job in self._jobs.items() if job.done()]
            for i in ended:
                del self._jobs[i]
        return len(ended)

    def cancel_all(self, join: float = 2.0) -> list[Job]:
        """Cancel every job still pending or running; wait up to ``join`` s for them; return
        those that did not end (a thread stuck in C code)."""
        jobs = [job for job in self if not job.done()]
        for job in jobs:
            job.cancel()
        concurrent.futures.wait([job._future for job in jobs if job.mode == "thread"], timeout=join)
        return [job for job in jobs if not job.done()]

    def view(self, jobs: Iterable[Job] | None = None) -> JobsView:
        return JobsView(list(jobs) if jobs is not None else list(self))


def wait_for_jobs(jobs: list[Job], timeout: float | None = None) -> None:
    """Block until ``jobs`` have ended or ``timeout`` seconds have passed.

    Not on the loop a loop job runs on: it could never end (use :func:`wait_for_jobs_async`).
    """
    concurrent.futures.wait([job._future for job in jobs], timeout=timeout)


async def wait_for_jobs_async(jobs: list[Job], timeout: float | None = None) -> None:
    """Wait on the running loop until ``jobs`` have ended or ``timeout`` seconds have passed.

    The loop keeps running loop jobs meanwhile, and ``%%every`` runs may go on: waiting for jobs is
    asking for them to run. A job's failure is its own cell's to show, not the waiter's.
    """

    async def ended(job: Job) -> None:
        try:
            await job
        except BaseException:  # noqa: BLE001 - see above
            pass

    waiters = [asyncio.ensure_future(ended(job)) for job in jobs]
    if not waiters:
        return
    with CellActivity.waiting_for_jobs():
        _, pending = await asyncio.wait(waiters, timeout=timeout)
    for waiter in pending:
        waiter.cancel()


class JobsView:
    """A snapshot of jobs shown as a table (text and HTML)."""

    columns = ("id", "name", "mode", "status", "elapsed", "cell")

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.rows = [
            (str(j.id), j.name or "", j.mode, j.status, f"{j.elapsed:.1f} s", j.first_line[:60])
            for j in jobs
        ]

    def __repr__(self) -> str:
        if not self.rows:
            return "no jobs"
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) for i, c in enumerate(self.columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in self.rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        if not self.rows:
            return "<p>no jobs</p>"
        head = "".join(f"<th>{c}</th>" for c in self.columns)
        body = "".join(
            "<tr>"
            + "".join(
                f"<td style='color:{_COLOURS[row[3]]}'>{html.escape(v)}</td>" if i == 3
                else f"<td><code>{html.escape(v)}</code></td>" if i == 5
                else f"<td>{html.escape(v)}</td>"
                for i, v in enumerate(row)
            )
            + "</tr>"
            for row in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


JOBS = JobTable()
