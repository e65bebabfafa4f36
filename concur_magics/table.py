"""The job table behind ``%jobs``, how it is shown, waiting for jobs, and foreground-cell activity.

:class:`JobTable` keeps a runtime's jobs (running ones always, the newest ended ones up to a bound);
:class:`JobsView` is the table ``%jobs`` shows; :func:`wait_for_jobs` and
:func:`wait_for_jobs_async` wait for jobs from a thread or on a loop; :class:`CellActivity` says
whether a foreground cell is running, for ``%%every`` runs that must not race it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import html
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from .jobs import _COLOURS, Job

__all__ = ["CellActivity", "JobTable", "JobsView", "wait_for_jobs", "wait_for_jobs_async"]


class CellActivity:
    """Whether a foreground cell is busy, for ``%%every`` runs that must not race it.

    The extension's pre/post_execute event handlers call :meth:`started` / :meth:`finished`. A cell
    that awaits yields the kernel's loop, so a periodic run could otherwise slip in between its
    statements — unless the cell is waiting for jobs (``%jobs wait``, or awaiting an ``every``
    job), which is asking for them to run. A run still suspended at an ``await`` when a cell starts
    is cancelled there (see :mod:`concur_magics.schedule`). Touched only on the kernel's main thread.
    """

    def __init__(self) -> None:
        self.executing = False
        self.waiting = 0
        self.on_start: set[Callable[[], None]] = set()

    def started(self) -> None:
        self.executing = True
        for callback in list(self.on_start):
            callback()

    def finished(self) -> None:
        self.executing = False

    def quiet(self) -> bool:
        """True when a periodic run may touch the namespace now."""
        return not self.executing or self.waiting > 0

    @contextmanager
    def waiting_for_jobs(self) -> Iterator[None]:
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1



class JobTable:
    """The jobs of one runtime, in start order: what ``%jobs`` lists. Thread-safe.

    Running jobs are always kept. Of the jobs that ended, the newest ``keep`` are kept (with their
    results); older ones are forgotten, so their values can be freed unless the user holds the
    Job (``-o VAR``). ``%jobs clear`` forgets every ended job now.
    """

    def __init__(self, keep: int = 100, activity: CellActivity | None = None) -> None:
        self.on_begin: Callable[[Job], None] | None = None  # the owner's status lines, when shown
        self._jobs: dict[int, Job] = {}  # every job kept, in start order
        self._running: dict[int, Job] = {}
        self._ended: collections.deque[int] = collections.deque()  # ids of ended jobs kept, oldest first
        self._lock = threading.Lock()
        self.keep = keep
        self.activity = activity

    def add(self, job: Job) -> Job:
        with self._lock:
            self._jobs[job.id] = job
            self._running[job.id] = job
        job._on_end = self._on_end
        job._on_begin = self._on_begin
        job._activity = self.activity
        return job

    def _on_begin(self, job: Job) -> None:
        if self.on_begin is not None:
            self.on_begin(job)

    def _on_end(self, job: Job) -> None:
        with self._lock:
            if self._running.pop(job.id, None) is None:
                return
            self._ended.append(job.id)
            while len(self._ended) > self.keep:
                self._jobs.pop(self._ended.popleft(), None)

    def __iter__(self) -> Iterator[Job]:
        with self._lock:
            return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    def running(self) -> list[Job]:
        with self._lock:
            return list(self._running.values())

    def of_earlier_runs(self, job: Job) -> list[Job]:
        """Jobs still running that an earlier run of ``job``'s cell started."""
        if job.cell is None:
            return []
        return [
            other for other in self.running()
            if other is not job and other.cell == job.cell and (job.run is None or other.run != job.run)
        ]

    def endable(self) -> tuple[list[Job], list[Job]]:
        """Running jobs that can end by themselves, and open-ended schedules (which never will)."""
        running = self.running()
        return [job for job in running if not job.open_ended], [job for job in running if job.open_ended]

    def get(self, job_id: int) -> Job | None:
        """The job with this id, if it is kept."""
        with self._lock:
            return self._jobs.get(job_id)

    def find(self, key: str) -> Job:
        """The job with this id (``3`` or ``#3``) or name (the newest job of that name).

        Raises
        ------
        KeyError
            With a message listing the known ids and names.
        """
        jobs = list(self)
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
            ended = len(self._ended)
            for i in self._ended:
                self._jobs.pop(i, None)
            self._ended.clear()
        return ended

    def cancel_all(self, join: float = 2.0) -> list[Job]:
        """Cancel every job still pending or running; wait up to ``join`` s for them; return
        those that did not end."""
        jobs = self.running()
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


async def wait_for_jobs_async(
    jobs: list[Job], timeout: float | None = None, activity: CellActivity | None = None
) -> None:
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
    if activity is None:
        _, pending = await asyncio.wait(waiters, timeout=timeout)
    else:
        with activity.waiting_for_jobs():
            _, pending = await asyncio.wait(waiters, timeout=timeout)
    for waiter in pending:
        waiter.cancel()
    if pending:
        await asyncio.wait(pending)


class JobsView:
    """A snapshot of jobs shown as a table (text and HTML), left-aligned, one row per job: its id,
    name, mode, status, elapsed time and the first line of its cell that tells it apart."""

    columns = ("id", "name", "mode", "status", "elapsed", "cell")
    WIDTH = 60  # characters of the cell's line shown

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.rows = [
            (str(j.id), j.name or "", j.mode, j.status + (" *" if j._remark else ""), f"{j.elapsed:.1f} s",
             _shorten(j.first_line, self.WIDTH))
            for j in jobs
        ]
        self.remarks = [(j.id, j._remark) for j in jobs if j._remark]

    def __repr__(self) -> str:
        if not self.rows:
            return "no jobs"
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) for i, c in enumerate(self.columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in self.rows]
        lines += [f"* #{job_id}: {remark}" for job_id, remark in self.remarks]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        if not self.rows:
            return "<p>no jobs</p>"
        # JupyterLab's and Notebook's table style aligns cells right: these are words, not numbers.
        left = "text-align:left"
        head = "".join(f"<th style='{left}'>{c}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(_html_cell(i, v, row[3]) for i, v in enumerate(row)) + "</tr>"
                       for row in self.rows)
        notes = "".join(f"<br><small>* #{job_id}: {html.escape(remark)}</small>" for job_id, remark in self.remarks)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"


def _html_cell(column: int, value: str, status: str) -> str:
    style = "text-align:left"
    if column == 3:
        style += f";color:{_COLOURS.get(status.rstrip(' *'), '#555')}"
    if column == 4:
        style = "text-align:right"  # a number
    text = f"<code>{html.escape(value)}</code>" if column == 5 else html.escape(value)
    return f"<td style='{style}'>{text}</td>"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
