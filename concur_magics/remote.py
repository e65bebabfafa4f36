"""What runs on a Dask worker (and, to kill a worker process, in its Nanny).

The workers of a cluster a user already runs have ``distributed`` and the user's libraries, not
``concur_magics``, and run other people's work too. So this module imports only the standard
library and ``distributed``, and travels by value: the kernel pickles its functions and classes
with their code (:func:`concur_magics.dask_jobs.shipped`), and nothing here is imported on a worker.

A cell arrives already compiled (:class:`CellCode`: code objects, whether it awaits, its file name
and first line); it runs in a fresh namespace, and its last value and the names it bound go back.
A failure goes back with the user's frames, cut here, where they are (:func:`carried_frames`);
the kernel formats them, knowing each cell's label and source.

Output: :class:`OutputRouting`, a worker plugin each kernel registers under its own name, routes
what code running one of that kernel's tasks writes to ``sys.stdout``/``sys.stderr`` or prints with
``distributed.print`` to a Dask event topic, tagged with the job; everything else passes through
untouched. Which task is which is a context variable the task sets, so other people's tasks on the
same worker are never affected. Its ``teardown`` puts back exactly what ``setup`` changed.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import CodeType, TracebackType
from typing import Any, NamedTuple

import distributed
from distributed import WorkerPlugin, get_worker

__all__ = ["CellCode", "LogForwarding", "OutputRouting", "RemoteExit", "Route", "run_remote", "run_remote_call"]

# A frame as it travels back to the kernel: (file name, function's qualified name, line, the
# function's first line).
Frames = list[tuple[str, str, int, int]]


class CellCode(NamedTuple):
    """A cell, compiled in the kernel, as it travels to a worker."""

    body: CodeType | None  # every statement but a trailing expression
    last_expr: CodeType | None  # the trailing expression ("eval" mode), whose value comes back
    is_async: bool  # awaits at top level: the code objects return coroutines
    filename: str  # the name the kernel shows the cell's source under
    first_line: int


class Route(NamedTuple):
    """Where a task reports: its job's token, the kernel's plugin, the topic for where it started."""

    token: str
    plugin: str
    started: str


# --------------------------------------------------------------------------- running a cell

def run_remote(cell: tuple[Any, ...], inputs: dict[str, Any], route: tuple[str, str, str]) -> tuple[Any, dict[str, Any]]:
    """Run a cell on a worker; return its last value and the names it bound.

    ``cell`` and ``route`` come as the fields of a :class:`CellCode` and a :class:`Route` (plain
    tuples: this module's classes exist on the worker only as the functions here carry them).

    Raises
    ------
    Exception
        What the cell raised, carrying the user's frames (``_concur_frames``); ``SystemExit``,
        ``KeyboardInterrupt`` and ``GeneratorExit`` as :class:`RemoteExit`, so they end the job
        and never the worker.
    """
    __tracebackhide__ = True
    namespace: dict[str, Any] = {"__name__": "__main__", **inputs}
    before = dict(namespace)
    code = _named(CellCode(*cell))
    var, token = _started(Route(*route))
    try:
        value = _carrying(_run_cell, code, namespace)
    finally:
        _finished(var, token)
    names = {
        name: v for name, v in namespace.items()
        if name not in ("__builtins__", "__name__") and before.get(name, _MISSING) is not v
    }
    return value, names


def run_remote_call(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], route: tuple[str, str, str]
) -> Any:
    """Call a function on a worker, reporting where it runs and routing its output."""
    __tracebackhide__ = True
    var, token = _started(Route(*route))
    try:
        return _carrying(fn, *args, **kwargs)
    finally:
        _finished(var, token)


_MISSING = object()


def _started(route: Route) -> tuple[contextvars.ContextVar[str | None] | None, Any]:
    """Tell the kernel where the task runs; route its output (if the kernel's plugin is here)."""
    worker = get_worker()
    worker.log_event(route.started, {"job": route.token, "worker": worker.address, "pid": os.getpid()})
    # Worker.plugins: the plugins by name (an attribute of distributed's Worker, checked on
    # 2026.8.0; listed in concur_magics.compat, which this module cannot import).
    plugin = getattr(worker, "plugins", {}).get(route.plugin)
    var = getattr(plugin, "job", None)
    if not isinstance(var, contextvars.ContextVar):
        return None, None  # no routing here: the output stays in the worker's log
    return var, var.set(route.token)


def _finished(var: contextvars.ContextVar[str | None] | None, token: Any) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        if var is not None:
            var.reset(token)


def _named(cell: CellCode) -> CellCode:
    """The cell with its file name on every code object (pickling code replaces it)."""
    return cell._replace(body=_renamed(cell.body, cell.filename), last_expr=_renamed(cell.last_expr, cell.filename))


def _renamed(code: CodeType | None, filename: str) -> CodeType | None:
    if code is None:
        return None
    consts = tuple(_renamed(c, filename) if isinstance(c, CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _run_cell(cell: CellCode, namespace: dict[str, Any]) -> Any:
    __tracebackhide__ = True
    if cell.is_async:
        return asyncio.run(_run_async(cell, namespace))
    if cell.body is not None:
        exec(cell.body, namespace)  # noqa: S102 - the user's cell, as the kernel compiled it
    return eval(cell.last_expr, namespace) if cell.last_expr is not None else None  # noqa: S307


async def _run_async(cell: CellCode, namespace: dict[str, Any]) -> Any:
    __tracebackhide__ = True
    value: Any = None
    for code, is_expr in ((cell.body, False), (cell.last_expr, True)):
        if code is None:
            continue
        result = eval(code, namespace)  # noqa: S307 - the user's cell
        if asyncio.iscoroutine(result) and code.co_flags & inspect.CO_COROUTINE:
            result = await result
        if is_expr:
            value = result
    return value


def _carrying(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; an exception it raises goes back carrying the user's frames."""
    __tracebackhide__ = True
    try:
        return fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and friends must not reach the worker
        carried = exc if isinstance(exc, Exception) else RemoteExit(exc)
        try:
            carried._concur_frames = carried_frames(exc.__traceback__)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - the exception itself still goes back
            pass
        if carried is exc:
            raise
        raise carried from None


def carried_frames(tb: TracebackType | None) -> Frames | None:
    """The user's frames of ``tb``, as tuples that pickle; None if there are none.

    On a worker the user's code runs below ours and never calls back into it: the user's frames
    are those after the last frame of ours (marked ``__tracebackhide__``; our code's file names
    are cloudpickle's, so they can't tell).
    """
    entries: list[TracebackType] = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    last_ours = max((i for i, e in enumerate(entries) if _hidden(e)), default=-1)
    frames: Frames = []
    for entry in entries[last_ours + 1:]:
        code = entry.tb_frame.f_code
        frames.append((code.co_filename, getattr(code, "co_qualname", code.co_name), entry.tb_lineno,
                       code.co_firstlineno))
    return frames or None


def _hidden(entry: TracebackType) -> bool:
    try:
        hide = entry.tb_frame.f_locals.get("__tracebackhide__")
    except Exception:  # noqa: BLE001 - a frame whose locals can't be read is the user's
        return False
    return bool(hide) and hide != "__ipython_bottom__"


class RemoteExit(Exception):
    """``SystemExit``, ``KeyboardInterrupt`` or ``GeneratorExit`` raised by a cell on a Dask worker,
    carried back as an ordinary exception so it ends the job and never the worker."""

    def __init__(self, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}".rstrip(": ")
        super().__init__(f"{text} (raised by the cell on the Dask worker)")

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteExit, (self.args[0].rsplit(" (raised by", 1)[0],), self.__dict__)


# --------------------------------------------------------------------------- output routing

class OutputRouting(WorkerPlugin):
    """A worker plugin: output of one kernel's tasks goes to that kernel, tagged with the job.

    ``setup`` wraps ``sys.stdout``, ``sys.stderr`` and ``distributed.print`` (as
    ``distributed`` and ``distributed.worker`` name it); a wrapper routes only writes made in a
    context whose :attr:`job` is set (by our task), and passes everything else to what it wraps.
    ``teardown`` puts each one back if it is still in place; if something else wrapped it since,
    ours goes inert (passes everything through) and is skipped when the one above it leaves.
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.job: contextvars.ContextVar[str | None] | None = None
        self._wrappers: list[tuple[Any, str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"topic": self.topic, "job": None, "_wrappers": []}

    def setup(self, worker: Any) -> None:
        self.worker = worker
        self.job = contextvars.ContextVar(f"concur-job-{self.topic}", default=None)
        for name in ("stdout", "stderr"):
            self._wrap(sys, name, _RoutedStream(getattr(sys, name), name, self))
        routed = _routed_print(distributed.print, self)
        self._wrap(distributed, "print", routed)
        self._wrap(distributed.worker, "print", routed)

    def _wrap(self, owner: Any, attribute: str, wrapper: Any) -> None:
        setattr(owner, attribute, wrapper)
        self._wrappers.append((owner, attribute, wrapper))

    def teardown(self, worker: Any) -> None:
        for owner, attribute, wrapper in reversed(self._wrappers):
            wrapper._concur_inert = True
            if getattr(owner, attribute) is wrapper:
                setattr(owner, attribute, _live(wrapper._concur_inner))
        self._wrappers = []

    def emit(self, name: str, text: str) -> bool:
        """Send ``text`` to the kernel if the current context runs one of its tasks."""
        token = self.job.get() if self.job is not None else None
        if token is None:
            return False
        if text:
            self.worker.log_event(self.topic, {"job": token, "name": name, "text": text})
        return True


class LogForwarding(WorkerPlugin):
    """A worker plugin for a local cluster the kernel started (never someone else's): the log
    records of ``distributed`` (and ``tornado``, ``bokeh``) in a worker process go to the kernel as
    Dask events, for the kernel's own log, instead of to the worker's stderr — which is the
    kernel's, captured into whichever cell runs. ``teardown`` gives the handlers back."""

    name = "concur-worker-logs"
    PREFIXES = ("distributed", "tornado", "bokeh")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._saved: list[tuple[logging.Logger, list[logging.Handler]]] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"topic": self.topic, "_saved": []}

    def setup(self, worker: Any) -> None:
        handler = _EventHandler(worker, self.topic)
        for logger in self._loggers():
            self._saved.append((logger, list(logger.handlers)))
            logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.StreamHandler)] + [handler]

    def teardown(self, worker: Any) -> None:
        for logger, handlers in self._saved:
            logger.handlers = handlers
        self._saved = []

    def _loggers(self) -> list[logging.Logger]:
        names = [name for name in logging.root.manager.loggerDict if name.split(".")[0] in self.PREFIXES]
        loggers = [logging.getLogger(name) for name in names]
        return [logger for logger in loggers if any(isinstance(h, logging.StreamHandler) for h in logger.handlers)]


class _EventHandler(logging.Handler):
    def __init__(self, worker: Any, topic: str) -> None:
        super().__init__()
        self.worker = worker
        self.topic = topic
        self.setFormatter(logging.Formatter("%(name)s - %(levelname)s - %(message)s"))
        self._sending = contextvars.ContextVar("concur-log-sending", default=False)

    def emit(self, record: logging.LogRecord) -> None:
        if self._sending.get():  # sending an event logged something: don't loop
            return
        token = self._sending.set(True)
        try:
            self.worker.log_event(self.topic, {"name": record.name, "level": record.levelno,
                                               "message": self.format(record), "pid": os.getpid()})
        except Exception:  # noqa: BLE001 - a log record must never fail the worker
            pass
        finally:
            self._sending.reset(token)


def _live(obj: Any) -> Any:
    """``obj``, or what it wraps if it is a wrapper of ours that went inert."""
    while getattr(obj, "_concur_inert", False):
        obj = obj._concur_inner
    return obj


class _RoutedStream:
    """A worker's sys.stdout/err: writes made by our tasks go to the kernel, the rest pass through."""

    def __init__(self, inner: Any, name: str, plugin: OutputRouting) -> None:
        self._concur_inner = inner
        self._concur_inert = False
        self._name = name
        self._plugin = plugin

    def write(self, text: str) -> int:
        if not self._concur_inert and self._plugin.emit(self._name, text):
            return len(text)
        return int(self._concur_inner.write(text) or 0)

    def flush(self) -> None:
        self._concur_inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._concur_inner, name)


def _routed_print(inner: Callable[..., None], plugin: OutputRouting) -> Callable[..., None]:
    def routed_print(*args: Any, **kwargs: Any) -> None:
        # In our tasks, print locally: the routed stream sends it to the right cell once.
        if not routed_print._concur_inert and plugin.job is not None and plugin.job.get() is not None:  # type: ignore[attr-defined]
            builtins.print(*args, **kwargs)
        else:
            inner(*args, **kwargs)

    routed_print._concur_inner = inner  # type: ignore[attr-defined]
    routed_print._concur_inert = False  # type: ignore[attr-defined]
    return routed_print


# --------------------------------------------------------------------------- stopping a worker

def _kill_worker_process(pid: int, dask_worker: Any = None) -> None:
    """Run in a Nanny: SIGKILL its worker process if it is the one running our task.

    The Nanny sees its worker die and starts a fresh one. ``Nanny.pid`` is read here, on the
    worker, where ``concur_magics.compat`` may not be (see the note there).

    Raises
    ------
    RuntimeError
        When the nanny has no ``pid`` (another release of distributed): the caller then asks the
        worker process to end itself.
    """
    nanny_pid = getattr(dask_worker, "pid", None)
    if not isinstance(nanny_pid, int):
        raise RuntimeError(f"distributed {distributed.__version__}: its Nanny has no worker pid (Nanny.pid)")
    if nanny_pid == pid:
        os.kill(pid, signal.SIGKILL)


def _exit_worker_process() -> None:
    os._exit(1)
