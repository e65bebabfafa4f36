"""Route a job's output to the cell that started it, and keep a log of it.

ipykernel keeps the parent header of the executing request — which cell output belongs to — in
``contextvars`` for its streams, display publisher and display hook. A job captures the context of
the cell that starts it (its *home*) and everything it shows is sent from a copy of that context:
what it prints and displays (see :mod:`concur_magics.routing`, which also brings in the job's own
threads, executor workers and subprocesses), its value, its traceback and its status line. Output
then carries the originating cell's header while the job runs, after that cell's reply and while
other cells run; frontends keep listening to a cell's messages until it is run again, so it lands
under that cell. When the cell *is* run again while the job runs, the job moves home to the new run
(:meth:`CellOutput.rehome`), so its later output is not lost.

Everything a job shows is also kept in its :class:`OutputLog` (bounded: the last
:data:`LOG_LIMIT` characters), which ``job.output`` and ``%jobs show`` read back — in a notebook run
headless (nbclient, papermill) output that arrives after a cell's reply is otherwise dropped.

The job's status line is a display with a ``display_id``; :class:`StatusLines` refreshes it about
once a second while the job runs, and the job's end refreshes it a last time, with
``update_display_data``, which frontends apply to every output showing that id.

All methods are thread-safe: they publish through the kernel's IOPub thread, whose loop keeps
running while the main thread computes.
"""

from __future__ import annotations

import collections
import contextvars
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .tracebacks import job_traceback
from .tracebacks import format_traceback, with_rendered_traceback  # noqa: F401 - their old home

if TYPE_CHECKING:
    from .jobs import Job

__all__ = ["LOG_LIMIT", "CellOutput", "OutputLog", "StatusLines", "current_job", "enter_job", "flush_streams", "show_job_logs",
           "format_traceback", "with_rendered_traceback", "write_stream"]

T = TypeVar("T")

# The job whose code runs in this context: set by the drivers where a job's work starts, inherited
# by the threads and tasks it starts (see routing.py). None in a cell's own context.
current_job: contextvars.ContextVar[Job | None] = contextvars.ContextVar("concur_current_job", default=None)

# Keys added to ipykernel's parent header in a job's context (JOB_KEY: the job's id) and for writers
# no context names (UNOWNED_KEY); the routing hook takes them off before a message leaves.
JOB_KEY = "concur_job"
UNOWNED_KEY = "concur_unowned"

# Characters of output (stream text, and the text of displays, values and tracebacks) each job's
# log keeps; past it the oldest output is dropped and the log says how much.
LOG_LIMIT = 1_000_000


def untagged(header: dict[str, Any]) -> dict[str, Any]:
    """``header`` without the keys routing adds."""
    return {k: v for k, v in header.items() if k not in (JOB_KEY, UNOWNED_KEY)}


def enter_job(job: Job, shell: Any = None) -> None:
    """Mark the calling context as ``job``'s code: call where a driver starts the job's work, in the
    context it runs in. What it prints or displays is then routed by :mod:`concur_magics.routing`."""
    from . import compat

    current_job.set(job)
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    compat.tag_parent_header(shell, JOB_KEY, job.id)
    job._code_context = contextvars.copy_context()


def _home_context() -> contextvars.Context:
    """A copy of the calling context in which no job's code is running."""
    context = contextvars.copy_context()
    context.run(current_job.set, None)
    return context


class OutputLog:
    """What a job showed, in order: stream text, displays, its value and its traceback.

    Bounded to :data:`LOG_LIMIT` characters: the newest output is kept. Thread-safe.
    """

    def __init__(self, limit: int = LOG_LIMIT) -> None:
        self.limit = limit
        self.dropped = 0  # characters dropped from the front
        self._entries: collections.deque[list[Any]] = collections.deque()
        self._size = 0
        self._lock = threading.Lock()

    def add_stream(self, name: str, text: str) -> None:
        if not text:
            return
        with self._lock:
            last = self._entries[-1] if self._entries else None
            if last is not None and last[0] == "stream" and last[1] == name:
                last[2] += text  # print() writes text and newline apart: keep them one entry
            else:
                self._entries.append(["stream", name, text])
            self._grow(len(text))

    def add_display(self, data: dict[str, Any], metadata: dict[str, Any] | None = None, kind: str = "display",
                    *, display_id: str | None = None, update: bool = False) -> None:
        """Record a display (``kind="value"`` for the job's value).

        ``update=True`` replaces what the displays shown under ``display_id`` hold, as the frontend
        does, so the log shows their last version; an update of a display the job never showed is
        not the job's output.
        """
        entry = [kind, dict(data), dict(metadata or {}), display_id]
        if not update:
            self._add(entry)
            return
        with self._lock:
            for old in self._entries:
                if old[0] == "display" and display_id is not None and old[3] == display_id:
                    self._size += _entry_size(entry) - _entry_size(old)
                    old[1], old[2] = entry[1], entry[2]
            self._grow(0)

    def add_error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        self._add(["error", ename, evalue, list(traceback)])

    def _add(self, entry: list[Any]) -> None:
        size = _entry_size(entry)
        with self._lock:
            self._entries.append(entry)
            self._grow(size)

    def _grow(self, size: int) -> None:
        self._size += size
        while self._size > self.limit and self._entries:
            first = self._entries[0]
            excess = self._size - self.limit
            if first[0] == "stream" and excess < len(first[2]):
                first[2] = first[2][excess:]  # keep the end of a long stream
                removed = excess
            else:
                self._entries.popleft()
                removed = _entry_size(first)
            self._size -= removed
            self.dropped += removed

    def entries(self) -> list[list[Any]]:
        """A snapshot of the entries: ``["stream", name, text]``, ``["display" | "value", data,
        metadata, display_id]``, ``["error", ename, evalue, traceback_lines]``."""
        with self._lock:
            return [list(entry) for entry in self._entries]

    def text(self) -> str:
        """The log as plain text: streams, the ``text/plain`` of displays, tracebacks."""
        from .frontend import strip_ansi

        parts = [f"[... {self.dropped} characters of earlier output dropped ...]\n"] if self.dropped else []
        for entry in self.entries():
            if entry[0] == "stream":
                parts.append(entry[2])
            elif entry[0] in ("display", "value"):
                parts.append(str(entry[1].get("text/plain", "")) + "\n")
            else:
                parts.append(strip_ansi("\n".join(entry[3])) + "\n")
        return "".join(parts)

    def replay(self, shell: Any) -> None:
        """Show the log again in the calling cell (``%jobs show``)."""
        from . import compat

        if self.dropped:
            write_stream("stdout", f"[... {self.dropped} characters of earlier output dropped ...]\n")
        for entry in self.entries():
            if entry[0] == "stream":
                write_stream(entry[1], entry[2])
            elif shell is None:
                write_stream("stdout", OutputLog._plain(entry))
            elif entry[0] in ("display", "value"):
                shell.display_pub.publish(data=entry[1], metadata=entry[2])
            else:
                compat.publish_error(shell, _named_error(entry[1]), _RecordedError(entry[2]), entry[3])

    @staticmethod
    def _plain(entry: list[Any]) -> str:
        from .frontend import strip_ansi

        if entry[0] == "error":
            return strip_ansi("\n".join(entry[3])) + "\n"
        return str(entry[1].get("text/plain", "")) + "\n"


def _entry_size(entry: list[Any]) -> int:
    if entry[0] == "stream":
        return len(entry[2])
    if entry[0] == "error":
        return sum(map(len, entry[3]))
    return sum(len(v) if isinstance(v, str) else len(repr(v)) for v in entry[1].values())


class _RecordedError(Exception):
    """Stands for a recorded error when its traceback is shown again."""


def _named_error(name: str) -> type[BaseException]:
    return type(name, (_RecordedError,), {})


class CellOutput:
    """The output area of the cell that was executing when this object was made (the *home*).

    Without a shell (a script, or a job started with ``show=False``) only what the work itself
    prints is shown; values, tracebacks and status lines are not. With a ``log``, everything shown
    through this object is recorded there too.
    """

    def __init__(self, shell: Any, log: OutputLog | None = None) -> None:
        self.shell = shell
        self.log = log
        self.line_shown = False  # the job's status line is in the home cell (updates go to it)
        self.rehome()

    def rehome(self) -> None:
        """Make the calling cell the home (a rerun of the cell, while the job runs)."""
        from . import compat

        self.context = _home_context()
        # The home's parent header, which routing gives the messages of the job's own code.
        self.header = untagged(compat.parent_header(self.shell))

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn(*args)`` in a fresh copy of the home context (so output goes to the cell).

        A fresh copy each time: a context can't be entered by two threads at once.
        """
        return self.context.copy().run(fn, *args, **kwargs)

    def show_value(self, value: Any) -> None:
        """Show a job's final value in the cell, the way the cell's own result would look."""
        if value is None:
            return
        if self.shell is None:
            if self.log is not None:
                self.log.add_display({"text/plain": repr(value)}, kind="value")
            return
        self.run(self._publish_value, value)

    def _publish_value(self, value: Any) -> None:
        data, metadata = self.shell.display_formatter.format(value)
        flush_streams()  # the job's printed lines reach its log (and the cell) before its value
        if self.log is not None:
            self.log.add_display(data, metadata, kind="value")
        self.shell.display_pub.publish(data=data, metadata=metadata)

    def show_error(self, error: BaseException) -> None:
        """Show the job's traceback in the cell, as IPython shows a failing cell's."""
        if self.shell is None:
            if self.log is not None:
                import traceback

                self.log.add_error(type(error).__name__, str(error), traceback.format_exception(error))
            return
        self.run(self._publish_error, error)

    def _publish_error(self, error: BaseException) -> None:
        from . import compat

        etype = type(error)
        stb = job_traceback(self.shell, error)  # the user's frames only, as in a plain cell
        flush_streams()
        if self.log is not None:
            self.log.add_error(etype.__name__, str(error), stb)
        compat.publish_error(self.shell, etype, error, stb)

    def write(self, name: str, text: str, *, flush: bool = True) -> None:
        """Write ``text`` to the cell's ``stdout`` or ``stderr`` (sent at once with ``flush``, else
        with the stream's next batch, as a print is)."""
        if self.log is not None:
            self.log.add_stream(name, text)
        self.run(write_stream, name, text, flush)

    def start_job(self, job: Job) -> None:
        """Show a job's status line anew (a display that :meth:`refresh_line` updates in place)."""
        self.show(job, job.display_id)
        self.line_shown = True

    def refresh_line(self, job: Job) -> None:
        """Update the job's status line in place, or show it if the cell has none yet."""
        self.show(job, job.display_id, update=self.line_shown)
        self.line_shown = True

    def report(self, job: Job, status: str, value: Any = None, error: BaseException | None = None) -> None:
        """Show how a job ended: its traceback or its value, then its refreshed status line.

        Only shows; the job records its outcome itself (:meth:`Job.settle`).
        """
        if error is not None:
            self.show_error(error)
        elif status == "done":
            self.show_value(value)
        self.refresh_line(job)

    def show(self, obj: Any, display_id: str, *, update: bool = False) -> None:
        """Display ``obj`` under ``display_id`` (or refresh every output showing it); not logged."""
        if self.shell is None:
            return
        self.run(self._publish_display, obj, display_id, update)

    def _publish_display(self, obj: Any, display_id: str, update: bool) -> None:
        data, metadata = self.shell.display_formatter.format(obj)
        self.shell.display_pub.publish(
            data=data, metadata=metadata, transient={"display_id": display_id}, update=update
        )


class StatusLines:
    """Refreshes the status line of every running job about once a second, from one timer on the
    kernel's IOPub loop (which keeps running while a cell blocks the main thread).

    It also notices when the kernel's main loop is held up (a cell computing without awaiting):
    loop and ``%%every`` jobs cannot run then, and their lines say so. The timer starts with the
    first job that shows a line and stops when none runs. Thread-safe.
    """

    INTERVAL = 1.0
    # Jobs refreshed per tick, newest first: a line a second each for more would flood the frontend.
    MOST = 100

    def __init__(self, iopub_loop: Any, jobs: Callable[[], list[Job]], main_loop: Any) -> None:
        self.iopub_loop = iopub_loop  # a tornado IOLoop
        self.jobs = jobs
        self.main_loop = main_loop  # an asyncio loop, or None
        self._timer: Any = None
        self._lock = threading.Lock()
        self._answered = time.monotonic()
        self._woken = False
        self.held_up = False
        self.closed = False

    def wake(self) -> None:
        """A job has started: make sure the timer runs."""
        with self._lock:
            self._woken = True
            if self._timer is not None or self.closed:
                return
            self._timer = True  # starting
        self.iopub_loop.add_callback(self._start)

    def _start(self) -> None:
        from tornado.ioloop import PeriodicCallback

        with self._lock:
            if self.closed:
                self._timer = None
                return
            self._timer = PeriodicCallback(self._tick, self.INTERVAL * 1000)
            self._timer.start()
        self._answered = time.monotonic()  # the main loop is judged from the first ping on
        self._ping()

    def _tick(self) -> None:
        with self._lock:
            self._woken = False
        running = [job for job in self.jobs() if job._began and job._out is not None and job._out.shell is not None]
        if not running:
            self._stop_timer(unless_woken=True)  # not if a job began since the list was read
            return
        self._check_main_loop()
        for job in sorted(running, key=lambda j: j.id, reverse=True)[: self.MOST]:
            job.refresh_status_line(held_up=self.held_up and job.mode in ("loop", "every"))

    def _check_main_loop(self) -> None:
        loop = self.main_loop
        if loop is None or loop.is_closed():
            return
        # The loop answered the ping sent at the last tick, or it is blocked.
        self.held_up = time.monotonic() - self._answered > 1.5 * self.INTERVAL
        self._ping()

    def _ping(self) -> None:
        loop = self.main_loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._answer)
        except RuntimeError:  # closed meanwhile
            pass

    def _answer(self) -> None:
        self._answered = time.monotonic()

    def _stop_timer(self, unless_woken: bool = False) -> None:
        with self._lock:
            if unless_woken and self._woken:
                return
            timer, self._timer = self._timer, None
        if timer is not None and timer is not True:
            timer.stop()

    def close(self) -> None:
        with self._lock:
            self.closed = True
        try:
            self.iopub_loop.add_callback(self._stop_timer)
        except RuntimeError:
            pass


def show_job_logs(jobs: list[Job], shell: Any) -> None:
    """Show each job's output log again in the calling cell (``%jobs show``, ``%jobs wait --show``),
    under a line naming the job, and refresh each job's status line from this cell: a headless run
    (nbclient) applies a display update sent here to the earlier cells that show the line too."""
    for job in jobs:
        print(f"── {job!r}", flush=True)
        job.log.replay(shell)
        if shell is not None and job._began:
            data, metadata = shell.display_formatter.format(job)
            shell.display_pub.publish(data=data, metadata=metadata,
                                      transient={"display_id": job.display_id}, update=True)


def flush_streams() -> None:
    """Send what has been printed so far (and let routing log it) before what comes next."""
    sys.stdout.flush()
    sys.stderr.flush()


def write_stream(name: str, text: str, flush: bool = True) -> None:
    """Write to this context's ``sys.stdout`` (or ``sys.stderr`` for ``name == "stderr"``), at once
    with ``flush``."""
    stream = sys.stderr if name == "stderr" else sys.stdout
    stream.write(text)
    if flush:
        stream.flush()
