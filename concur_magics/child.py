"""The child side of process mode: run the work in a forked child and report to the parent.

:func:`child_main` runs in the child right after ``fork()`` and never returns: it leaves with
``os._exit``. Everything the child tells the parent travels over one pipe as pickled tuples, in
this order:

``("stream", name, text)``
    A line of ``stdout`` / ``stderr`` text (or less, on ``flush()``).
``("display", "publish" | "clear", kwargs)``
    A ``display()`` or ``clear_output()`` call.
``("name", name, data)`` / ``("not_copied", name, why)`` / ``("deleted", [names])``
    What the work changed in the namespace (with ``copy_back``).
``("value", data)`` then ``("done",)``, or ``("error", data, tb, text, rendered)``
    How it ended.

The parent side, which replays all this, is :mod:`concur_magics.process`.
"""

from __future__ import annotations

import builtins
import ctypes
import io
import os
import pickle
import signal
import sys
import threading
import types
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle
from IPython.core.displaypub import DisplayPublisher
from tblib import Traceback

from .output import format_traceback

__all__ = ["child_main"]

class PipeStream(io.TextIOBase):
    """sys.stdout / sys.stderr in the child: line-buffered writes that go to the parent."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None], name: str, fd: int) -> None:
        self._send = send
        self._name = name
        self._fd = fd
        self._buffer: list[str] = []

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"<{self._name}>"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer.append(str(text))
        if "\n" in text:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            text, self._buffer = "".join(self._buffer), []
            self._send(("stream", self._name, text))

    def fileno(self) -> int:
        # C code and subprocesses write to the real descriptor, which the kernel already captures.
        return self._fd


class PipePublisher(DisplayPublisher):
    """Stands in for the shell's display publisher in the child; the parent publishes for real."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__()
        self._send = send

    def publish(
        self,
        data: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        source: Any = None,
        *,
        transient: dict[str, Any] | None = None,
        update: bool = False,
        **kwargs: Any,
    ) -> None:
        message = {"data": data, "metadata": metadata, "transient": transient, "update": update}
        self._send(("display", "publish", message))

    def clear_output(self, wait: bool = False) -> None:
        self._send(("display", "clear", {"wait": wait}))


def child_main(
    work: Callable[[dict[str, Any]], Any],
    namespace: dict[str, Any],
    conn: Connection,
    shell: Any,
    copy_back: bool,
) -> None:  # pragma: no cover - measured through the tests that run it in a kernel
    """Run ``work(namespace)`` and report to the parent over ``conn``; leave with ``os._exit``.

    Parameters
    ----------
    work:
        Called with ``namespace``.
    namespace:
        The (copy-on-write) namespace; with ``copy_back`` the names the work changes are sent.
    conn:
        The write end of the pipe to the parent.
    shell:
        The IPython shell whose display publisher is replaced by one that sends to the parent.
    copy_back:
        Send new, rebound and deleted names.
    """
    code = 0
    try:
        os.setpgid(0, 0)
        _die_with_parent()
        lock = threading.RLock()

        def send(message: tuple[Any, ...]) -> None:
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
            with lock:
                if message[0] != "stream":
                    # Keep the order the user sees: pending text goes before a display or a result.
                    streams[0].flush()
                    streams[1].flush()
                conn.send_bytes(data)

        streams = (PipeStream(send, "stdout", 1), PipeStream(send, "stderr", 2))
        sys.stdout, sys.stderr = streams
        if shell is not None:
            shell.display_pub = PipePublisher(send)
        builtins.input = _no_input  # type: ignore[assignment]
        before = dict(namespace)
        try:
            value = work(namespace)
        except BaseException as exc:  # noqa: BLE001 - everything the work raises goes to the parent
            send(_describe_error(exc, shell))
        else:
            if copy_back:
                _send_changes(send, namespace, before)
            _send_value(send, value, namespace, before)
            send(("done",))
    except BaseException:  # noqa: BLE001 - the child must never return into the caller's code
        code = 70
    finally:
        _flush_c_stdio()
        os._exit(code)


# --------------------------------------------------------------------------- names and values


class NamespacePickler(cloudpickle.Pickler):
    """Pickles what changed in the child without dragging the namespace along.

    The namespace dict becomes a reference (so functions defined in the cell get the caller's
    namespace as their globals, not a pickled copy of every global they name), and any object that
    was already bound to a name before the work ran becomes a reference to that name. The parent
    resolves both with ``process._NamespaceUnpickler``.
    """

    def __init__(self, file: io.BytesIO, namespace: dict[str, Any], before: dict[str, Any]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.namespace = namespace
        self.by_id = {id(value): name for name, value in before.items()}
        self.before = before

    def persistent_id(self, obj: Any) -> Any:
        if obj is self.namespace:
            return ("ns",)
        name = self.by_id.get(id(obj))
        if name is not None and self.before.get(name) is obj and not _is_atom(obj):
            return ("ns", name)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType) and obj.__globals__ is self.namespace:
            return _make_function, (
                obj.__code__,
                self.namespace,
                obj.__name__,
                obj.__defaults__,
                obj.__closure__,
                {
                    "__qualname__": obj.__qualname__,
                    "__kwdefaults__": obj.__kwdefaults__,
                    "__annotations__": obj.__annotations__,
                    "__doc__": obj.__doc__,
                    "__module__": obj.__module__,
                    "__dict__": obj.__dict__,
                },
            )
        return super().reducer_override(obj)


def _is_atom(obj: Any) -> bool:
    # Small immutable values are cheaper to copy than to reference, and may be shared by chance.
    return obj is None or isinstance(obj, (bool, int, float, complex, str, bytes))


def _make_function(
    code: types.CodeType,
    globals_: dict[str, Any],
    name: str,
    defaults: tuple[Any, ...] | None,
    closure: tuple[Any, ...] | None,
    attrs: dict[str, Any],
) -> types.FunctionType:
    fn = types.FunctionType(code, globals_, name, defaults, closure)
    for key, value in attrs.items():
        setattr(fn, key, value)
    return fn


def _send_changes(send: Callable[..., None], namespace: dict[str, Any], before: dict[str, Any]) -> None:
    for name, value in list(namespace.items()):
        if name == "__builtins__" or before.get(name, _MISSING) is value:
            continue
        try:
            send(("name", name, _dumps(value, namespace, before)))
        except Exception as exc:  # noqa: BLE001 - reported to the user by name
            send(("not_copied", name, f"{type(exc).__name__}: {exc}"))
    send(("deleted", [name for name in before if name not in namespace]))


def _send_value(send: Callable[..., None], value: Any, namespace: dict[str, Any], before: dict[str, Any]) -> None:
    try:
        data = _dumps(value, namespace, before)
    except Exception as exc:  # noqa: BLE001 - the value is replaced by a description
        data = pickle.dumps(f"<result of type {type(value).__name__} could not be pickled: {exc}>")
    send(("value", data))


_MISSING = object()
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _dumps(value: Any, namespace: dict[str, Any], before: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    NamespacePickler(buffer, namespace, before).dump(value)
    return buffer.getvalue()


def _describe_error(exc: BaseException, shell: Any) -> tuple[Any, ...]:
    import traceback

    text = "".join(traceback.format_exception(exc))
    try:
        data: bytes | None = cloudpickle.dumps(exc)
    except Exception:  # noqa: BLE001 - described as text instead
        data = None
    tb = exc.__traceback__
    # Start the traceback at the user's code, not at this package's plumbing.
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    rendered = None
    if shell is not None:
        try:
            rendered = format_traceback(exc.with_traceback(tb), shell)
        except Exception:  # noqa: BLE001 - the plain traceback still goes back
            rendered = None
    return ("error", data, Traceback(tb).to_dict() if tb is not None else None, text, rendered)


# --------------------------------------------------------------------------- the process itself


def _no_input(prompt: str = "") -> str:
    raise RuntimeError("input() is not available in a process-mode cell: it has no stdin channel")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this child if the kernel dies first, so no orphan is left behind."""
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(71)


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
