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

from .cluster import Cluster
from .deadlines import SIGNUM, Engine
from .jobs import CellActivity, JobTable
from .pool import WorkerPool
from .process import Children

if TYPE_CHECKING:
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
        self.workers = WorkerPool()
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
                return current
            cls._current = Runtime(shell)
            return cls._current

    @classmethod
    def deactivate(cls, runtime: Runtime) -> None:
        """Close ``runtime`` and stop it being current."""
        with cls._current_lock:
            if cls._current is runtime:
                cls._current = None
        runtime.close()

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
        self.children.kill_all()
        self.cluster.close()
        self.deadlines.close()
        if self.deadlines.signal_installed and threading.current_thread() is threading.main_thread():
            if signal.getsignal(SIGNUM) == self.deadlines.on_signal:
                signal.signal(SIGNUM, self._previous_handler)
            self.deadlines.signal_installed = False
