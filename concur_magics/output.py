"""Route a job's output to the cell that started it.

ipykernel keeps the parent header of the executing request — which cell output belongs to — in
``contextvars`` for its streams, display publisher and display hook. A job captures the context of
the cell that starts it and runs everything in a copy of it: its thread, its task, and the calls
below that show its value, its traceback and its status. Output then carries the originating
cell's header while the job runs, after that cell's reply and while other cells run; frontends keep
listening to a cell's messages until it is run again, so it lands under that cell.

The job's status line is a display with a ``display_id``; when the job ends it is refreshed with
``update_display_data``, which frontends apply to every output showing that id.

All methods are thread-safe: they publish through the kernel's IOPub thread, whose loop keeps
running while the main thread computes.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .tracebacks import job_traceback
from .tracebacks import format_traceback, with_rendered_traceback  # noqa: F401 - their old home

if TYPE_CHECKING:
    from .jobs import Job

__all__ = ["CellOutput", "format_traceback", "with_rendered_traceback", "write_stream"]

T = TypeVar("T")


class CellOutput:
    """The output area of the cell that was executing when this object was made.

    Without a shell (a script, or a job started with ``show=False``) only what the work itself
    prints is shown; values, tracebacks and status lines are not.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.context = contextvars.copy_context()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` in a fresh copy of the cell's context (so prints go to the cell).

        A fresh copy each time: a context can't be entered by two threads at once.
        """
        return self.context.copy().run(fn, *args)

    def show_value(self, value: Any) -> None:
        """Show a job's final value in the cell, the way the cell's own result would look."""
        if value is None or self.shell is None:
            return
        self.run(self._publish_value, value)

    def _publish_value(self, value: Any) -> None:
        data, metadata = self.shell.display_formatter.format(value)
        self.shell.display_pub.publish(data=data, metadata=metadata)

    def show_error(self, error: BaseException) -> None:
        """Show the job's traceback in the cell, as IPython shows a failing cell's."""
        if self.shell is None:
            return
        self.run(self._publish_error, error)

    def _publish_error(self, error: BaseException) -> None:
        from . import compat

        etype = type(error)
        stb = job_traceback(self.shell, error)  # the user's frames only, as in a plain cell
        compat.publish_error(self.shell, etype, error, stb)

    def write(self, name: str, text: str) -> None:
        """Write ``text`` to the cell's ``stdout`` or ``stderr``."""
        self.run(write_stream, name, text)

    def start_job(self, job: Job) -> None:
        """Show a job's status line (a display that :meth:`report` updates in place)."""
        self.show(job, job.display_id)

    def report(self, job: Job, status: str, value: Any = None, error: BaseException | None = None) -> None:
        """Show how a job ended: its traceback or its value, then its refreshed status line.

        Only shows; the job records its outcome itself (:meth:`Job.settle`).
        """
        if error is not None:
            self.show_error(error)
        elif status == "done":
            self.show_value(value)
        self.show(job, job.display_id, update=job._began)

    def show(self, obj: Any, display_id: str, *, update: bool = False) -> None:
        """Display ``obj`` under ``display_id`` (or refresh every output showing it)."""
        if self.shell is None:
            return
        self.run(self._publish_display, obj, display_id, update)

    def _publish_display(self, obj: Any, display_id: str, update: bool) -> None:
        data, metadata = self.shell.display_formatter.format(obj)
        self.shell.display_pub.publish(
            data=data, metadata=metadata, transient={"display_id": display_id}, update=update
        )


def write_stream(name: str, text: str) -> None:
    """Write to this context's ``sys.stdout`` (or ``sys.stderr`` for ``name == "stderr"``) at once."""
    stream = sys.stderr if name == "stderr" else sys.stdout
    stream.write(text)
    stream.flush()
