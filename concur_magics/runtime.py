"""The one owner of everything the extension starts.

A :class:`Runtime` is created by ``%load_ext concur_magics`` (or by the first API call outside
IPython, see :meth:`Runtime.current`). It holds the kernel's loop, the job table, the clocks,
process-mode children, the Dask connection, the deadline engine's thread and the worker threads of
thread jobs. :meth:`Runtime.close` — called by ``%unload_ext``, kernel shutdown and interpreter exit —
stops all of it; nothing it started outlives it.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, ClassVar

from . import compat
from .cluster import Cluster
from .deadlines import SIGNUM, Engine
from .jobs import Job
from .table import CellActivity, JobTable
from .output import UNOWNED_KEY, StatusLines
from .pool import WorkerPool
from .process import Children
from .routing import Routing

if TYPE_CHECKING:
    from .dask_jobs import DaskSession
    from .schedule import Clock

__all__ = ["Runtime"]


class Runtime:
    """Everything running on behalf of one shell (or one script). Thread-safe; ``close`` is
    idempotent and bounded.

    Attributes
    ----------
    shell:
        The IPython shell, or None outside IPython.
    loop:
        The kernel's asyncio loop (the one running when the extension loaded), or None.
    jobs, activity, deadlines, clocks, children, cluster, workers:
        The job table, foreground-cell activity, the deadline engine, running clocks by id,
        process-mode children, the Dask connection and the pool of job threads.
    routing, status_lines:
        What carries a job's cell into the threads and subprocesses it starts, and the timer that
        refreshes running jobs' status lines (both once there is a kernel shell, see :meth:`route`).
    """

    _current: ClassVar[Runtime | None] = None
    _current_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, shell: Any = None) -> None:
        self.shell = shell
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None  # a terminal IPython or a script: loop jobs use the caller's loop
        self.activity = CellActivity()
        self.jobs = JobTable(activity=self.activity)
        self.deadlines = Engine()
        self.clocks: dict[int, Clock] = {}
        self.children = Children()
        self.cluster = Cluster()
        self._dask: DaskSession | None = None
        self.workers = WorkerPool()
        self.routing = Routing(self.jobs)
        self.status_lines: StatusLines | None = None
        self.activity.on_start.add(self._cell_started)
        self.closed = False
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._previous_handler: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(SIGNUM, self.deadlines.on_signal)
            self.deadlines.signal_installed = True
        atexit.register(self.close)

    @classmethod
    def current(cls) -> Runtime:
        """The runtime of the loaded extension, or one made now for API use outside IPython.

        In a forked child (process mode) the parent's runtime is a copy whose threads do not exist
        here; the child gets a runtime of its own.
        """
        with cls._current_lock:
            current = cls._current
            if current is None or current.closed or current.pid != os.getpid():
                shell = current.shell if current is not None and not current.closed else None
                current = cls._current = Runtime(shell)
            return current

    @classmethod
    def activate(cls, shell: Any) -> Runtime:
        """Make a runtime for ``shell`` the current one (``%load_ext``).

        One the API made earlier in this process (jobs started before the extension was loaded) is
        adopted, not closed, so its jobs go on.
        """
        with cls._current_lock:
            current = cls._current
            if current is not None and not current.closed and current.shell in (None, shell):
                current.shell = shell
                if current.loop is None:
                    try:
                        current.loop = asyncio.get_running_loop()
                    except RuntimeError:
                        pass
            else:
                current = cls._current = Runtime(shell)
        current.route(shell)
        return current

    @classmethod
    def deactivate(cls, runtime: Runtime) -> None:
        """Close ``runtime`` and stop it being current."""
        with cls._current_lock:
            if cls._current is runtime:
                cls._current = None
        runtime.close()

    def route(self, shell: Any) -> None:
        """Route what jobs start to their cells, and refresh their status lines, in ``shell``'s
        kernel (idempotent; nothing to do outside IPython)."""
        if shell is None or self.closed:
            return
        self.routing.install(shell)
        with self._lock:
            if self.status_lines is not None:
                return
            loop = compat.iopub_loop(shell)
            if loop is None:
                return
            self.status_lines = StatusLines(loop, self.jobs.running, self.loop)
            self.jobs.on_begin = self._job_began

    def _job_began(self, job: Job) -> None:
        if self.status_lines is not None and job._out is not None and job._out.shell is not None:
            self.status_lines.wake()

    def _cell_started(self) -> None:
        """A cell starts: jobs of an earlier run of *this* cell move their output here, since the
        frontend has cleared the earlier run's output and no longer listens to it."""
        compat.tag_unowned(UNOWNED_KEY)
        cell, run = compat.execution(self.shell)
        if cell is None:
            return
        for job in self.jobs.running():
            if job.cell == cell and job.run != run and job._out is not None and job._out.shell is not None:
                job._out.rehome()
                job._out.start_job(job)  # its status line, shown again in the new run

    def dask(self) -> DaskSession:
        """This runtime's use of the Dask cluster (its jobs there), made on first use."""
        from .dask_jobs import DaskSession

        with self._lock:
            if self._dask is None:
                self._dask = DaskSession(self.cluster)
            return self._dask

    def kernel_loop(self) -> asyncio.AbstractEventLoop | None:
        """The kernel's loop if it is running, for work started from other threads."""
        loop = self.loop
        return loop if loop is not None and loop.is_running() and not loop.is_closed() else None

    def close(self) -> None:
        """Stop everything this runtime started: clocks, jobs and their threads, schedules,
        process-mode children, the Dask client and a local cluster, the deadline thread."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        atexit.unregister(self.close)
        for clock in list(self.clocks.values()):
            clock.stop()
        stuck = self.jobs.cancel_all(join=2.0)
        if stuck:
            names = ", ".join(job.label for job in stuck)
            print(f"concur_magics: jobs still running after cancel (stuck in C code?): {names}", file=sys.stderr)
        self.workers.close()
        self.routing.close()
        if self.status_lines is not None:
            self.status_lines.close()
        self.children.kill_all()
        self.cluster.close("concur_magics was unloaded (or the kernel shut down)")
        self.deadlines.close()
        if self.deadlines.signal_installed and threading.current_thread() is threading.main_thread():
            if signal.getsignal(SIGNUM) == self.deadlines.on_signal:
                signal.signal(SIGNUM, self._previous_handler)
            self.deadlines.signal_installed = False
