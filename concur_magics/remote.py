"""What runs on a Dask worker (and, to kill a worker process, in its Nanny).

Output: on the worker, ``sys.stdout``/``sys.stderr`` and ``distributed.print`` are routed, for code
running one of our cells, to a Dask event topic tagged with the job; the kernel's client subscribes to
that topic and writes each piece into the cell that started the job.
"""

from __future__ import annotations

import contextvars
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from .cells import compile_cell
from .cluster import STARTED, TOPIC
from .tracebacks import carried_frames

__all__ = ["RemoteExit", "run_remote", "run_remote_call"]

_JOB: contextvars.ContextVar[str | None] = contextvars.ContextVar("concur_job", default=None)
_patched = threading.Lock()


class _RoutedStream:
    """A worker's sys.stdout/err: writes made by our cells go to the kernel, the rest pass through."""

    def __init__(self, original: Any, name: str) -> None:
        self._original = original
        self._name = name

    def write(self, text: str) -> int:
        token = _JOB.get()
        if token is None:
            return int(self._original.write(text) or 0)
        if text:
            from distributed import get_worker

            get_worker().log_event(TOPIC, {"job": token, "name": self._name, "text": text})
        return len(text)

    def flush(self) -> None:
        self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


def _install_routing() -> None:
    import distributed

    with _patched:
        if isinstance(sys.stdout, _RoutedStream):
            return
        sys.stdout = _RoutedStream(sys.stdout, "stdout")  # type: ignore[assignment]
        sys.stderr = _RoutedStream(sys.stderr, "stderr")  # type: ignore[assignment]
        original_print = distributed.print

        def routed_print(*args: Any, **kwargs: Any) -> None:
            # In our cells, print locally: the routed stream sends it to the right cell once.
            if _JOB.get() is not None:
                file = kwargs.pop("file", None)
                print(*args, file=file if file is not None else sys.stdout, **kwargs)
            else:
                original_print(*args, **kwargs)

        distributed.print = routed_print
        distributed.worker.print = routed_print  # type: ignore[attr-defined]


def run_remote(
    source: str, filename: str, first_line: int, inputs: dict[str, Any], token: str
) -> tuple[Any, dict[str, Any]]:
    """Run a cell on a worker; return its last value and the names it bound."""
    __tracebackhide__ = True
    from distributed import get_worker

    _install_routing()
    worker = get_worker()
    worker.log_event(STARTED, {"job": token, "worker": worker.address, "pid": os.getpid()})
    # The same file name and line numbers as in the kernel, so the kernel shows the cell's lines.
    cell = compile_cell(source, first_line=first_line, filename=filename)
    _remember_source(filename, "\n" * (first_line - 1) + source)
    namespace: dict[str, Any] = {"__name__": "__main__", **inputs}
    before = dict(namespace)
    reset = _JOB.set(token)
    try:
        if cell.is_async:
            import asyncio

            value = asyncio.run(cell.run_async(namespace))
        else:
            value = cell.run(namespace)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and friends must not reach the worker
        # Cut to the user's frames here, where they are; they travel in the exception's __dict__
        # and the kernel formats them with the cells' labels and sources.
        carried = exc if isinstance(exc, Exception) else RemoteExit(exc)
        try:
            carried._concur_frames = carried_frames(exc.__traceback__)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - the exception itself still goes back
            pass
        if carried is exc:
            raise
        raise carried from None
    finally:
        sys.stdout.flush()
        _JOB.reset(reset)
    names = {
        name: v for name, v in namespace.items()
        if name not in ("__builtins__", "__name__") and before.get(name, _MISSING) is not v
    }
    return value, names


_MISSING = object()


class RemoteExit(Exception):
    """``SystemExit``, ``KeyboardInterrupt`` or ``GeneratorExit`` raised by a cell on a Dask worker,
    carried back as an ordinary exception so it ends the job and never the worker."""

    def __init__(self, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}".rstrip(": ")
        super().__init__(f"{text} (raised by the cell on the Dask worker)")

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteExit, (self.args[0].rsplit(" (raised by", 1)[0],))


def _remember_source(filename: str, source: str) -> None:
    import linecache

    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)


def run_remote_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], token: str) -> Any:
    """Call a function on a worker, reporting where it runs and routing its output."""
    from distributed import get_worker

    _install_routing()
    worker = get_worker()
    worker.log_event(STARTED, {"job": token, "worker": worker.address, "pid": os.getpid()})
    reset = _JOB.set(token)
    try:
        return fn(*args, **kwargs)
    finally:
        _JOB.reset(reset)


def _kill_worker_process(pid: int, dask_worker: Any = None) -> None:
    """Run in a Nanny: SIGKILL its worker process if it is the one running our task.

    The Nanny sees its worker die and starts a fresh one.
    """
    if getattr(dask_worker, "pid", None) == pid:
        os.kill(pid, signal.SIGKILL)


def _exit_worker_process() -> None:
    os._exit(1)
