"""Deadlines that really stop the work.

Two modes, two mechanisms:

``signal``
    A watchdog thread waits for the deadline, then delivers a real-time signal to the thread that
    runs the work (``pthread_kill``), whose handler raises :class:`CellTimeout` in the running Python
    code. The signal interrupts ``time.sleep`` and socket or subprocess waits. Code awaiting on an
    event loop is cancelled at its ``await`` instead (raising from a signal handler while the loop
    itself runs would kill the kernel). C code that never returns to the interpreter cannot be
    stopped this way; the watchdog says so in the cell shortly after the deadline.
``process``
    The work runs in a forked child (see :mod:`concur_magics.process`) which is killed with its whole
    process group at the deadline.

We use ``SIGRTMIN + 3`` rather than ``SIGALRM`` so that code which uses ``signal.alarm`` itself keeps
working inside a timed cell (platforms without real-time signals fall back to ``SIGALRM``).
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from .cells import CompiledCell

__all__ = [
    "CellTimeout",
    "Mode",
    "run_cell_with_timeout",
    "run_cell_with_timeout_async",
    "run_with_timeout",
    "timeout",
]

Mode = Literal["signal", "process", "dask"]
MODES: tuple[Mode, ...] = ("signal", "process", "dask")
T = TypeVar("T")

_STEPS = {
    "raised": "CellTimeout was raised in the running Python code",
    "cancelled": "the cell's task was cancelled at its await",
    "killed": "its process and process group were killed with SIGKILL",
    "worker": "the Dask task was cancelled and the worker process running it was killed",
}


class CellTimeout(TimeoutError):
    """The work ran past its deadline and was stopped.

    Attributes
    ----------
    limit:
        The time limit in seconds.
    mode:
        ``"signal"``, ``"process"`` or ``"dask"``.
    step:
        How the work was stopped: ``"raised"`` (an exception raised in the running code),
        ``"cancelled"`` (the cell's task cancelled at an ``await``), ``"killed"`` (the process
        killed) or ``"worker"`` (the Dask task cancelled and its worker process killed).
    """

    def __init__(self, limit: float, mode: str, step: str, detail: str = "") -> None:
        self.limit = limit
        self.mode = mode
        self.step = step
        message = f"time limit of {limit:g} s exceeded (mode: {mode}); stopped: {_STEPS[step]}"
        super().__init__(message + (f" {detail}" if detail else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (CellTimeout, (self.limit, self.mode, self.step))


CellTimeout.__module__ = "concur_magics"  # its public home


def _pick_signal() -> int:
    rtmin = getattr(signal, "SIGRTMIN", None)
    return int(rtmin) + 3 if rtmin is not None else int(signal.SIGALRM)


SIGNUM = _pick_signal()


class _Scope:
    """One active deadline. Its attributes are read by the signal handler in the target thread."""

    def __init__(self, limit: float, thread: threading.Thread, task: asyncio.Task[Any] | None) -> None:
        self.limit = limit
        self.thread = thread
        self.task = task
        self.loop = task.get_loop() if task is not None else None
        self.expires = time.monotonic() + limit
        self.expired = False
        self.active = True
        self.step = "raised"
        self.raised = 0  # how many times CellTimeout was raised in the code
        self.stopped = threading.Event()

    def error(self) -> CellTimeout:
        return CellTimeout(self.limit, "signal", self.step)


# Scopes per thread ident, outermost first. Touched only by their own thread (push/pop) and by the
# signal handler, which runs in that same thread; watchdogs only read flags on their scope.
_scopes: dict[int, list[_Scope]] = {}
_previous_handler: Any = None
_handler_lock = threading.Lock()


def _on_signal(signum: int, frame: Any) -> None:
    """Raise CellTimeout for the outermost expired scope of this thread, if its code is running."""
    for scope in _scopes.get(threading.get_ident(), ()):
        if scope.expired and scope.active:
            if scope.task is not None and _current_task() is not scope.task:
                # The loop or another task runs: the scope's task is cancelled by the loop instead.
                continue
            scope.step = "raised"
            scope.raised += 1
            raise scope.error()


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def install_handler() -> None:
    """Install the deadline signal handler (idempotent; main thread only)."""
    global _previous_handler
    with _handler_lock:
        if _previous_handler is None:
            _previous_handler = signal.signal(SIGNUM, _on_signal)


def uninstall_handler() -> None:
    """Restore the handler that was there before :func:`install_handler` (unload)."""
    global _previous_handler
    with _handler_lock:
        if _previous_handler is not None and not any(_scopes.values()):
            signal.signal(SIGNUM, _previous_handler)
            _previous_handler = None


def _after_fork_in_child() -> None:
    # A forked child runs only the forking thread; deadlines of the parent are the parent's to keep.
    _scopes.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def inject(thread_id: int, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type()`` in another thread at its next Python bytecode (after any blocking call).

    The one way this package interrupts a thread it does not run on: thread-job timeouts and
    cancels. Harmless if the thread has ended.
    """
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))


def _inject(thread_id: int, scope: _Scope) -> None:
    """Raise this scope's CellTimeout in another thread."""
    inject(thread_id, type("CellTimeout", (CellTimeout,), {"__init__": _scope_init(scope)}))


def _scope_init(scope: _Scope) -> Callable[..., None]:
    def __init__(self: CellTimeout, *args: Any) -> None:
        CellTimeout.__init__(self, scope.limit, "signal", "raised")

    return __init__


class _Watchdog:
    """A thread that stops one scope at its deadline and speaks up if the work doesn't stop.

    Only :meth:`stop` is called from other threads; it is thread-safe and bounded.
    """

    def __init__(self, scope: _Scope, grace: float, on_late: Callable[[_Scope, float], None]) -> None:
        self.scope = scope
        self.grace = grace
        self.on_late = on_late
        # A copy of the caller's context: in ipykernel it carries the cell's parent header, so a
        # late notice is shown in the cell that is being timed.
        context = contextvars.copy_context()
        self.thread = threading.Thread(
            target=context.run, args=(self._run,), name="concur-timeout-watchdog", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        scope = self.scope
        if scope.stopped.wait(max(0.0, scope.expires - time.monotonic())):
            return
        scope.expired = True
        self._fire()
        if scope.stopped.wait(self.grace):
            return
        self.on_late(scope, time.monotonic() - scope.expires)
        # Keep reminding: code that catches Exception and carries on gets another chance to stop.
        while not scope.stopped.wait(1.0):
            self._fire()

    def _fire(self) -> None:
        scope = self.scope
        if not scope.active:
            return
        if scope.loop is not None:
            scope.loop.call_soon_threadsafe(_cancel_scope_task, scope)
        if scope.thread is threading.main_thread():
            signal.pthread_kill(scope.thread.ident or 0, SIGNUM)
        elif scope.task is None and scope.thread.ident is not None:
            _inject(scope.thread.ident, scope)

    def stop(self) -> None:
        self.scope.stopped.set()
        self.thread.join(timeout=5)
        if self.thread.is_alive():  # pragma: no cover - would mean a bug in _run
            print("concur_magics: timeout watchdog did not stop within 5 s", file=sys.stderr)


def _cancel_scope_task(scope: _Scope) -> None:
    if scope.active and scope.task is not None and not scope.task.done():
        scope.step = "cancelled"
        scope.task.cancel(msg="concur_magics deadline")


def _late_notice(scope: _Scope, late: float) -> None:
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


class timeout:
    """Stop the enclosed code at a deadline by raising :class:`CellTimeout` in it (signal mode).

    In the main thread a signal interrupts sleeps and blocking waits; inside a task on a running
    event loop the task is cancelled at its ``await`` (or interrupted if it computes); in other
    threads the exception is raised at the next Python bytecode, after any blocking call returns.
    Scopes nest: the outermost expired deadline wins.

    Parameters
    ----------
    seconds:
        The time limit; fractions allowed.
    grace:
        Seconds after the deadline before a notice says the code is stuck where it can't be
        interrupted (C code).

    Raises
    ------
    CellTimeout
        When the deadline passes before the block ends.
    ValueError
        If ``seconds`` is not a positive number.

    Examples
    --------
    >>> import time
    >>> with timeout(0.1):
    ...     time.sleep(5)
    Traceback (most recent call last):
    ...
    concur_magics.CellTimeout: time limit of 0.1 s exceeded (mode: signal); stopped: CellTimeout was raised in the running Python code
    """

    def __init__(self, seconds: float, *, grace: float = 0.5) -> None:
        self.limit = check_seconds(seconds)
        self.grace = grace

    def __enter__(self) -> timeout:
        thread = threading.current_thread()
        if thread is threading.main_thread():
            install_handler()
        self._scope = _Scope(self.limit, thread, _current_task())
        self._stack = _scopes.setdefault(thread.ident or 0, [])
        self._stack.append(self._scope)
        self._watchdog = _Watchdog(self._scope, self.grace, _late_notice)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        __tracebackhide__ = True
        scope = self._scope
        scope.active = False
        self._watchdog.stop()
        self._stack.remove(scope)
        if not self._stack:
            _scopes.pop(scope.thread.ident or 0, None)
        if isinstance(exc, asyncio.CancelledError) and scope.expired and scope.step == "cancelled":
            if scope.task is not None and sys.version_info >= (3, 11):
                scope.task.uncancel()
            raise scope.error() from None
        if isinstance(exc, CellTimeout) and tb is not None:
            _drop_handler_frame(tb)
        # An exception injected into another thread may land just after the block ended; that
        # thread's own `except CellTimeout` is the place for it, as for any asynchronous exception.

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed while the block ran."""
        return self._scope.expired


def _drop_handler_frame(tb: Any) -> None:
    """Cut the signal handler's frame off a traceback, so it ends at the line that was stopped."""
    while tb.tb_next is not None:
        if tb.tb_next.tb_next is None and tb.tb_next.tb_frame.f_code is _on_signal.__code__:
            tb.tb_next = None
            return
        tb = tb.tb_next


def check_seconds(seconds: float, what: str = "a time limit") -> float:
    """Return ``seconds`` as a float, or raise ValueError if it is not a positive finite number."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, got {seconds!r}") from None
    if not (0 < value < float("inf")):
        raise ValueError(f"{what} must be positive and finite, got {seconds!r}")
    return value


def run_with_timeout(
    fn: Callable[..., T], seconds: float, *args: Any, mode: Mode = "signal", **kwargs: Any
) -> T:
    """Call ``fn(*args, **kwargs)`` and stop it if it runs longer than ``seconds``.

    Parameters
    ----------
    fn:
        The callable. In ``process`` mode it runs in a forked child that sees everything the caller
        sees; its return value comes back pickled (cloudpickle) and its output is relayed.
    seconds:
        The time limit.
    mode:
        ``"signal"`` raises in the running code (see :func:`timeout`); ``"process"`` kills the
        child and its process group at the deadline, even in C code that holds the GIL; ``"dask"``
        runs it on a Dask worker and kills that worker process at the deadline.

    Raises
    ------
    CellTimeout
        At the deadline.
    ValueError
        For a bad ``seconds`` or ``mode``.
    """
    __tracebackhide__ = True
    limit = check_seconds(seconds)
    if mode == "signal":
        with timeout(limit):
            return fn(*args, **kwargs)
    if mode == "process":
        from .process import run_in_child

        return run_in_child(lambda _ns: fn(*args, **kwargs), {}, limit).value  # type: ignore[no-any-return]
    if mode == "dask":
        from .cluster import run_call_on_dask

        return run_call_on_dask(fn, args, kwargs, limit)  # type: ignore[no-any-return]
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def run_cell_with_timeout(
    cell: CompiledCell,
    namespace: dict[str, Any],
    seconds: float,
    *,
    mode: Mode = "signal",
    shell: Any = None,
    grace: float = 0.5,
) -> Any:
    """Run a compiled (synchronous) cell in ``namespace`` under a deadline; return its last value.

    In ``process`` mode the names the cell assigns are copied back into ``namespace``; a cell that
    awaits at top level runs on a fresh event loop in the child.

    Raises
    ------
    CellTimeout
        At the deadline.
    TypeError
        For a cell that awaits at top level in ``signal`` mode: use
        :func:`run_cell_with_timeout_async`.
    """
    __tracebackhide__ = True
    limit = check_seconds(seconds)
    if mode == "signal":
        with timeout(limit, grace=grace):
            return cell.run(namespace)
    if mode == "process":
        from .process import run_in_child

        def work(ns: dict[str, Any]) -> Any:
            __tracebackhide__ = True
            return asyncio.run(cell.run_async(ns)) if cell.is_async else cell.run(ns)

        return run_in_child(work, namespace, limit, copy_back=True, shell=shell).value
    if mode == "dask":
        from .cluster import run_cell_on_dask

        return run_cell_on_dask(cell, namespace, limit, shell=shell)
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


async def run_cell_with_timeout_async(
    cell: CompiledCell,
    namespace: dict[str, Any],
    seconds: float,
    *,
    mode: Mode = "signal",
    shell: Any = None,
    grace: float = 0.5,
) -> Any:
    """Like :func:`run_cell_with_timeout`, for a cell that may await on the running loop.

    In ``signal`` mode the cell runs in the current task: at the deadline it is cancelled at its
    ``await``, or interrupted if it is computing. ``process`` mode blocks the loop while the child
    runs, as any foreground cell does.
    """
    __tracebackhide__ = True
    if mode == "signal":
        with timeout(check_seconds(seconds), grace=grace):
            return await cell.run_async(namespace)
    return run_cell_with_timeout(cell, namespace, seconds, mode=mode, shell=shell, grace=grace)
