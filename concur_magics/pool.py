"""The threads that run thread jobs: started on demand, a few kept waiting for the next job.

Starting a thread costs more than handing work to one that waits, and jobs often come in bursts;
so up to :data:`IDLE_KEPT` idle threads, named ``concur-job-idle``, wait up to :data:`IDLE_LINGER`
seconds for the next job, then leave; closing the owner ends them at once. Each job still runs in a
copy of its own cell's context (the caller's ``fn`` does that), so a reused thread carries nothing
from one job to the next.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable

__all__ = ["IDLE_KEPT", "WorkerPool"]

IDLE_KEPT = 4
IDLE_LINGER = 5.0


class WorkerPool:
    """Named worker threads for thread jobs. :meth:`submit` and :meth:`close` are thread-safe.

    Bookkeeping, under one lock: ``_queued`` jobs not yet taken, ``_waiting`` threads blocked on the
    queue. A job gets a new thread unless enough threads are waiting for it, so no job ever waits
    behind another job. New threads are started by a starter thread (``concur-job-starter``, which
    also leaves when idle): ``Thread.start()`` waits until the new thread runs, which on a busy
    interpreter can take milliseconds, and the cell that launches a job should not wait for that.
    """

    def __init__(self, idle_kept: int = IDLE_KEPT) -> None:
        self.idle_kept = idle_kept
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0
        self._waiting = 0
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._wanted = 0  # threads the starter was asked for
        self._starting = 0  # threads started that have not yet reached the queue
        self._starter: threading.Thread | None = None
        self._more = threading.Event()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on a waiting worker, or on a new one."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the job threads have been closed (the extension was unloaded)")
            self._queue.put(fn)
            self._queued += 1
            if self._waiting + self._starting + self._wanted >= self._queued:
                return
            self._wanted += 1
            starter = self._starter
            if starter is None:
                starter = self._starter = threading.Thread(
                    target=self._start_threads, name="concur-job-starter", daemon=True
                )
                self._threads.add(starter)
        if starter.ident is None:
            starter.start()  # only the first job after a quiet spell waits for a thread to start
        else:
            self._more.set()

    def _start_threads(self) -> None:
        me = threading.current_thread()
        while True:
            # One at a time, looking again after each: starting one takes a while, and threads
            # that finished their jobs meanwhile may have taken the rest.
            with self._lock:
                need = 0 if self._closed else max(0, self._queued - self._waiting - self._starting)
                if need:
                    self._starting += 1
                    thread = threading.Thread(target=self._work, name="concur-job", daemon=True)
                    self._threads.add(thread)
                else:
                    self._wanted = 0
            if need:
                thread.start()
                continue
            if self._more.wait(IDLE_LINGER) and not self._closed:
                self._more.clear()
                continue
            with self._lock:
                if self._wanted == 0 or self._closed:
                    self._starter = None
                    self._threads.discard(me)
                    return

    def _work(self) -> None:
        me = threading.current_thread()
        first = True
        while True:
            fn = self._next(first)
            first = False
            if fn is None:
                with self._lock:
                    self._threads.discard(me)
                return
            me.name = "concur-job"
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - fn reports its own failures; never die silently
                print(f"concur_magics: a job thread failed: {exc!r}", file=sys.stderr)
            # Nothing of the last job stays alive in an idle thread.
            fn = None  # noqa: F841
            me.name = "concur-job-idle"
            with self._lock:
                if self._closed or self._waiting >= self.idle_kept:
                    self._threads.discard(me)
                    return

    def _next(self, first: bool = False) -> Callable[[], None] | None:
        """The next job, or None when this thread should leave (idle too long, or closing)."""
        with self._lock:
            self._waiting += 1
            self._starting -= first
        try:
            fn = self._queue.get(timeout=IDLE_LINGER)
        except queue.Empty:
            fn = None
        with self._lock:
            self._waiting -= 1
            if fn is None and not self._closed and not self._queue.empty():
                fn = self._queue.get_nowait()  # handed out while we gave up: take it, don't strand it
            if fn is not None:
                self._queued -= 1
            return fn

    @property
    def threads(self) -> int:
        """How many worker threads exist now (busy or idle)."""
        with self._lock:
            return len(self._threads)

    def close(self, timeout: float = 2.0) -> list[threading.Thread]:
        """Let idle workers leave and wait up to ``timeout`` s for busy ones; return those still alive."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        self._more.set()
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(timeout / max(1, len(threads)))
        return [thread for thread in threads if thread.is_alive()]
