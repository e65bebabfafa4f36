"""The one door to private or version-dependent internals of the libraries we build on.

Every use of an undocumented detail of CPython, asyncio, IPython, ipykernel, distributed or
cloudpickle goes through a function here, with a comment naming the detail, the versions it was
checked on, and what happens when it is missing: a documented fallback, or an error that names the
library and its version, never an ``AttributeError`` deep in a job.

Checked with the version matrix (``noxfile.py``): CPython 3.11.7, 3.12.1 and 3.13.0 with the
newest releases (IPython 9.18, ipykernel 7.4, distributed 2026.8), and CPython 3.11 with the oldest
that ``pyproject.toml`` allows (IPython 8.12, ipykernel 7.4, distributed 2024.7).
``tests/test_compat.py`` exercises each door, and each fallback that can be reached honestly.
"""

from __future__ import annotations

import ast
import asyncio
import ctypes
import inspect
import sys
import threading
import traceback
import types
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = [
    "absorb",
    "async_raise",
    "cancel_reason",
    "cell_filename",
    "cell_number",
    "execution",
    "format_syntax_error",
    "format_traceback",
    "handled_exception",
    "iopub_loop",
    "kernel_log",
    "loop_thread_id",
    "magic_call",
    "magics_instance",
    "main_thread_id",
    "on_iopub_thread",
    "parent_header",
    "pickled_away_filename",
    "publish_error",
    "running_cell",
    "scheduler_address",
    "scheduler_workers",
    "tag_parent_header",
    "tag_unowned",
    "unregister_magics",
]

# --------------------------------------------------------------------------- CPython and asyncio

def async_raise(thread_id: int, exc_type: type[BaseException]) -> bool:
    """Raise ``exc_type()`` in another thread at its next bytecode.

    CPython's ``PyThreadState_SetAsyncExc`` (a documented C API, reached through ``ctypes``; checked
    on 3.10-3.13). Its thread id is an ``unsigned long`` (since 3.7): passed as ``c_ulong``, since
    ctypes' default int would overflow for ids above 2**31. The exception is delivered when the thread next runs Python code: a thread
    blocked in C (``time.sleep``, a lock, a socket read) gets it when that call returns. Returns
    False when no thread has that id (it has ended).

    Never "clear" a pending exception by passing NULL: CPython 3.11 then leaves its eval breaker
    signalled for every thread (each one re-checks pending work at every backward jump, and
    threads crawl). A raise that must not reach later code is absorbed instead (:func:`absorb`).
    """
    return bool(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type)))


def absorb(exc_type: type[BaseException]) -> bool:
    """Take delivery of an ``exc_type`` raised in this thread by :func:`async_raise` but not yet
    delivered, so it cannot surface in the code that runs next. Returns whether one came.

    Asynchronous exceptions are delivered at the interpreter's periodic checks, which a loop's
    backward jumps reach at once; a few thousand iterations are far more than enough.
    """
    try:
        for _ in range(10_000):
            pass
    except exc_type:
        return True
    return False


def handled_exception(thread_id: int) -> BaseException | None:
    """The exception that ``thread_id``'s code is handling now (in an ``except``/``finally``), if any.

    ``sys._current_exceptions()`` (CPython; 3.12+ maps threads to exceptions, 3.10-3.11 to
    ``exc_info`` tuples). Missing on other interpreters: None, so a deadline treats the thread as
    not cleaning up.
    """
    current = getattr(sys, "_current_exceptions", None)
    if current is None:  # pragma: no cover - not CPython
        return None
    value = current().get(thread_id)
    if isinstance(value, tuple):
        value = value[1]
    return value if isinstance(value, BaseException) else None


def is_running_in(thread_id: int, frame: types.FrameType) -> bool:
    """Whether ``frame`` is on ``thread_id``'s stack now (the function it belongs to has not
    returned or unwound).

    ``sys._current_frames()`` (CPython, documented; checked on 3.11-3.13). Missing on other
    interpreters: True, so callers keep treating the frame as running.
    """
    current = getattr(sys, "_current_frames", None)
    if current is None:  # pragma: no cover - not CPython
        return True
    running: types.FrameType | None = current().get(thread_id)
    while running is not None:
        if running is frame:
            return True
        running = running.f_back
    return False


def loop_thread_id(loop: asyncio.AbstractEventLoop) -> int | None:
    """The id of the thread running ``loop``, or None when it is not running.

    ``BaseEventLoop._thread_id`` (asyncio, private; set while the loop runs, checked on 3.10-3.13).
    Missing: None, and callers treat the loop as not running in the calling thread.
    """
    return getattr(loop, "_thread_id", None)


def main_thread_id() -> int:
    """The id of the main thread (public ``threading``; here so the doors above compare like ids)."""
    return threading.main_thread().ident or 0


# --------------------------------------------------------------------------- IPython

def cell_filename(shell: Any, source: str, number: int, raw: str) -> str | None:
    """Register ``source`` as code of cell ``number`` with IPython; return the file name its code
    objects should carry, the one tracebacks show as ``Cell In[7], line 3``.

    ``shell.compile.cache(transformed_code, number, raw_code)``: IPython's ``CachingCompiler``
    (checked on IPython 8.12 and 9.18; IPython 7 took the code and number only). Missing, or
    refusing these arguments: None, and the caller keeps the source in ``linecache`` under a name
    of its own, so tracebacks show ``<concur-cell-...>`` instead of the cell's number.
    """
    cache = getattr(getattr(shell, "compile", None), "cache", None)
    if cache is None:
        return None
    try:
        return str(cache(source, number, raw))
    except TypeError:  # another signature
        return None


def cell_number(shell: Any) -> int:
    """The number of the cell running now, the one its prompt shows (``In[7]``).

    ``shell.displayhook.prompt_count`` (a public property of IPython's ``DisplayHook``, which
    ipykernel's inherits): IPython up to 9.7 advances ``execution_count`` after running a cell,
    later releases before it (ipython/ipython#15088), and this property follows (checked on 8.12,
    where it is ``execution_count``, and 9.18, where it is ``execution_count - 1``). Missing: the
    newer rule, ``execution_count - 1``, which may name the cell before on an older IPython.
    """
    count = getattr(getattr(shell, "displayhook", None), "prompt_count", None)
    if isinstance(count, int):
        return count
    return max(int(getattr(shell, "execution_count", 1)) - 1, 0)


def format_traceback(shell: Any, error: BaseException, tb: TracebackType | None) -> list[str]:
    """The lines IPython shows for ``error`` raised along ``tb`` (all of whose frames are shown).

    ``shell.InteractiveTB.structured_traceback(etype, evalue, tb, tb_offset=0)`` (``ultratb``;
    the third parameter is ``tb`` in IPython 8 and ``etb`` in 9, so it is passed by position;
    checked on 8.12 and 9.18). Without a shell, an ``ultratb.VerboseTB`` of our own, made with
    ``theme_name`` (IPython 9) or ``color_scheme`` (IPython 8). If ``ultratb`` has neither: Python's
    own ``traceback.format_exception``, uncoloured, so a job still shows where it failed.
    """
    formatter = getattr(shell, "InteractiveTB", None)
    if formatter is None:
        from IPython.core import ultratb

        themes: tuple[dict[str, Any], ...] = ({"theme_name": "linux"}, {"color_scheme": "Linux"})
        for options in themes:
            try:
                formatter = ultratb.VerboseTB(**options)
                break
            except TypeError:  # the other major version's option
                pass
    if formatter is None:  # pragma: no cover - an IPython that takes neither
        return ["".join(traceback.format_exception(type(error), error, tb))]
    # tb_offset=0: the frames are already the user's; the default skips one.
    return list(formatter.structured_traceback(type(error), error, tb, tb_offset=0))


def format_syntax_error(shell: Any, error: SyntaxError) -> list[str] | None:
    """The lines IPython shows for a syntax error in a cell: its line and a caret, no frames.

    ``shell.SyntaxTB.structured_traceback(etype, evalue, [])`` (``ultratb.SyntaxTB``; its third
    parameter is ``elist`` in IPython 8 and ``etb`` in 9; checked on 8.12 and 9.18). Without it
    (a shell that is not IPython's): None, and the ``SyntaxError`` is shown as Python shows it.
    """
    formatter = getattr(shell, "SyntaxTB", None)
    if formatter is None:
        return None
    return list(formatter.structured_traceback(type(error), error, []))


def unregister_magics(shell: Any, magics: Any) -> bool:
    """Take a ``Magics`` instance's magics out of ``shell`` (``%unload_ext``); return whether done.

    IPython registers magics (``register_magics``) but has no way to take them back: we delete
    from ``MagicsManager.magics[kind]`` and ``MagicsManager.registry`` (traitlets dicts;
    checked on IPython 8.12 and 9.18). Only entries still bound to ``magics`` go, so a magic that
    someone registered over ours stays. Missing: False, and the magics stay registered, as IPython
    leaves those of any extension it unloads; a ``%load_ext`` registers fresh ones over them.
    """
    manager = getattr(shell, "magics_manager", None)
    table = getattr(manager, "magics", None)
    registry = getattr(manager, "registry", None)
    if not isinstance(table, dict) or not isinstance(registry, dict):
        return False
    for kind, names in magics.magics.items():
        for name in names:
            registered = table.get(kind, {}).get(name)
            if getattr(registered, "__self__", None) is magics:
                del table[kind][name]
    if registry.get(type(magics).__name__) is magics:
        del registry[type(magics).__name__]
    return True


def magics_instance(class_name: str) -> str:
    """Python source that evaluates, in a cell, to the registered ``Magics`` instance of that class.

    ``MagicsManager.registry`` (keyed by class name; checked on IPython 8.12 and 9.18). Used in
    code that the input transformer writes into a cell, so it must be an expression.
    """
    return f"get_ipython().magics_manager.registry[{class_name!r}]"


def magic_call(call: ast.Call) -> tuple[str, str, list[str]] | None:
    """``(kind, magic name, string arguments)`` when ``call`` is the call IPython makes of a magic.

    IPython's input transformers turn ``%%name line`` + body into
    ``get_ipython().run_cell_magic('name', 'line', 'body')`` and ``%name line`` into
    ``get_ipython().run_line_magic('name', 'line')`` (``inputtransformer2``; the text it generates
    is not an API; checked on IPython 8.12 and 9.18). Read from the syntax tree, not the text, so
    quoting does not matter. Another shape: None, and the magic runs as IPython calls it
    (synchronously: a ``%%timeout`` cell that awaits then says it needs the loop).
    """
    func = call.func
    if not (
        isinstance(func, ast.Attribute)
        and func.attr in ("run_cell_magic", "run_line_magic")
        and isinstance(func.value, ast.Call)
        and isinstance(func.value.func, ast.Name)
        and func.value.func.id == "get_ipython"
        and call.args
        and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in call.args)
        and not call.keywords
    ):
        return None
    values = [a.value for a in call.args]  # type: ignore[attr-defined]
    return func.attr, values[0], values[1:]


# --------------------------------------------------------------------------- ipykernel

def execution(shell: Any) -> tuple[str | None, str | None]:
    """``(cell id, request id)`` of the execute request running now, as far as they are known.

    The cell id is the frontend's ``metadata.cellId`` (JupyterLab 3+, Notebook 7 and nbclient send
    it); the request id is the parent header's ``msg_id``, different at every run. Read through
    ipykernel's public ``Kernel.get_parent()`` (ipykernel 6+, per-context since 7). Outside a
    kernel: ``(None, None)``.
    """
    kernel = getattr(shell, "kernel", None)
    get_parent = getattr(kernel, "get_parent", None)
    if get_parent is None:
        return None, None
    try:
        parent = get_parent("shell")
    except TypeError:  # pragma: no cover - ipykernel 6 takes no channel
        parent = get_parent()
    parent = parent or {}
    cell = parent.get("metadata", {}).get("cellId")
    request = parent.get("header", {}).get("msg_id")
    return (str(cell) if cell else None), (str(request) if request else None)


def running_cell(shell: Any) -> str | None:
    """The code of the execute request running now, as the frontend sent it (None if unknown).

    The ``code`` of ipykernel's parent header, read through ``Kernel.get_parent()`` as in
    :func:`execution` (ipykernel 6+, per-context since 7; checked on 7.4). A magic's body is the
    tail of it, so the lines above tell where the body starts and what they say.
    """
    kernel = getattr(shell, "kernel", None)
    get_parent = getattr(kernel, "get_parent", None)
    if get_parent is None:
        return None
    try:
        parent = get_parent("shell")
    except TypeError:  # pragma: no cover - ipykernel 6 takes no channel
        parent = get_parent()
    parent = parent or {}
    if parent.get("header", {}).get("msg_type") != "execute_request":
        return None
    code = parent.get("content", {}).get("code")
    return code if isinstance(code, str) else None


def publish_error(shell: Any, etype: type[BaseException], evalue: BaseException, stb: list[str]) -> None:
    """Show a job's traceback (``stb``) in its cell without touching the running cell's outcome.

    ipykernel's ``ZMQInteractiveShell._showtraceback`` (7.x) marks *the execute request running
    now* as failed when the displayhook is publishing a result at that moment (the shell-global
    ``_last_traceback_during_displayhook``): a job failing in another thread would fail a foreground
    cell at random. So we send the same ``error`` message it sends, through the displayhook's
    ``session`` and ``pub_socket``, with its per-context ``parent_header`` (ipykernel 6.x-7.4).
    Without those (a terminal IPython), the shell's own ``_showtraceback`` prints it.
    """
    display_hook = shell.displayhook
    session = getattr(display_hook, "session", None)
    socket = getattr(display_hook, "pub_socket", None)
    if session is None or socket is None:
        shell._showtraceback(etype, evalue, stb)
        return
    from ipykernel.jsonutil import json_clean

    sys.stdout.flush()
    sys.stderr.flush()
    topic = getattr(display_hook, "topic", None)
    content = {"traceback": stb, "ename": etype.__name__, "evalue": str(evalue)}
    session.send(socket, "error", json_clean(content), display_hook.parent_header,
                 ident=topic.replace(b"execute_result", b"error") if topic else None)


def iopub_loop(shell: Any) -> Any:
    """The Tornado IOLoop of ipykernel's IOPub thread (it runs while a cell blocks the main thread),
    for timers that must keep firing then (clocks, status lines).

    ``kernel.iopub_thread.io_loop`` (ipykernel 6.0-7.4, public attributes but undocumented; checked
    on 7.4). Missing (a terminal IPython): None, and callers show nothing that needs
    refreshing. To run one function there, :func:`on_iopub_thread` uses the public door.
    """
    iopub = getattr(getattr(shell, "kernel", None), "iopub_thread", None)
    return getattr(iopub, "io_loop", None)


def on_iopub_thread(shell: Any, fn: Callable[[], object]) -> bool:
    """Call ``fn`` on ipykernel's IOPub thread, soon; return False outside a kernel (not called).

    ``IOPubThread.schedule`` (ipykernel's public, thread-safe way in; it calls ``fn`` at once if
    the thread has ended; checked on 7.4), reached as ``kernel.iopub_thread``.
    """
    schedule = getattr(getattr(getattr(shell, "kernel", None), "iopub_thread", None), "schedule", None)
    if schedule is None:
        return False
    schedule(fn)
    return True


def parent_header(shell: Any) -> dict[str, Any]:
    """The parent header output gets in the calling context (the request of the cell it belongs to).

    ``OutStream.parent_header`` (ipykernel 6-7.4: per context since 7). Outside a kernel: ``{}``.
    """
    header = getattr(sys.stdout, "parent_header", None)
    return dict(header) if isinstance(header, dict) else {}


def _publishers(shell: Any) -> list[Any]:
    return [obj for obj in (sys.stdout, sys.stderr, getattr(shell, "display_pub", None),
                            getattr(shell, "displayhook", None)) if hasattr(obj, "set_thread_parent")]


def tag_parent_header(shell: Any, key: str, value: Any) -> None:
    """Add ``key: value`` to the parent header of everything the calling context sends.

    ipykernel 7's public ``set_thread_parent`` on its streams, display publisher and display hook
    (per context). Missing (ipykernel 6): nothing is tagged, and a job's output is routed by its
    context alone (not into its log, and not moved by a rerun).
    """
    for publisher in _publishers(shell):
        header = publisher.parent_header
        if isinstance(header, dict) and "msg_id" in header:  # no request, no cell to route to
            publisher.set_thread_parent({**header, key: value})


def tag_unowned(key: str) -> None:
    """Mark the parent header that ipykernel's streams give writers no context names (the thread
    that reads file descriptors 1 and 2, threads started outside any job).

    ``OutStream._parent_header_global`` (private; ipykernel 7.0-7.4), set by each request's
    ``set_parent``: call after it (a ``pre_execute`` handler). Missing: nothing is marked.
    """
    for stream in (sys.stdout, sys.stderr):
        header = getattr(stream, "_parent_header_global", None)
        if isinstance(header, dict) and header:
            stream._parent_header_global = {**header, key: True}  # type: ignore[union-attr]


def kernel_log() -> Any:
    """The kernel's own logger (a :class:`logging.Logger`), or None outside a kernel.

    ``get_ipython().kernel.log``: ipykernel's ``IPKernelApp`` logger, shared by its kernel object
    (a traitlets ``LoggingConfigurable``). When ipykernel captures file descriptor 2 it points that
    logger's stderr handler at a copy of the process's original stderr
    (``IPKernelApp.init_io``, ipykernel 6.x-7.4, checked on 7.4), so what it writes reaches the
    terminal or the server's log and never a notebook. Missing (a terminal IPython, a script):
    None, and callers leave logging alone.
    """
    import logging

    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return None
    log = getattr(getattr(get_ipython(), "kernel", None), "log", None)
    return log if isinstance(log, logging.Logger) else None


# --------------------------------------------------------------------------- distributed

def scheduler_address(client: Any) -> str:
    """The address of the scheduler ``client`` is connected to, without asking it.

    ``Client.scheduler.address`` (the client's connection to the scheduler; an attribute not in
    distributed's docs, checked on 2024.7.0 and 2026.8.0). Missing: the address of the client's
    own cluster (``Client.cluster.scheduler_address``, public, for a cluster the kernel made),
    else ``"an unknown address"``: this only names the scheduler in messages.
    """
    address = getattr(getattr(client, "scheduler", None), "address", None)
    if not isinstance(address, str):
        address = getattr(getattr(client, "cluster", None), "scheduler_address", None)
    return address if isinstance(address, str) else "an unknown address"


def scheduler_workers(client: Any) -> dict[str, dict[str, Any]]:
    """Every worker of the cluster, by address, with what the scheduler knows of it
    (``nthreads``, ``memory_limit``, ...).

    ``Client.scheduler_info()`` (public). Releases since 2025 list only some workers unless asked
    for all with ``n_workers=-1``, an argument earlier releases refuse (checked on 2024.7.0, which
    has no such argument, and 2026.8.0): passed when its signature has it.
    """
    try:
        accepts = "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):  # pragma: no cover - no signature to read
        accepts = False
    info = client.scheduler_info(n_workers=-1) if accepts else client.scheduler_info()
    return dict(info.get("workers", {}))


def cancel_reason(exc: BaseException) -> str | None:
    """Why Dask cancelled a future, from the exception its ``result()`` raised (None if it was not
    a cancellation).

    ``distributed.client.FutureCancelledError.reason`` (``"scheduler-connection-lost"`` when the
    client lost the scheduler, set by ``Client._reconnect``; not in distributed's docs; checked on
    2026.8.0).
    """
    if type(exc).__name__ != "FutureCancelledError":
        return None
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) else "unknown"


# Read where this module is not: on Dask workers and schedulers, which need not have concur_magics
# (the code that runs there is shipped by value and can't import it).
# - ``Worker.plugins`` (the worker plugins by name; an attribute of ``distributed.Worker``, not in
#   its docs; checked on 2024.7.0 and 2026.8.0): ``concur_magics.remote._started`` finds its
#   kernel's ``OutputRouting`` there. Missing: the task's output goes to the worker's own log.
# - ``Nanny.pid`` (the pid of the worker process a nanny runs, handed to ``Client.run(...,
#   nanny=True)`` functions as ``dask_worker``; checked on 2024.7.0 and 2026.8.0):
#   ``concur_magics.remote._kill_worker_process`` compares it with the pid of the task to stop.
#   Missing: that function raises a ``RuntimeError`` naming distributed's version, and the stop
#   falls back to asking the worker process to end itself.
# - ``Scheduler.worker_plugins`` (names of the plugins every joining worker gets; checked on
#   2026.8.0): ``tests/test_dask_remote.py`` checks that ours are gone from it.


# --------------------------------------------------------------------------- cloudpickle

def pickled_away_filename(filename: str) -> bool:
    """Whether ``filename`` is the stand-in cloudpickle gives the code of functions it pickles by
    value (a notebook's functions, shipped to a Dask worker).

    cloudpickle 3.1+ replaces ``co_filename`` with ``"<dynamic-code>"`` so that its payloads are
    deterministic (``cloudpickle._code_reduce``; checked on 3.1.3). Frames of such functions on a
    worker no longer say which cell they come from; the kernel finds out by name and first line.
    Earlier releases keep the real name: this returns False and the name is used as it is.
    """
    return filename == "<dynamic-code>"
