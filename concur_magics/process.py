"""Run work in a forked child that can be killed at a deadline, and bring its results back.

The child is a copy-on-write fork of the caller, so it sees the whole namespace as it is without
pickling anything going in. It leads its own process group, so one ``killpg(SIGKILL)`` at the
deadline stops it and everything it started, even in C code holding the GIL; the parent then reaps
it. While it runs, its ``print`` output, ``display()`` calls and ``clear_output()`` come to the parent
over a pipe and are replayed there, so they show live in the cell that started the work.

When it ends, only what the work *changed* comes back: names that are new, rebound or deleted. A
value that refers to an object that already was in the namespace (a class, a big array, the
namespace itself as a function's globals) is sent as a reference to that name rather than a copy.
Mutating an object in place changes only the child's copy: assign to bring a result back.
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
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle
from IPython.core.displaypub import DisplayPublisher
from tblib import Traceback

from .output import format_traceback, with_rendered_traceback, write_stream
from .timeout import CellTimeout

__all__ = ["ChildDied", "ChildResult", "NamesNotCopiedWarning", "kill_all", "run_in_child"]


class NamesNotCopiedWarning(UserWarning):
    """Some names a process-mode cell assigned could not be brought back (not picklable)."""


# Shown every time, not once per location: each cell's unpicklable names are news to its user.
warnings.simplefilter("always", NamesNotCopiedWarning)


class ChildDied(RuntimeError):
    """The child process ended without reporting a result (crashed, killed, or called os._exit)."""


@dataclass
class ChildResult:
    """What came back from the child."""

    value: Any = None
    names: dict[str, Any] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    not_copied: dict[str, str] = field(default_factory=dict)


# pids of children that are running now; a shutdown kills whatever is left (see kill_all).
_live: set[int] = set()


def kill_all() -> None:
    """Kill every running child's process group and reap it (unload and kernel shutdown)."""
    for pid in list(_live):
        _kill_and_reap(pid)


def run_in_child(
    work: Callable[[dict[str, Any]], Any],
    namespace: dict[str, Any],
    limit: float,
    *,
    copy_back: bool = False,
    shell: Any = None,
    children: Any = None,
) -> ChildResult:
    """Run ``work(namespace)`` in a forked child, killing it at ``limit`` seconds.

    Parameters
    ----------
    work:
        Called in the child with ``namespace``; its return value comes back as ``value``.
    namespace:
        The namespace the work runs in; with ``copy_back`` the names it changes come back into it.
    limit:
        Seconds until the child and its process group are killed.
    copy_back:
        Bring new, rebound and deleted names back into ``namespace``.
    shell:
        The IPython shell whose display publisher should show the child's ``display()`` calls.

    Raises
    ------
    CellTimeout
        At the deadline (the child has been killed and reaped by then).
    ChildDied
        If the child ended without a result.
    RuntimeError
        Where ``os.fork`` does not exist.
    BaseException
        Whatever the work raised in the child, with the child's traceback.
    """
    __tracebackhide__ = True
    if not hasattr(os, "fork"):
        raise RuntimeError("process mode needs os.fork, which this platform does not have")
    read_fd, write_fd = os.pipe()
    deadline = time.monotonic() + limit
    pid = _fork()
    if pid == 0:  # pragma: no cover - runs in the child, which never returns
        os.close(read_fd)
        _child_main(work, namespace, Connection(write_fd, readable=False), shell, copy_back)
    _live.add(pid)
    os.close(write_fd)
    conn = Connection(read_fd, writable=False)
    try:
        # Either side may win the race to make the child a group leader; both ask.
        os.setpgid(pid, pid)
    except OSError:
        pass  # the child already did it, or already exited
    try:
        return _relay(conn, pid, deadline, limit, namespace, shell)
    finally:
        conn.close()
        _kill_and_reap(pid)


def _fork() -> int:
    # Python 3.12+ warns that forking a multi-threaded process may deadlock the child, because
    # locks held by other threads stay locked in it. Our child never touches the parent's threads,
    # sockets or their locks: before running the work it replaces sys.stdout/stderr and the display
    # publisher with its own pipe, never uses ZMQ or the event loop, and leaves with os._exit. The
    # user's code in it takes the same risk as under multiprocessing's "fork" start method. So we
    # silence exactly that warning, for this call only.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning
        )
        return os.fork()


# --------------------------------------------------------------------------- parent side


def _relay(
    conn: Connection,
    pid: int,
    deadline: float,
    limit: float,
    namespace: dict[str, Any],
    shell: Any,
) -> ChildResult:
    """Replay the child's messages until it reports its result or the deadline passes."""
    __tracebackhide__ = True
    result = ChildResult()
    loader = _NamespaceUnpickler.factory(namespace)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not conn.poll(remaining):
            if time.monotonic() >= deadline:
                _kill_and_reap(pid)
                _drain(conn, shell)
                raise CellTimeout(limit, "process", "killed", f"(pid {pid})")
            continue
        try:
            kind, *payload = pickle.loads(conn.recv_bytes())
        except EOFError:
            status = _kill_and_reap(pid)
            raise ChildDied(f"the cell's process (pid {pid}) ended without a result: {status}") from None
        if kind == "stream":
            write_stream(*payload)
        elif kind == "display":
            _display(shell, *payload)
        elif kind == "name":
            name, data = payload
            try:
                result.names[name] = loader(data)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported by name
                result.not_copied[name] = f"{type(exc).__name__}: {exc}"
        elif kind == "not_copied":
            result.not_copied[payload[0]] = payload[1]
        elif kind == "deleted":
            result.deleted = payload[0]
        elif kind == "value":
            result.value = loader(payload[0])
        elif kind == "error":
            raise _rebuild_error(*payload)
        elif kind == "done":
            break
    namespace.update(result.names)
    for name in result.deleted:
        namespace.pop(name, None)
    if result.not_copied:
        listed = "; ".join(f"{name!r} ({why})" for name, why in sorted(result.not_copied.items()))
        warnings.warn(
            f"not copied back from the process-mode cell, because they can't be pickled: {listed}",
            NamesNotCopiedWarning,
            stacklevel=2,
        )
    return result


def _display(shell: Any, kind: str, kwargs: dict[str, Any]) -> None:
    if shell is None:
        return
    if kind == "clear":
        shell.display_pub.clear_output(**kwargs)
    else:
        shell.display_pub.publish(**kwargs)


def _drain(conn: Connection, shell: Any) -> None:
    """Show output the child produced before it was killed."""
    try:
        while conn.poll(0):
            kind, *payload = pickle.loads(conn.recv_bytes())
            if kind == "stream":
                write_stream(*payload)
            elif kind == "display":
                _display(shell, *payload)
    except (EOFError, OSError, pickle.UnpicklingError):
        pass


def _rebuild_error(
    data: bytes | None, tb: dict[str, Any] | None, text: str, rendered: list[str] | None = None
) -> BaseException:
    exc: BaseException
    try:
        exc = pickle.loads(data) if data is not None else ChildDied(text)
    except Exception:  # noqa: BLE001 - an exception that can't be rebuilt is described instead
        exc = ChildDied(f"the cell raised an exception that can't be copied back:\n{text}")
    if tb is not None:
        # The child's frames, for code that inspects the traceback; IPython shows `rendered`.
        exc = exc.with_traceback(Traceback.from_dict(tb).as_traceback())
    return with_rendered_traceback(exc, rendered)


def _kill_and_reap(pid: int) -> str:
    """SIGKILL the child's process group, reap the child and say how it ended. Idempotent."""
    if pid not in _live:
        return "already reaped"
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        status = 0
    finally:
        _live.discard(pid)
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"


class _NamespaceUnpickler(pickle.Unpickler):
    """Resolves references to the caller's namespace (and names in it) made by the child."""

    def __init__(self, file: io.BytesIO, namespace: dict[str, Any]) -> None:
        super().__init__(file)
        self.namespace = namespace

    def persistent_load(self, pid: Any) -> Any:
        if pid == ("ns",):
            return self.namespace
        if isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "ns":
            return self.namespace[pid[1]]
        raise pickle.UnpicklingError(f"unknown reference {pid!r}")

    @classmethod
    def factory(cls, namespace: dict[str, Any]) -> Callable[[bytes], Any]:
        return lambda data: cls(io.BytesIO(data), namespace).load()


# --------------------------------------------------------------------------- child side


class _NamespacePickler(cloudpickle.Pickler):
    """Pickles what changed in the child without dragging the namespace along.

    The namespace dict becomes a reference (so functions defined in the cell get the caller's
    namespace as their globals, not a pickled copy of every global they name), and any object that
    was already bound to a name before the work ran becomes a reference to that name.
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


class _PipeStream(io.TextIOBase):
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


def _child_main(
    work: Callable[[dict[str, Any]], Any],
    namespace: dict[str, Any],
    conn: Connection,
    shell: Any,
    copy_back: bool,
) -> None:  # pragma: no cover - measured through the tests that run it in a kernel
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

        streams = (_PipeStream(send, "stdout", 1), _PipeStream(send, "stderr", 2))
        sys.stdout, sys.stderr = streams
        if shell is not None:
            shell.display_pub = _PipePublisher(send)
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
    _NamespacePickler(buffer, namespace, before).dump(value)
    return buffer.getvalue()


def _describe_error(exc: BaseException, shell: Any) -> tuple[Any, ...]:
    import traceback

    text = "".join(traceback.format_exception(exc))
    try:
        data: bytes | None = cloudpickle.dumps(exc)
    except Exception:  # noqa: BLE001 - described as text instead
        data = None
    tb = exc.__traceback__
    # Start the traceback at the user's code, not at this module's plumbing.
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    rendered = None
    if shell is not None:
        try:
            rendered = format_traceback(exc.with_traceback(tb), shell)
        except Exception:  # noqa: BLE001 - the plain traceback still goes back
            rendered = None
    return ("error", data, Traceback(tb).to_dict() if tb is not None else None, text, rendered)


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


class _PipePublisher(DisplayPublisher):
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


class Children:
    """Process-mode children running now, owned by the extension's one owner object."""

    def kill_all(self) -> None:
        kill_all()
