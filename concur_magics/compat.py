"""The one door to private or version-dependent internals of the libraries we build on.

Every use of an undocumented detail of CPython, asyncio, IPython, ipykernel or distributed goes
through a function here, with a comment naming the detail, the versions it was checked on, and what
happens when it is missing. Checked on CPython 3.10-3.13, ipykernel 7.4, IPython 9.18.
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
import threading
from typing import Any

__all__ = [
    "absorb",
    "async_raise",
    "execution",
    "fd_watcher",
    "handled_exception",
    "iopub_loop",
    "kernel_log",
    "loop_thread_id",
    "parent_header",
    "pickled_away_filename",
    "publish_error",
    "running_cell",
    "tag_parent_header",
    "tag_unowned",
]


def async_raise(thread_id: int, exc_type: type[BaseException]) -> bool:
    """Raise ``exc_type()`` in another thread at its next bytecode.

    CPython's ``PyThreadState_SetAsyncExc`` (a documented C API, reached through ``ctypes``; checked
    on 3.10-3.13). The exception is delivered when the thread next runs Python code: a thread
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


def loop_thread_id(loop: asyncio.AbstractEventLoop) -> int | None:
    """The id of the thread running ``loop``, or None when it is not running.

    ``BaseEventLoop._thread_id`` (asyncio, private; set while the loop runs, checked on 3.10-3.13).
    Missing: None, and callers treat the loop as not running in the calling thread.
    """
    return getattr(loop, "_thread_id", None)


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


def main_thread_id() -> int:
    return threading.main_thread().ident or 0


def iopub_loop(shell: Any) -> Any:
    """The Tornado IOLoop of ipykernel's IOPub thread (it runs while a cell blocks the main thread).

    ``kernel.iopub_thread.io_loop`` (ipykernel 6-7.4, public attributes but undocumented). Missing
    (a terminal IPython): None, and callers show nothing that needs refreshing.
    """
    iopub = getattr(getattr(shell, "kernel", None), "iopub_thread", None)
    return getattr(iopub, "io_loop", None)


def fd_watcher(stream: Any) -> threading.Thread | None:
    """The thread in which ipykernel passes on what was written to file descriptor 1 or 2.

    ``OutStream.watch_fd_thread`` (ipykernel 6-7.4, private; set when the stream captures its fd,
    which ipykernel skips under pytest). Missing: None, and such writes are not told apart.
    """
    thread = getattr(stream, "watch_fd_thread", None)
    return thread if isinstance(thread, threading.Thread) else None


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
def pickled_away_filename(filename: str) -> bool:
    """Whether ``filename`` is the stand-in cloudpickle gives the code of functions it pickles by
    value (a notebook's functions, shipped to a Dask worker).

    cloudpickle 3.1+ replaces ``co_filename`` with ``"<dynamic-code>"`` so that its payloads are
    deterministic (``cloudpickle._code_reduce``; checked on 3.1.3). Frames of such functions on a
    worker no longer say which cell they come from; the kernel finds out by name and first line.
    Earlier releases keep the real name: this returns False and the name is used as it is.
    """
    return filename == "<dynamic-code>"


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


# Read where this module is not: on Dask workers and schedulers, which need not have concur_magics.
# - ``Worker.plugins`` (the worker plugins by name; an attribute of ``distributed.Worker``, not in
#   its docs; checked on 2026.8.0): ``concur_magics.remote._started`` finds its kernel's
#   ``OutputRouting`` there.
# - ``Scheduler.worker_plugins`` (names of the plugins every joining worker gets; checked on
#   2026.8.0): ``tests/test_dask_remote.py`` checks that ours are gone from it.


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
