"""Drivers that run a compiled cell (or a callable) as a background job: a thread or a loop task.

``thread``
    A worker thread from the owner's pool, running in a copy of the starting cell's context. For
    blocking code. Stopping raises :class:`~concur_magics.jobs.JobStopped` in the thread at its
    next Python bytecode.
``loop``
    A task on the kernel's own asyncio loop — no thread. For code that awaits: thousands of such jobs
    cost no threads, and their deadlines are the loop's own timers. Stopping cancels the task at its
    next ``await``. The task is created through ``loop.call_soon_threadsafe``, the loop's one
    thread-safe door, so a job can be started from any thread; it starts once the loop is free.

A driver only starts the work and knows how to interrupt it; the job's life — begin, settle once,
report — is :class:`~concur_magics.jobs.Job`'s.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from . import compat
from .cells import CompiledCell, compile_cell
from .deadlines import check_seconds
from .jobs import Job, JobStopped, loop_timer
from .output import CellOutput, enter_job
from .runtime import Runtime

__all__ = ["MODES", "background"]

MODES = ("thread", "loop", "dask")


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
    cell: str | None = None,
    run: str | None = None,
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
        :mod:`concur_magics.dask_jobs`). Default: ``"loop"`` for code that awaits at top level,
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
    cell, run:
        Which cell started the job (the frontend's cell id) and which run of it (the request id),
        to find the jobs of earlier runs of a cell.

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
    runtime = Runtime.current()
    runtime.route(shell)
    if mode == "dask":
        from .dask_jobs import background_dask

        if not isinstance(work, str):
            raise TypeError("dask mode runs cell source; submit callables with the Dask client")
        job = background_dask(
            runtime, work, name=name, timeout=timeout, shell=shell, namespace=namespace,
            first_line=first_line, cell=cell, run=run,
        )
    else:
        call, is_async, source = _as_callable(work, shell, namespace, first_line)
        mode = mode or ("loop" if is_async else "thread")
        out = CellOutput(shell if show else None)
        job = runtime.jobs.add(Job(source, mode, name, out=out, limit=timeout, cell=cell, run=run))
        # The status line is in the cell before the cell replies, even when the job starts later
        # (a busy machine): a headless run (nbclient) keeps only what a cell shows before then.
        out.start_job(job)
        if mode == "thread":
            _start_thread(runtime, job, call, is_async, out)
        else:
            _start_task(runtime, job, call, out)
    for old in runtime.jobs.of_earlier_runs(job):
        # A rerun never loses the earlier job without a word; it keeps running (it may hold work
        # the user wants), and this says how to stop it.
        print(f"{old.label} from an earlier run of this cell is still running "
              f"({old.elapsed:.1f} s); its output goes on here; %jobs cancel {old.id} stops it")
    return job


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


class _ThreadTarget:
    """The one way into a job's thread: raise JobStopped there, until :meth:`close`. Thread-safe."""

    def __init__(self) -> None:
        self.ident = threading.get_ident()
        self._lock = threading.Lock()
        self._open = True
        self.raised = 0
        self.delivered = 0
        self._type: type[JobStopped] | None = None

    def interrupt(self) -> None:
        with self._lock:
            if not self._open or isinstance(compat.handled_exception(self.ident), JobStopped):
                return  # ended, or cleaning up after a stop: let the cleanup run
            if self._type is None:  # a class of its own, so a raise can be matched to its target
                self._type = type("JobStopped", (_TargetStopped,), {"target": self})
            self.raised += 1
            compat.async_raise(self.ident, self._type)

    def close(self) -> None:
        """No more interrupts; one requested but not yet delivered is taken here. Call in the thread."""
        while True:
            try:
                with self._lock:
                    self._open = False
                if self._type is not None and self.raised > self.delivered:
                    compat.absorb(self._type)
                return
            except JobStopped:
                continue  # one landed just before the lock was taken: it is the work's no more


class _TargetStopped(JobStopped):
    target: _ThreadTarget

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.target.delivered += 1


def _start_thread(runtime: Runtime, job: Job, call: Callable[[], Any], is_async: bool, out: CellOutput) -> None:
    def body() -> Any:
        __tracebackhide__ = True
        result = call()
        if is_async:
            # Code that awaits, forced into a thread, gets an event loop of its own there.
            result = asyncio.run(result)
        return result

    def main() -> None:
        __tracebackhide__ = True
        threading.current_thread().name = f"concur-job-{job.id}"
        enter_job(job, out.shell)
        target = _ThreadTarget()
        outcome: list[tuple[str, Any, BaseException | None]] = []
        began = False
        while True:
            try:
                if not began:
                    # A stop may land inside begin() itself (a deadline of a microsecond, a cancel
                    # at that moment): it is this job's, caught below like one in the work.
                    began = True
                    if not job.begin(target.interrupt, runtime.deadlines.call_later):
                        return  # cancelled before it started: no interrupt was ever armed
                if not outcome:
                    try:
                        value = body()
                    except BaseException as exc:  # noqa: BLE001 - every failure belongs to the job
                        outcome.append((*_split(job.outcome_of(exc)),))
                    else:
                        outcome.append(("done", value, None))
                target.close()
                break
            except JobStopped as exc:  # landed in begin(), or after the work ended
                if not outcome:
                    outcome.append((*_split(job.outcome_of(exc)),))
        status, value, error = outcome[0]
        job.settle(status, value, error)

    runtime.workers.submit(functools.partial(out.run, main))


def _split(outcome: tuple[str, BaseException | None]) -> tuple[str, Any, BaseException | None]:
    return outcome[0], None, outcome[1]


def _start_task(runtime: Runtime, job: Job, call: Callable[[], Any], out: CellOutput) -> None:
    loop = _target_loop(runtime)
    job._loop = loop

    async def main() -> None:
        __tracebackhide__ = True
        task = asyncio.current_task()
        assert task is not None
        enter_job(job, out.shell)
        # The loop's own timers: a loop job's deadline and stop follow-ups cost no thread.
        if not job.begin(lambda: loop.call_soon_threadsafe(task.cancel), loop_timer(loop)):
            return
        status, value, error = "done", None, None  # type: tuple[str, Any, BaseException | None]
        try:
            value = await _maybe_await(call())
        except BaseException as exc:  # noqa: BLE001 - SystemExit and friends too: never into the loop
            status, error = job.outcome_of(exc)
        job.settle(status, value, error)

    def start() -> None:
        # Created in the starting cell's context, so the task's output goes to that cell.
        out.run(loop.create_task, main())

    loop.call_soon_threadsafe(start)


async def _maybe_await(value: Any) -> Any:
    __tracebackhide__ = True
    if inspect.isawaitable(value):
        return await value
    return value


def _target_loop(runtime: Runtime) -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        loop = runtime.kernel_loop()
        if loop is not None:
            return loop
    raise RuntimeError("loop mode needs a running event loop (the kernel's, or the caller's)")
