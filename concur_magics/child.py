"""The child side of process mode: run the work in a forked child and report to the parent.

:func:`child_main` runs in the child right after ``fork()`` and never returns: it leaves with
``os._exit``. Everything the child tells the parent travels over one pipe as pickled tuples, in
this order:

``("streams", [(name, text), ...], batch)``
    A batch of ``stdout`` / ``stderr`` text, in the order it was written, and its number in
    :class:`UnsentText` (-1 for text sent without passing through it; see :class:`Outbox`).
``("display", "publish" | "clear", kwargs)``
    A ``display()`` or ``clear_output()`` call.
``("finished",)``
    The work has returned or raised. From here on the parent no longer applies the deadline,
    only the bound on copying back (``process.COPY_BACK_LIMIT``).
``("name", name, data)`` / ``("not_copied", name, why)`` / ``("deleted", [names])``
    What the work changed in the namespace (with ``copy_back``).
``("value", data)`` then ``("done",)``, or ``("error", data, tb, text, rendered)``
    How it ended.
``("where", frames)``
    The user's frames running now (tblib's form, or None), sent when the parent asks with
    ``WHERE_SIGNAL`` just before it kills the child at the deadline, so the ``CellTimeout`` can
    show the line that was stopped. A child stuck in C code holding the GIL does not answer.

Text waiting to go out sits in memory shared with the parent (:class:`UnsentText`), so a child
killed at its deadline still has its last lines shown. The parent side, which replays all this, is
:mod:`concur_magics.process`.
"""

from __future__ import annotations

import builtins
import ctypes
import io
import mmap
import os
import pickle
import signal
import struct
import sys
import threading
import time
import types
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle
from IPython.core.displaypub import DisplayPublisher
from tblib import Traceback

from .tracebacks import carried_frames, format_traceback, stack_frames, user_frames

__all__ = ["BATCH_BYTES", "BATCH_SECONDS", "WHERE_SIGNAL", "Outbox", "UnsentText", "child_main"]

# Text is sent in batches: per-line messages cost a pickle, a pipe write and, in the parent, a
# write and flush to the kernel's stream each, which made a print loop ~50x slower than in the
# kernel itself. A batch goes when it holds this much text, or when a line ends this long after the
# last send (so the first line after a pause is not delayed), or from the flusher thread this long
# after the last send (so trailing text shows while the work sleeps).
BATCH_BYTES = 64 * 1024
BATCH_SECONDS = 0.05
# How the parent asks the child where its work is. Not the deadline engine's signal (SIGRTMIN+3),
# which the child inherits for timeouts of its own.
_RTMIN = getattr(signal, "SIGRTMIN", None)
WHERE_SIGNAL = int(_RTMIN) + 4 if _RTMIN is not None else int(signal.SIGUSR2)


class UnsentText:
    """The batch of text the child has not sent yet, in memory it shares with the parent.

    The parent makes it (an anonymous shared mapping) before the fork. If the child is killed with
    lines still here — its flusher thread can't run while C code holds the GIL — the parent reads
    them once the child is dead (:meth:`after_death`): the last lines before a stuck call are the
    ones a user needs. Only the child writes to it.

    Layout: the batch number and the bytes used (8 bytes each), then runs of text of one stream
    each: the stream (``b"o"`` or ``b"e"``), the run's length in bytes (4 bytes), its UTF-8 text.
    """

    _COUNT = struct.Struct("<Q")
    _RUN = struct.Struct("<cI")
    _START = 16
    _CODES = {"stdout": b"o", "stderr": b"e"}
    _NAMES = {b"o": "stdout", b"e": "stderr"}

    def __init__(self, capacity: int = BATCH_BYTES) -> None:
        self.memory = mmap.mmap(-1, self._START + capacity)  # shared and anonymous by default
        self.batch = 0
        self.used = 0
        self._run_at = 0  # where the header of the last run is
        self._run_code = b""

    def append(self, name: str, data: bytes) -> bool:
        """Add UTF-8 ``data`` for stream ``name`` to the batch; False if it does not fit."""
        code = self._CODES[name]
        at = self._START + self.used
        header = 0 if code == self._run_code else self._RUN.size
        if at + header + len(data) > len(self.memory):
            return False
        if header:
            self._run_at, self._run_code = at, code
        self.memory[at + header : at + header + len(data)] = data
        self.used += header + len(data)
        self._RUN.pack_into(self.memory, self._run_at, code, self._START + self.used - self._run_at - self._RUN.size)
        # Counted last: a kill halfway through leaves the text uncounted rather than torn.
        self._COUNT.pack_into(self.memory, 8, self.used)
        return True

    def runs(self) -> list[tuple[str, str]]:
        """The batch as (stream name, text) runs."""
        runs = []
        at, end = self._START, self._START + self.used
        while at < end:
            code, size = self._RUN.unpack_from(self.memory, at)
            at += self._RUN.size
            runs.append((self._NAMES[code], self.memory[at : at + size].decode("utf-8", "surrogatepass")))
            at += size
        return runs

    def sent(self) -> None:
        """The batch has been sent: empty it and start the next one."""
        self.used, self._run_code = 0, b""
        self._COUNT.pack_into(self.memory, 8, 0)
        self.batch += 1
        self._COUNT.pack_into(self.memory, 0, self.batch)

    def after_death(self, last_batch: int) -> list[tuple[str, str]]:
        """In the parent, once the child is dead: the runs it had not sent.

        Parameters
        ----------
        last_batch:
            The number of the last batch the parent received (-1 for none): a child killed
            between sending a batch and emptying it left that batch here.
        """
        (self.batch,) = self._COUNT.unpack_from(self.memory, 0)
        (self.used,) = self._COUNT.unpack_from(self.memory, 8)
        return [] if self.batch == last_batch else self.runs()

    def close(self) -> None:
        self.memory.close()


class Outbox:
    """Everything the child sends to the parent goes through here, in order.

    Stream text is batched (see ``BATCH_BYTES`` / ``BATCH_SECONDS``): complete lines in
    :class:`UnsentText`, which survives a kill, and a trailing partial line in this process. It is
    always sent before any other message, so the parent replays text, displays and the result in
    the order they happened. All methods are thread-safe: the work's own threads may print too.

    Parameters
    ----------
    conn:
        The write end of the pipe to the parent.
    unsent:
        Where the batch waits; shared with the parent.
    """

    def __init__(self, conn: Connection, unsent: UnsentText) -> None:
        self._conn = conn
        self._unsent: UnsentText | None = unsent
        self._lock = threading.RLock()  # re-entrant: a signal handler in the work may print
        self._wake = threading.Condition(self._lock)
        self._partial: list[tuple[str, str]] = []  # text since the last newline
        self._sent_at = 0.0
        # A fork by the work while another thread holds the lock would leave it locked forever in
        # the new process; holding it across the fork rules that out. Text queued before the fork
        # is sent first, so it arrives before anything the new process prints.
        os.register_at_fork(before=self._before_fork, after_in_parent=self._after_fork_in_parent,
                            after_in_child=self._after_fork_in_child)
        self._flusher = threading.Thread(target=self._flush_when_due, name="concur-child-flusher", daemon=True)
        self._flusher.start()

    def write(self, name: str, text: str) -> None:
        """Queue ``text`` for stream ``name`` (``"stdout"`` or ``"stderr"``); send if a batch is due."""
        with self._lock:
            was_empty = not self._pending()
            self._partial.append((name, text))
            if "\n" not in text:
                if was_empty:
                    self._wake.notify()
                return
            self._keep_lines()
            if self._unsent is None or time.monotonic() - self._sent_at >= BATCH_SECONDS:
                self._send_text()
            elif was_empty:
                self._wake.notify()

    def flush(self) -> None:
        """Send queued text now (``sys.stdout.flush()``, ``print(..., flush=True)``)."""
        with self._lock:
            self._send_text()

    def send(self, message: tuple[Any, ...]) -> None:
        """Send ``message`` after any queued text."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._send_text()
            self._conn.send_bytes(data)

    def _pending(self) -> bool:
        return bool(self._partial) or (self._unsent is not None and self._unsent.used > 0)

    def _keep_lines(self) -> None:
        """Move the partial text (now ending in whole lines) into the shared batch."""
        unsent, partial = self._unsent, self._partial
        if unsent is None:
            return
        while partial:
            name, text = partial[0]
            count = 1
            while count < len(partial) and partial[count][0] == name:
                count += 1
            if count > 1:
                text = "".join(piece for _, piece in partial[:count])
            data = text.encode("utf-8", "surrogatepass")
            if not unsent.append(name, data):
                if unsent.used:
                    self._send_batch()
                if not unsent.append(name, data):  # bigger than a whole batch: send it alone
                    self._send_runs([(name, text)], -1)
            del partial[:count]

    def _send_text(self) -> None:
        if self._unsent is not None and self._unsent.used:
            self._send_batch()
        if self._partial:
            runs, self._partial = self._partial, []
            self._send_runs(runs, -1)

    def _send_batch(self) -> None:
        assert self._unsent is not None
        self._send_runs(self._unsent.runs(), self._unsent.batch)
        self._unsent.sent()

    def _send_runs(self, runs: list[tuple[str, str]], batch: int) -> None:
        self._conn.send_bytes(pickle.dumps(("streams", runs, batch), protocol=pickle.HIGHEST_PROTOCOL))
        self._sent_at = time.monotonic()

    def _flush_when_due(self) -> None:
        with self._lock:
            while True:
                if not self._pending():
                    self._wake.wait()
                    continue
                remaining = self._sent_at + BATCH_SECONDS - time.monotonic()
                if remaining > 0:
                    self._wake.wait(remaining)
                    continue
                try:
                    self._send_text()
                except OSError:
                    return  # the parent is gone; the child is about to be killed

    def _before_fork(self) -> None:
        self._lock.acquire()
        try:
            self._send_text()
        except OSError:
            pass  # the parent is gone; the fork goes ahead and the child will be killed

    def _after_fork_in_parent(self) -> None:
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        # A process forked by the work has no flusher thread and must not write to the shared
        # batch, which is the child's: it sends each line as it is written.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._unsent = None


class PipeStream(io.TextIOBase):
    """``sys.stdout`` / ``sys.stderr`` in the child: text goes to the parent through the outbox."""

    def __init__(self, outbox: Outbox, name: str, fd: int) -> None:
        self._outbox = outbox
        self._name = name
        self._fd = fd

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"<{self._name}>"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._outbox.write(self._name, text)
        return len(text)

    def flush(self) -> None:
        self._outbox.flush()

    def fileno(self) -> int:
        # C code and subprocesses write to the real descriptor, which the kernel already captures.
        return self._fd


class PipePublisher(DisplayPublisher):
    """Stands in for the shell's display publisher in the child; the parent publishes for real."""

    def __init__(self, outbox: Outbox) -> None:
        super().__init__()
        self._outbox = outbox

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
        self._outbox.send(("display", "publish", message))

    def clear_output(self, wait: bool = False) -> None:
        self._outbox.send(("display", "clear", {"wait": wait}))


def child_main(
    work: Callable[[dict[str, Any]], Any],
    namespace: dict[str, Any],
    conn: Connection,
    unsent: UnsentText,
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
    unsent:
        Shared with the parent: where text waits to be sent.
    shell:
        The IPython shell whose display publisher is replaced by one that sends to the parent.
    copy_back:
        Send new, rebound and deleted names.
    """
    code = 0
    try:
        os.setpgid(0, 0)
        _die_with_parent()
        outbox = Outbox(conn, unsent)
        sys.stdout, sys.stderr = PipeStream(outbox, "stdout", 1), PipeStream(outbox, "stderr", 2)
        if shell is not None:
            shell.display_pub = PipePublisher(outbox)
        builtins.input = _no_input  # type: ignore[assignment]
        _answer_where(outbox, work)
        before = dict(namespace)
        try:
            value = work(namespace)
        except BaseException as exc:  # noqa: BLE001 - everything the work raises goes to the parent
            outbox.send(("finished",))
            outbox.send(_describe_error(exc, shell))
        else:
            outbox.send(("finished",))
            if copy_back:
                _send_changes(outbox, namespace, before)
            _send_value(outbox, value, namespace, before)
            outbox.send(("done",))
    except BaseException:  # noqa: BLE001 - the child must never return into the caller's code
        code = 70
    finally:
        _flush_c_stdio()
        os._exit(code)


def _answer_where(outbox: Outbox, work: Callable[[dict[str, Any]], Any]) -> None:
    """Send the user's frames running now when the parent sends ``WHERE_SIGNAL``.

    The handler runs between two bytecodes of the work (re-entering the outbox's lock is allowed
    for this); the work then goes on until the parent kills the child. Only frames the work called
    count: a deadline that passes before the work starts (or after it ends) has none to show, not
    the child's own set-up.
    """
    below = getattr(work, "__code__", child_main.__code__)

    def where(signum: int, frame: types.FrameType | None) -> None:
        try:
            outbox.send(("where", carried_frames(stack_frames(frame, below=below))))
        except Exception:  # noqa: BLE001 - no answer: the parent shows the timeout without frames
            pass

    try:
        signal.signal(WHERE_SIGNAL, where)
    except (ValueError, OSError):  # not the main thread, or no such signal: no answer
        return
    # Born with it blocked (see process._fork); a request that came meanwhile is answered now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {WHERE_SIGNAL})


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


def _send_changes(outbox: Outbox, namespace: dict[str, Any], before: dict[str, Any]) -> None:
    for name, value in list(namespace.items()):
        if name == "__builtins__" or before.get(name, _MISSING) is value:
            continue
        try:
            outbox.send(("name", name, _dumps(value, namespace, before)))
        except Exception as exc:  # noqa: BLE001 - reported to the user by name
            outbox.send(("not_copied", name, f"{type(exc).__name__}: {exc}"))
    outbox.send(("deleted", [name for name in before if name not in namespace]))


def _send_value(outbox: Outbox, value: Any, namespace: dict[str, Any], before: dict[str, Any]) -> None:
    try:
        data = _dumps(value, namespace, before)
    except Exception as exc:  # noqa: BLE001 - the value is replaced by a description
        data = pickle.dumps(f"<result of type {type(value).__name__} could not be pickled: {exc}>")
    outbox.send(("value", data))


_MISSING = object()


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
    # The user's frames only, formatted here where they are, with this copy of the kernel's shell.
    tb = user_frames(exc.__traceback__)
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
    """Ask Linux to SIGKILL this child if the kernel dies first (its own children are the guardian's)."""
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
