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

__all__ = ["async_raise", "cell_id", "handled_exception", "loop_thread_id"]


def async_raise(thread_id: int, exc_type: type[BaseException] | None) -> bool:
    """Raise ``exc_type()`` in another thread at its next bytecode; ``None`` clears a pending one.

    CPython's ``PyThreadState_SetAsyncExc`` (a documented C API, reached through ``ctypes``; checked
    on 3.10-3.13). The exception is delivered when the thread next runs Python code: a thread
    blocked in C (``time.sleep``, a lock, a socket read) gets it when that call returns. Returns
    False when no thread has that id (it has ended).
    """
    exc: Any = ctypes.py_object(exc_type) if exc_type is not None else None
    return bool(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc))


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


def cell_id(shell: Any) -> str | None:
    """The frontend's id of the cell being executed (``metadata.cellId`` of the execute request).

    JupyterLab 3+, Notebook 7 and nbclient send it. Read through ipykernel's public
    ``Kernel.get_parent()`` (ipykernel 6+, per-context since 7). Outside a kernel: None.
    """
    kernel = getattr(shell, "kernel", None)
    get_parent = getattr(kernel, "get_parent", None)
    if get_parent is None:
        return None
    try:
        parent = get_parent("shell")
    except TypeError:  # pragma: no cover - ipykernel 6 takes no channel
        parent = get_parent()
    value = (parent or {}).get("metadata", {}).get("cellId")
    return str(value) if value else None


def main_thread_id() -> int:
    return threading.main_thread().ident or 0
