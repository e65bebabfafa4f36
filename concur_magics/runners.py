"""Run a compiled cell (or a callable) as a background job: in a thread or on the kernel's loop.

``thread``
    A named worker thread per job, started in a copy of the starting cell's context. For blocking
    code. Cancelling raises an exception in the thread at its next Python bytecode.
``loop``
    A task on the kernel's own asyncio loop — no thread. For code that awaits: thousands of such jobs
    cost no threads. Cancelling cancels the task at its next ``await``. The task is created through
    ``loop.call_soon_threadsafe``, the loop's one thread-safe door, so a job can be started from any
    thread; it starts once the loop is free (after the current cell, if that cell is busy).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from .cells import CompiledCell, compile_cell
from .jobs import JOBS, Job
from .output import CellOutput
from .timeout import CellTimeout, check_seconds, inject, timeout

__all__ = ["MODES", "background"]

MODES = ("thread", "loop", "dask")

# The kernel's loop, recorded when the extension loads, for jobs started from other threads.
kernel_loop: asyncio.AbstractEventLoop | None = None


class _CancelJob(BaseException):
    """Raised inside a thread job to cancel it (a BaseException, so `except Exception` lets it by)."""


def background(
    work: str | Callable[[], Any] | Awaitable[Any],
    *,
    name: str | None = None,
    mode: str | None = None,
    timeout: float | None = None,
    namespace: dict[str, Any] | None = None,
    shell: Any = None,
    first_line: int = 1,
    show: bool = True,
) -> Job:
    """Start ``work`` alongside the caller and return its :class:`Job` at once.

    Parameters
    ----------
    work:
        Cell source (run in ``namespace``; its last expression is the job's value), a callable
        (called with no arguments; a coroutine function is awaited) or an awaitable (a coroutine,
        a future, ``asyncio.gather(...)``).
    name:
        A name for ``%jobs`` and ``%jobs cancel NAME``.
    mode:
        ``"thread"``, ``"loop"`` or ``"dask"`` (cell source only: it runs on a Dask worker, see
        :mod:`concur_magics.cluster`). Default: ``"loop"`` for code that awaits at top level,
        coroutines and coroutine functions; ``"thread"`` otherwise.
    timeout:
        Seconds after which the job is stopped and its status becomes ``timeout``.
    namespace:
        Where cell source runs: default the IPython user namespace (or a new dict).
    shell:
        The IPython shell whose cell shows the job's output; default the running one, if any.
    first_line:
        The line number of the source's first line in its cell, for tracebacks.
    show:
        Show the job's status line, final value and traceback in the starting cell. With False
        only what the job prints appears there; the outcome is kept in the Job.

    Raises
    ------
    ValueError
        For a bad mode or timeout.
    RuntimeError
        For ``loop`` mode when there is no loop to run on.
    """
    shell = shell if shell is not None else _current_shell()
    if timeout is not None:
        timeout = check_seconds(timeout)
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "dask":
        from .cluster import background_dask

        if not isinstance(work, str):
            raise TypeError("dask mode runs cell source; submit callables with the Dask client")
        return background_dask(
            work, name=name, timeout=timeout, shell=shell, namespace=namespace,
            first_line=first_line, bind=_on_kernel_loop,
        )
    call, is_async, source = _as_callable(work, shell, namespace, first_line)
    mode = mode or ("loop" if is_async else "thread")
    job = JOBS.add(Job(source, mode, name))
    out = CellOutput(shell if show else None)
    if mode == "thread":
        _start_thread(job, call, is_async, timeout, out)
    else:
        _start_task(job, call, is_async, timeout, out)
    return job


def _on_kernel_loop(callback: Callable[[], None]) -> None:
    """Run ``callback`` where the namespace may be touched: the kernel's loop, if there is one."""
    if kernel_loop is not None and kernel_loop.is_running():
        kernel_loop.call_soon_threadsafe(callback)
    else:
        callback()


def _current_shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return None
    return get_ipython()


def _as_callable(
    work: Any, shell: Any, namespace: dict[str, Any] | None, first_line: int
) -> tuple[Callable[[], Any], bool, str]:
    """``(call, awaits, source)``: a no-argument callable whose result may need awaiting."""
    if isinstance(work, str):
        ns = namespace if namespace is not None else (shell.user_ns if shell is not None else {})
        cell: CompiledCell = compile_cell(work, shell=shell, first_line=first_line)
        run = cell.run_async if cell.is_async else cell.run
        return functools.partial(run, ns), cell.is_async, work
    if inspect.isawaitable(work):  # a coroutine, a future, a task, a gather
        return (lambda: work), True, getattr(work, "__qualname__", type(work).__name__)
    if callable(work):
        source = getattr(work, "__qualname__", repr(work))
        return work, inspect.iscoroutinefunction(work), source
    raise TypeError(f"background() takes cell source, a callable or an awaitable, not {type(work).__name__}")


def _start_thread(job: Job, call: Callable[[], Any], is_async: bool, limit: float | None, out: CellOutput) -> None:
    def body() -> Any:
        __tracebackhide__ = True
        result = call()
        if is_async:
            # Code that awaits, forced into a thread, gets an event loop of its own there.
            result = asyncio.run(result)
        return result

    def main() -> None:
        __tracebackhide__ = True
        thread_id = threading.get_ident()
        if not job._mark_running(lambda: inject(thread_id, _CancelJob)):
            return
        out.start_job(job)
        status, value, error = "cancelled", None, None  # type: tuple[str, Any, BaseException | None]
        try:
            try:
                if limit is None:
                    value = body()
                else:
                    with timeout(limit):
                        value = body()
                status = "done"
            except _CancelJob:
                status = "cancelled"
            except CellTimeout as exc:
                status, error = "timeout", exc
            except BaseException as exc:  # noqa: BLE001 - every failure belongs to the job
                status, error = "error", exc
        finally:
            _settle(job)
        _report(job, out, status, value, error)

    thread = threading.Thread(target=out.run, args=(main,), name=f"concur-job-{job.id}", daemon=True)
    thread.start()


def _settle(job: Job) -> None:
    """Stop further cancel requests; swallow one that raced with the end of the work."""
    while True:
        try:
            with job._lock:
                job._cancel = lambda: None
            return
        except _CancelJob:
            continue


def _start_task(job: Job, call: Callable[[], Any], is_async: bool, limit: float | None, out: CellOutput) -> None:
    loop = _target_loop()
    job._loop = loop

    async def main() -> None:
        __tracebackhide__ = True
        task = asyncio.current_task()
        assert task is not None
        if not job._mark_running(lambda: loop.call_soon_threadsafe(task.cancel)):
            return
        out.start_job(job)
        status, value, error = "cancelled", None, None  # type: tuple[str, Any, BaseException | None]
        try:
            if limit is None:
                value = await _maybe_await(call())
            else:
                with timeout(limit):
                    value = await _maybe_await(call())
            status = "done"
        except asyncio.CancelledError:
            status = "cancelled"
        except CellTimeout as exc:
            status, error = "timeout", exc
        except Exception as exc:  # noqa: BLE001 - every failure belongs to the job
            status, error = "error", exc
        _report(job, out, status, value, error)

    def start() -> None:
        # Created in the starting cell's context, so the task's output goes to that cell.
        out.run(loop.create_task, main())

    loop.call_soon_threadsafe(start)


async def _maybe_await(value: Any) -> Any:
    __tracebackhide__ = True
    if inspect.isawaitable(value):
        return await value
    return value


def _report(job: Job, out: CellOutput, status: str, value: Any, error: BaseException | None) -> None:
    if status == "done":
        out.show_value(value)
    out.end_job(job, status, value, error)


def _target_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        if kernel_loop is not None and kernel_loop.is_running():
            return kernel_loop
    raise RuntimeError("loop mode needs a running event loop (the kernel's, or the caller's)")


