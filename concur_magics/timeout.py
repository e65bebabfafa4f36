"""Deadlines that really stop the work: the user's API over the one deadline engine.

``signal``
    The work runs where it is; at the deadline :class:`CellTimeout` is raised in it (see
    :mod:`concur_magics.deadlines` for how: a signal in the main thread, the loop's timer in a
    task, an asynchronous exception in other threads). C code that never returns to the
    interpreter cannot be stopped this way: a notice says so in the cell shortly after the
    deadline, and the block fails when the call returns.
``process``
    The work runs in a forked child (see :mod:`concur_magics.process`) which is killed with its whole
    process group at the deadline.
``dask``
    The work runs on a Dask worker, whose process is killed at the deadline.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .deadlines import EDGES, CellTimeout, Scope, check_seconds

if TYPE_CHECKING:
    from .cells import CompiledCell

__all__ = [
    "CellTimeout",
    "check_seconds",
    "Mode",
    "run_cell_with_timeout",
    "run_cell_with_timeout_async",
    "run_with_timeout",
    "timeout",
]

Mode = Literal["signal", "process", "dask"]
MODES: tuple[Mode, ...] = ("signal", "process", "dask")
T = TypeVar("T")

class timeout:
    """Stop the enclosed code at a deadline by raising :class:`CellTimeout` in it (signal mode).

    In the main thread a signal interrupts sleeps and blocking waits; inside a task on a running
    event loop the task is cancelled at its ``await``; in other threads the exception is raised at
    the next Python bytecode, after any blocking call returns. Scopes nest: the outermost expired
    deadline wins. A deadline fires only into the code inside its own block: once the block is
    left, nothing of it remains. Work that could not be interrupted (C code holding the GIL) and
    ran past the deadline fails with ``CellTimeout`` when it returns, never silently.

    Parameters
    ----------
    seconds:
        The time limit; fractions allowed, at most ``MAX_SECONDS`` (24.8 days).
    grace:
        Seconds after the deadline before a notice says the code is stuck where it can't be
        interrupted (C code).

    Raises
    ------
    CellTimeout
        When the deadline passes before the block ends.
    ValueError
        If ``seconds`` is not a positive number of at most 24.8 days.

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
        self._scope: Scope | None = None

    def __enter__(self) -> timeout:
        from .runtime import Runtime

        scope = self._scope = Scope(Runtime.current().deadlines, self.limit, grace=self.grace)
        try:
            scope.enter(owner=sys._getframe(1))
            return self
        except BaseException as exc:
            # A deadline of microseconds can pass while the scope is being entered: the block then
            # never starts and __exit__ never runs, so the scope is left here, or its engine would
            # go on raising into this thread (and, once it ended, into a thread given its id).
            raise (scope.exit(exc) or exc) from None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        __tracebackhide__ = True
        assert self._scope is not None
        error = self._scope.exit(exc)
        if error is not None:
            raise error from None
        if isinstance(exc, CellTimeout) and tb is not None:
            _drop_handler_frame(tb)

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed while the block ran."""
        return self._scope is not None and self._scope.expired


EDGES.update({timeout.__enter__.__code__, timeout.__exit__.__code__})


def _drop_handler_frame(tb: Any) -> None:
    """Cut the signal handler's frame off a traceback, so it ends at the line that was stopped."""
    from .deadlines import Engine

    while tb.tb_next is not None:
        if tb.tb_next.tb_next is None and tb.tb_next.tb_frame.f_code is Engine.on_signal.__code__:
            tb.tb_next = None
            return
        tb = tb.tb_next


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
        from .runtime import Runtime

        children = Runtime.current().children
        return run_in_child(lambda _ns: fn(*args, **kwargs), {}, limit, children=children).value  # type: ignore[no-any-return]
    if mode == "dask":
        from .dask_jobs import run_call_on_dask

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
        from .runtime import Runtime

        def work(ns: dict[str, Any]) -> Any:
            __tracebackhide__ = True
            return asyncio.run(cell.run_async(ns)) if cell.is_async else cell.run(ns)

        children = Runtime.current().children
        return run_in_child(work, namespace, limit, copy_back=True, shell=shell, children=children).value
    if mode == "dask":
        from .dask_jobs import run_cell_on_dask

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
