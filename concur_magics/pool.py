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
    """Named worker threads for thread jobs. :meth:`submit` and :meth:`close` are thread-safe."""

    def __init__(self, idle_kept: int = IDLE_KEPT) -> None:
        self.idle_kept = idle_kept
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads: set[threading.Thread] = set()
        self._closed = False

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on an idle worker, or on a new one."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the job threads have been closed (the extension was unloaded)")
            # Through the queue even for a new thread: a Thread keeps its args until it ends,
            # which would keep the first job's result alive as long as the thread idles.
            self._queue.put(fn)
            if self._idle > 0:
                self._idle -= 1
                return
            thread = threading.Thread(target=self._work, name="concur-job", daemon=True)
            self._threads.add(thread)
        thread.start()

    def _work(self) -> None:
        me = threading.current_thread()
        fn = self._queue.get()
        while fn is not None:
            me.name = "concur-job"
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - fn reports its own failures; never die silently
                print(f"concur_magics: a job thread failed: {exc!r}", file=sys.stderr)
            me.name = "concur-job-idle"
            fn = None  # an idle thread keeps nothing of its last job alive
            with self._lock:
                if self._closed or self._idle >= self.idle_kept:
                    self._threads.discard(me)
                    return
                self._idle += 1
            fn = self._next(me)

    def _next(self, me: threading.Thread) -> Callable[[], None] | None:
        """The next job for an idle worker, or None when it should leave."""
        try:
            return self._queue.get(timeout=IDLE_LINGER)
        except queue.Empty:
            pass
        with self._lock:
            # Under the lock, so a job handed to "an idle thread" meanwhile is not left behind.
            if not self._queue.empty():
                return self._queue.get_nowait()
            self._idle -= 1
            self._threads.discard(me)
            return None

    @property
    def threads(self) -> int:
        """How many worker threads exist now (busy or idle)."""
        with self._lock:
            return len(self._threads)

    def close(self, timeout: float = 2.0) -> list[threading.Thread]:
        """Let idle workers leave and wait up to ``timeout`` s for busy ones; return those still alive."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, 0
            threads = list(self._threads)
        for _ in range(idle):
            self._queue.put(None)
        for thread in threads:
            thread.join(timeout / max(1, len(threads)))
        return [thread for thread in threads if thread.is_alive()]
