"""One deadline engine: scopes that can only ever fire into the code inside them.

A :class:`Scope` is one deadline, entered and exited once. How it stops the work depends on where
the work runs:

* inside an asyncio task (a loop job, a cell that awaits): the loop's own timer (``loop.call_at``)
  cancels the task at its ``await``; no thread is involved.
* in the main thread: the engine's thread sends a real-time signal (``pthread_kill``), whose
  handler raises :class:`CellTimeout` in the running Python code; the signal interrupts
  ``time.sleep`` and blocking waits.
* in any other thread: the engine raises it there at the next bytecode (``PyThreadState_SetAsyncExc``).

Every blocking deadline of a process is served by one thread (:class:`Engine`), a heap of due times;
it starts on the first deadline and leaves after a second with nothing to do.

Race-freedom: a scope is ``active`` only between the end of its ``__enter__`` and the start of its
``__exit__``. The engine interrupts a thread only while holding the scope's lock and only while the
scope is active; ``__exit__`` takes the same lock, deactivates the scope, and takes delivery of a
raise that was requested but had not yet arrived, so it cannot surface in the code that follows. A
signal that arrives late finds no active scope and does nothing.

A raise requested just as the block ends is delivered at the interpreter's next check, which may be
inside our own code that enters or leaves the scope (every Python function checks on entry).
Leaving is therefore repeated until it is complete whatever lands in it (:meth:`Scope.exit`). And
before raising again the engine makes sure the block is still running
(:meth:`Scope._block_is_over`): if the raise landed before leaving could begin (on the first
instruction of ``__exit__``), or CPython 3.13.0 carried it past the ``with`` statement without
calling ``__exit__`` at all (python/cpython#139622), the scope is retired instead. A thread that has
ended is never raised into, whatever thread is later given its id.
Expiry is a state the scope checks on the way out: work that ran past its deadline without being
stopped (C code holding the GIL, or code that caught the exception) fails there with
``CellTimeout`` too, so it never returns its value silently.

After the first raise the engine raises again every second, but only while the code is not
handling a ``CellTimeout`` (in an ``except`` or ``finally`` block): cleanup is never cut off, and code
that swallowed the exception and carried on gets it again.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from . import compat

__all__ = ["MAX_SECONDS", "CellTimeout", "Engine", "Entry", "Scope", "check_seconds"]

# The longest wait the platform's primitives can all express: poll() and select() take their timeout
# in milliseconds as a C int (2**31 - 1 ms, about 24.8 days).
MAX_SECONDS = 2_147_483.0
# Seconds between repeated raises into code that caught the deadline's exception and carried on.
REPEAT = 1.0
# Seconds an idle engine thread waits for a new deadline before it leaves.
LINGER = 1.0
# Seconds after a task's deadline by which its loop should have run the deadline's timer; if it
# has not, the loop is blocked (the task computes) and the engine interrupts the task itself.
LOOP_SLACK = 0.005

_STEPS = {
    "raised": "CellTimeout was raised in the running Python code",
    "cancelled": "the cell's task was cancelled at its await",
    "killed": "its process and process group were killed with SIGKILL",
    "worker": "the Dask task was cancelled and the worker process running it was killed",
    "overdue": "the job was interrupted, but its code caught that and is still running (it is "
    "interrupted again every second); the job was ended without it",
    "overran": "the work was not interrupted before the deadline (a limit shorter than the work, "
    "C code holding the interpreter, or code that caught CellTimeout) and failed when it returned",
}


class CellTimeout(TimeoutError):
    """The work ran past its deadline and was stopped.

    Attributes
    ----------
    limit:
        The time limit in seconds.
    mode:
        ``"signal"``, ``"process"``, ``"dask"``, or for jobs ``"thread"`` / ``"loop"``.
    step:
        How the work was stopped: ``"raised"``, ``"cancelled"``, ``"killed"``, ``"worker"`` or
        ``"overran"`` (it could not be interrupted; it failed when it returned).
    """

    def __init__(self, limit: float, mode: str, step: str, detail: str = "") -> None:
        self.limit = limit
        self.mode = mode
        self.step = step
        self.detail = detail
        message = f"time limit of {limit:g} s exceeded (mode: {mode}); stopped: {_STEPS[step]}"
        super().__init__(message + (f" {detail}" if detail else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (CellTimeout, (self.limit, self.mode, self.step, self.detail))


CellTimeout.__module__ = "concur_magics"  # its public home


def check_seconds(seconds: float, what: str = "a time limit") -> float:
    """Return ``seconds`` as a float, or raise ValueError unless ``0 < seconds <= MAX_SECONDS``."""
    try:
        value = float(seconds)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} must be a number of seconds, got {_short(seconds)}") from None
    if not 0 < value <= MAX_SECONDS:
        raise ValueError(
            f"{what} must be more than 0 and at most {MAX_SECONDS:.0f} s (24.8 days, the longest "
            f"wait the platform can express), got {_short(seconds)}"
        )
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"


def _pick_signal() -> int:
    rtmin = getattr(signal, "SIGRTMIN", None)
    return int(rtmin) + 3 if rtmin is not None else int(signal.SIGALRM)


# SIGRTMIN + 3 rather than SIGALRM, so code that uses signal.alarm keeps working in a timed cell.
SIGNUM = _pick_signal()


def _nothing() -> None:
    """What a cancelled :class:`Entry` calls: nothing."""


class Entry:
    """A call the engine will make at a monotonic time, unless cancelled first."""

    __slots__ = ("when", "fn", "cancelled", "engine")

    def __init__(self, when: float, fn: Callable[[], None], engine: Engine) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False
        self.engine = engine

    def cancel(self) -> None:
        """Forget this call (idempotent; thread-safe)."""
        self.engine.cancel(self)


class Engine:
    """One thread that serves every blocking deadline: a heap of :class:`Entry` due times.

    :meth:`call_at`, :meth:`cancel` and :meth:`close` are thread-safe. Calls run on the engine's
    thread and must be short.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Entry]] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        # Scopes per thread ident, outermost first; each list is touched only by its own thread
        # (enter, exit, and the signal handler, which runs in that thread).
        self.stacks: dict[int, list[Scope]] = {}
        # Set by the owner once `on_signal` handles SIGNUM (only the main thread can install it);
        # until then the main thread is interrupted like any other thread.
        self.signal_installed = False
        self.timeout_type: type[CellTimeout] = type(
            "CellTimeout", (_ThreadTimeout,), {"engine": self, "__module__": "concur_magics"}
        )

    def call_at(self, when: float, fn: Callable[[], None]) -> Entry:
        """Call ``fn()`` on the engine's thread at monotonic time ``when``."""
        entry = Entry(when, fn, self)
        with self._cond:
            if self._closed:
                return entry
            heapq.heappush(self._heap, (when, next(self._seq), entry))
            self._start_locked()
            if self._heap[0][2] is entry:
                self._cond.notify()
        return entry

    def start(self) -> None:
        """Make sure the thread runs (it leaves after LINGER s idle)."""
        with self._cond:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="concur-deadlines", daemon=True)
            self._thread.start()

    def call_later(self, seconds: float, fn: Callable[[], None]) -> Entry:
        """Call ``fn()`` on the engine's thread ``seconds`` from now."""
        return self.call_at(time.monotonic() + seconds, fn)

    def cancel(self, entry: Entry) -> None:
        """Forget ``entry`` (idempotent); the heap is compacted when most of it is cancelled."""
        with self._cond:
            if entry.cancelled:
                return
            entry.cancelled = True
            entry.fn = _nothing  # the call may hold a scope, its task and frames: let them go now
            self._cancelled += 1
            if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
                self._heap = [item for item in self._heap if not item[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    @property
    def running(self) -> bool:
        """Whether the engine's thread is alive now."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Drop every deadline and stop the thread (bounded; complains if it does not stop)."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            thread = self._thread
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():  # pragma: no cover - would mean a call that blocks
                print("concur_magics: the deadline thread did not stop within 5 s", file=sys.stderr)

    def _run(self) -> None:
        while True:
            with self._cond:
                due = self._next_due()
                if due is None:
                    self._thread = None
                    return
                fn = due.fn  # read under the lock: cancel() replaces it
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - one bad call must not stop every deadline
                print(f"concur_magics: a deadline callback failed: {exc!r}", file=sys.stderr)
            del fn, due  # hold nothing of the call (its scope, frames) while waiting for the next

    def _next_due(self) -> Entry | None:
        """Wait (holding the condition) for the next entry that is due; None means leave."""
        idle_since: float | None = None
        while not self._closed:
            now = time.monotonic()
            while self._heap and self._heap[0][2].cancelled:
                heapq.heappop(self._heap)
                self._cancelled = max(0, self._cancelled - 1)
            if self._heap:
                idle_since = None
                when, _, entry = self._heap[0]
                if when <= now:
                    heapq.heappop(self._heap)
                    return entry
                self._cond.wait(min(when - now, MAX_SECONDS))
                continue
            idle_since = idle_since if idle_since is not None else now
            if now - idle_since >= LINGER:
                return None
            self._cond.wait(LINGER - (now - idle_since))
        return None

    # ------------------------------------------------------------------ the signal handler
    def on_signal(self, signum: int, frame: Any) -> None:
        """Raise CellTimeout for the outermost expired scope of this thread whose code is running."""
        for scope in self.stacks.get(threading.get_ident(), ()):
            if not (scope.expired and scope.active):
                continue
            if scope.task is not None and _current_task() is not scope.task:
                continue  # the loop or another task runs: the loop's timer handles that task
            handling = sys.exc_info()[1]
            if _handling_timeout(handling) or isinstance(handling, asyncio.CancelledError):
                return  # cleanup after a CellTimeout (or the deadline's cancel) runs undisturbed
            scope.raised += 1
            scope.landed = scope.error("raised")
            raise scope.landed


class Scope:
    """One deadline around one block of code; see the module docstring for how it fires.

    Created by :class:`concur_magics.timeout`; ``enter``/``exit`` are called by the thread that runs
    the block. ``expired`` and ``raised`` are read by the engine and the signal handler.
    """

    def __init__(self, engine: Engine, limit: float, mode: str = "signal", grace: float = 0.5) -> None:
        self.engine = engine
        self.limit = check_seconds(limit)
        self.mode = mode
        self.grace = grace
        self.lock = threading.Lock()
        self.active = False
        self.expired = False
        self.raised = 0
        self.delivered = 0  # raises that reached the thread (counted by the exception itself)
        self.step = "raised"
        self.deadline = 0.0
        self.thread_id = 0
        self.thread: threading.Thread | None = None
        self.owner: FrameType | None = None
        self.task: asyncio.Task[Any] | None = None
        self.landed: BaseException | None = None  # the last raise delivered into the thread
        self._entries: list[Entry] = []
        self._handle: asyncio.TimerHandle | None = None
        self._context: contextvars.Context | None = None
        self._noticed = False

    def error(self, step: str, detail: str = "") -> CellTimeout:
        return CellTimeout(self.limit, self.mode, step, detail)

    def enter(self, owner: FrameType | None = None) -> None:
        """Start the clock; ``owner`` is the frame running the block (the ``with`` statement's)."""
        self.engine.start()  # before the clock starts: our set-up is not the user's time
        self.thread_id = threading.get_ident()
        self.thread = threading.current_thread()
        self.owner = owner
        self.task = _current_task()
        # The caller's context: in ipykernel it carries the cell's parent header, so a notice
        # printed from the engine's thread appears in the cell being timed.
        self._context = contextvars.copy_context()
        stack = self.engine.stacks.setdefault(self.thread_id, [])
        stack[:] = [scope for scope in stack if scope.active]  # retired by the engine (see _fire)
        stack.append(self)
        self.deadline = time.monotonic() + self.limit
        if self.task is not None:
            loop = self.task.get_loop()
            self._handle = loop.call_at(loop.time() + self.limit, self._cancel_task)
            # The loop's timer comes first; the engine steps in only if the loop could not run it
            # (the task is computing and blocks the loop).
            first = self.deadline + LOOP_SLACK
        else:
            first = self.deadline
        self._entries.append(self.engine.call_at(first, self._fire))
        with self.lock:
            self.active = True

    def exit(self, exc: BaseException | None) -> BaseException | None:
        """Leave the scope; return the exception the block should end with (None: no change).

        The deadline may fire just as the block ends, so its raise (or the user's interrupt) can land
        anywhere in here: leaving is repeated until it is complete. A CellTimeout that lands is the
        deadline passing (``expired``); a KeyboardInterrupt goes on once the scope is left.
        """
        interrupted: BaseException | None = None
        while True:
            try:
                self._leave()
                break
            except BaseException as landed:  # noqa: BLE001 - finish leaving first, whatever it was
                if not isinstance(landed, CellTimeout):
                    interrupted = landed
        if interrupted is not None:
            raise interrupted
        late = time.monotonic() - self.deadline
        if isinstance(exc, asyncio.CancelledError) and self.step == "cancelled":
            if self.task is not None:
                self.task.uncancel()
            return self.error("cancelled")
        if isinstance(exc, CellTimeout):
            return None
        if exc is None and (self.expired or late >= 0):
            return self.error("overran", f"(it ran {max(late, 0):.1f} s past the limit)")
        return None

    def _leave(self) -> None:
        """Deactivate, take delivery of a raise still on its way, drop the timers and the stack
        entry; safe to repeat after an interruption at any point."""
        with self.lock:
            self.active = False
        self.owner = None
        if self.raised > self.delivered:
            compat.absorb(self.engine.timeout_type)  # requested before we left; must not outlive us
        for entry in self._entries:
            self.engine.cancel(entry)
        if self._handle is not None:
            self._handle.cancel()
        stack = self.engine.stacks.get(self.thread_id, [])
        if self in stack:
            stack.remove(self)
        if not stack:
            self.engine.stacks.pop(self.thread_id, None)
        self.landed = None  # its traceback holds the block's frames, and they hold this scope

    # ------------------------------------------------------------------ engine side
    def _cancel_task(self) -> None:
        """On the task's loop, at the deadline: cancel the task at its ``await``."""
        if self.active and self.task is not None and not self.task.done():
            self.expired = True
            self.step = "cancelled"
            self.task.cancel(msg="concur_magics deadline")

    def _fire(self, again: bool = False) -> None:
        """On the engine's thread: stop the work, then remind and repeat while it runs on."""
        with self.lock:
            if not self.active:
                return
            if again and self._block_is_over():
                # Our raise ended the block, yet __exit__ never left the scope: retire it. Its
                # thread drops it from its stack when it next enters a scope.
                self.active = False
                return
            self.expired = True
            if self.task is None:
                self._interrupt()
            elif self.step != "cancelled":
                # The loop's timer has not run: the task computes, blocking the loop. Interrupt it,
                # and cancel it when it next awaits.
                self.task.get_loop().call_soon_threadsafe(self._cancel_task)
                if _loop_is_main(self.task):
                    self._interrupt()
            elif again and _loop_is_main(self.task):
                # Cancelled once, as asyncio.timeout does: a task may run cleanup that awaits, so it
                # is not cancelled again; if it computes past the deadline, it is interrupted.
                self._interrupt()
        delay = REPEAT if self._noticed else self.grace
        self._entries.append(self.engine.call_at(time.monotonic() + delay, self._remind))

    def _block_is_over(self) -> bool:
        """Whether the block ended without leaving the scope, which a raise can cause in two ways:
        it landed in the code that enters or leaves this very scope (on the first instruction of
        ``__exit__``, say), or CPython 3.13.0 delivered it past the handlers of the frame it landed
        in, ``with`` included (python/cpython#139622), so the block's frame is gone. Or the thread
        itself has ended."""
        if self.thread is not None and not self.thread.is_alive():
            return True
        if self.task is None and self.owner is not None and not compat.is_running_in(self.thread_id, self.owner):
            return True  # (a task's frame is off the stack whenever it awaits: not a sign there)
        landed = self.landed  # read once: the thread may be leaving, which clears it
        tb = landed.__traceback__ if landed is not None else None
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code in EDGES:
                owner = frame.f_locals.get("self")
                if owner is self or getattr(owner, "_scope", None) is self:
                    return True
            tb = tb.tb_next
        return False

    def _remind(self) -> None:
        with self.lock:
            if not self.active:
                return
        if not self._noticed:
            self._notice()
        self._fire(again=True)

    def _interrupt(self) -> None:
        # Caller holds self.lock and has checked self.active.
        if self.thread_id == compat.main_thread_id() and self.engine.signal_installed:
            signal.pthread_kill(self.thread_id, SIGNUM)
        elif self.task is None and not _handling_timeout(compat.handled_exception(self.thread_id)):
            self.raised += 1
            compat.async_raise(self.thread_id, self.engine.timeout_type)

    def _notice(self) -> None:
        self._noticed = True
        if self._context is not None:
            self._context.run(_late_notice, self, time.monotonic() - self.deadline)


class _ThreadTimeout(CellTimeout):
    """What a deadline raises in another thread. The C API takes a class, not an instance, so each
    engine has its own subclass (``engine.timeout_type``) that finds its expired scope when raised."""

    engine: Engine | None = None

    def __init__(self, *args: Any) -> None:
        if args:  # copied or unpickled
            super().__init__(*args)
            return
        stack = self.engine.stacks.get(threading.get_ident(), []) if self.engine is not None else []
        scope = next((scope for scope in stack if scope.raised > scope.delivered), None)
        if scope is not None:
            scope.delivered += 1
            scope.landed = self
        super().__init__(scope.limit if scope is not None else 0.0, "signal", "raised")

    def __reduce__(self) -> tuple[Any, ...]:
        return (CellTimeout, (self.limit, self.mode, self.step, self.detail))


# The code that enters and leaves scopes (``timeout`` adds its ``__enter__``/``__exit__``): a raise
# that lands in it did not land in a block (see Scope._block_is_over).
EDGES: set[Any] = {Scope.enter.__code__, Scope.exit.__code__, Scope._leave.__code__}


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def _loop_is_main(task: asyncio.Task[Any]) -> bool:
    return compat.loop_thread_id(task.get_loop()) == compat.main_thread_id()


def _handling_timeout(exc: BaseException | None) -> bool:
    """Whether ``exc`` (the exception being handled) is, or was caused while handling, a CellTimeout."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, CellTimeout):
            return True
        exc = exc.__context__
        seen += 1
    return False


def _late_notice(scope: Scope, late: float) -> None:
    if scope.task is not None and scope.step == "cancelled":
        print(
            f"\n[concur_magics] the cell's task was cancelled at the {scope.limit:g} s deadline and "
            f"is still running {late:.1f} s later (cleanup that awaits, or code that caught the "
            "cancellation); it is not cancelled again.",
            file=sys.stderr,
            flush=True,
        )
        return
    if _handling_timeout(compat.handled_exception(scope.thread_id)):
        print(
            f"\n[concur_magics] the {scope.limit:g} s deadline has passed; the code is running its "
            "cleanup (an except or finally block), which is not interrupted.",
            file=sys.stderr,
            flush=True,
        )
        return
    if scope.raised:
        print(
            f"\n[concur_magics] CellTimeout was raised at the {scope.limit:g} s deadline, but the "
            "code caught it and kept running; it is raised again every second until the code stops.",
            file=sys.stderr,
            flush=True,
        )
        return
    print(
        f"\n[concur_magics] still running {late:.1f} s after the {scope.limit:g} s deadline: the "
        "code is inside a call (probably C code) that does not return to the Python interpreter, "
        "so it cannot be interrupted until that call ends. Use `%%timeout "
        f"{scope.limit:g} --mode process` (or run_with_timeout(..., mode='process')) to have it "
        "killed at the deadline.",
        file=sys.stderr,
        flush=True,
    )
