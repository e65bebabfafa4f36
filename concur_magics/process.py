"""Run work in a forked child that can be killed at a deadline, and bring its results back.

The child is a copy-on-write fork of the caller, so it sees the whole namespace as it is without
pickling anything going in. It leads its own process group, so one ``killpg(SIGKILL)`` at the
deadline stops it and everything it started, even in C code holding the GIL; the parent then reaps
it. While it runs, its ``print`` output (in batches), ``display()`` calls and ``clear_output()``
come to the parent over a pipe and are replayed there, so they show live in the cell that started
the work. The child's side of this is :mod:`concur_magics.child`.

If the kernel itself dies (even by SIGKILL, so no code of ours runs in it), the child is killed by
Linux (``PR_SET_PDEATHSIG``) and the processes the child started are killed by a guardian: a tiny
process of the kernel's that waits on a pipe only the kernel can write to, and at end-of-file — the
kernel is gone — kills the child's process group. A normal end stops and reaps the guardian.

When the work ends, only what it *changed* comes back: names that are new, rebound or deleted. A
value that refers to an object that already was in the namespace (a class, a big array, the
namespace itself as a function's globals) is sent as a reference to that name rather than a copy.
Mutating an object in place changes only the child's copy: assign to bring a result back. Copying
back does not count against the deadline; it has its own bound, :data:`COPY_BACK_LIMIT`.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from tblib import Traceback

from .child import WHERE_SIGNAL, UnsentText, child_main
from .output import write_stream
from .tracebacks import Frames, rebuilt_frames, with_rendered_traceback
from .timeout import CellTimeout

__all__ = [
    "COPY_BACK_LIMIT",
    "ChildDied",
    "ChildResult",
    "Children",
    "CopyBackTimeout",
    "NamesNotCopiedWarning",
    "run_in_child",
]

# Seconds the child may take, after the work has finished, to send back its changed names, its
# value or its exception. Pickling is the user's code too (``__reduce__``), so it is bounded, but
# far more loosely than the work: a cell that did its job within its limit should not lose its
# results because they are big.
COPY_BACK_LIMIT = 60.0
# Seconds the child has, at its deadline, to say which line it is on before it is killed. A child
# running Python answers within a millisecond; one stuck in C code never does, and is killed this
# much later than the deadline.
WHERE_WAIT = 0.25


class NamesNotCopiedWarning(UserWarning):
    """Some names a process-mode cell assigned could not be brought back (not picklable)."""


# Shown every time, not once per location: each cell's unpicklable names are news to its user.
warnings.simplefilter("always", NamesNotCopiedWarning)


class ChildDied(RuntimeError):
    """The child process ended without reporting a result (crashed, killed, or called os._exit)."""


class CopyBackTimeout(RuntimeError):
    """The work finished, but sending its results back took longer than ``COPY_BACK_LIMIT``."""


@dataclass
class ChildResult:
    """What came back from the child."""

    value: Any = None
    names: dict[str, Any] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    not_copied: dict[str, str] = field(default_factory=dict)


class Children:
    """The process-mode children running now, so that they can all be stopped at once.

    Owned by the extension's one owner object, whose ``close()`` (unload, kernel shutdown) calls
    :meth:`kill_all`. Each pid is a process-group leader: killing it kills the group. All methods
    are thread-safe; :meth:`kill` and :meth:`kill_all` block until the children are reaped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pids: set[int] = set()

    def add(self, pid: int) -> None:
        """Register a running child (a process-group leader)."""
        with self._lock:
            self._pids.add(pid)

    def discard(self, pid: int) -> None:
        """Forget a child without killing it (it has been reaped elsewhere)."""
        with self._lock:
            self._pids.discard(pid)

    def pids(self) -> list[int]:
        """The registered pids, in no particular order."""
        with self._lock:
            return list(self._pids)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pids)

    def kill(self, pid: int) -> str | None:
        """SIGKILL ``pid``'s process group, reap ``pid`` and forget it.

        Returns
        -------
        str or None
            How the child ended (``"exit code 0"``, ``"killed by SIGKILL"``), or None if it was not
            registered (already reaped, for example by :meth:`kill_all` from another thread).
        """
        # Under the lock, so a pid is reaped exactly once and never signalled after it was reaped
        # (when its number may already belong to another process).
        with self._lock:
            if pid not in self._pids:
                return None
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            # A child is registered as soon as it is forked and leads its own group a moment later;
            # killed in between, it has no group yet. Unreaped, its pid is still ours to signal.
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                status = 0
            finally:
                self._pids.discard(pid)
        if os.WIFSIGNALED(status):
            return f"killed by {_signal_name(os.WTERMSIG(status))}"
        return f"exit code {os.WEXITSTATUS(status)}"

    def kill_all(self) -> None:
        """Kill every registered child's process group and reap the child."""
        for pid in self.pids():
            self.kill(pid)


def run_in_child(
    work: Callable[[dict[str, Any]], Any],
    namespace: dict[str, Any],
    limit: float,
    *,
    copy_back: bool = False,
    shell: Any = None,
    children: Children | None = None,
) -> ChildResult:
    """Run ``work(namespace)`` in a forked child, killing it at ``limit`` seconds.

    Parameters
    ----------
    work:
        Called in the child with ``namespace``; its return value comes back as ``value``.
    namespace:
        The namespace the work runs in; with ``copy_back`` the names it changes come back into it.
    limit:
        Seconds until the child and its process group are killed. Once the work has finished,
        sending its results back is bounded by :data:`COPY_BACK_LIMIT` instead.
    copy_back:
        Bring new, rebound and deleted names back into ``namespace``.
    shell:
        The IPython shell whose display publisher should show the child's ``display()`` calls.
    children:
        Where the child is registered while it runs, so that its owner can kill it
        (:meth:`Children.kill_all`). Without it the child is known only to this call.

    Raises
    ------
    CellTimeout
        At the deadline (the child has been killed and reaped by then).
    CopyBackTimeout
        If sending the results back took longer than ``COPY_BACK_LIMIT`` (the child has been
        killed; no names were copied back).
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
    children = children if children is not None else Children()
    read_fd, write_fd = os.pipe()
    unsent = UnsentText()
    deadline = time.monotonic() + limit
    try:
        pid = _fork()
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        unsent.close()
        raise
    if pid == 0:  # pragma: no cover - runs in the child, which never returns
        os.close(read_fd)
        child_main(work, namespace, Connection(write_fd, readable=False), unsent, shell, copy_back)
    children.add(pid)
    os.close(write_fd)
    conn = Connection(read_fd, writable=False)
    guardian: _Guardian | None = None
    try:
        try:
            # Either side may win the race to make the child a group leader; both ask.
            os.setpgid(pid, pid)
        except OSError:
            pass  # the child already did it, or already exited
        guardian = _Guardian.start(pid)
        return _relay(conn, unsent, pid, children, deadline, limit, namespace, shell)
    finally:
        conn.close()
        unsent.close()
        try:
            children.kill(pid)
        finally:
            if guardian is not None:
                guardian.stop()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals have no name of their own
        return f"signal {number}"


def _fork() -> int:
    # Python 3.12+ warns that forking a multi-threaded process may deadlock the child, because
    # locks held by other threads stay locked in it. Our child never touches the parent's threads,
    # sockets or their locks: before running the work it replaces sys.stdout/stderr and the display
    # publisher with its own pipe, never uses ZMQ or the event loop, and leaves with os._exit. The
    # user's code in it takes the same risk as under multiprocessing's "fork" start method. So we
    # silence exactly that warning, for this call only.
    #
    # The child is born with WHERE_SIGNAL blocked and unblocks it once it has a handler for it: a
    # deadline shorter than the child's start would otherwise kill it with that signal.
    blocked = {WHERE_SIGNAL}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    pid = -1
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning
            )
            pid = os.fork()
        return pid
    finally:
        if pid != 0:  # the parent (or a failed fork): as it was
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Guardian:
    """A ``/bin/sh`` that kills the child's process group when the kernel dies, and only then.

    It blocks reading a pipe whose only write end this process holds (the pipe is made after the
    fork, so the child never has it, and is close-on-exec, so programs the kernel starts meanwhile
    don't get it). The kernel never writes: end-of-file means the kernel has died, and the guardian
    then SIGKILLs the group, reaching the grandchildren that ``PR_SET_PDEATHSIG`` on the child does
    not. It is the kernel's own child (so it is reaped here at every normal end, deadline or not)
    and leads its own process group (so an interrupt sent to the kernel's group leaves it alone).
    A program spawned with ``posix_spawn`` costs a fraction of a millisecond, where a second fork
    of the kernel would cost as much as the child's. Processes the work moves to a session of
    their own (``start_new_session=True``) are beyond its reach.
    """

    # The pgid arrives as $1; `read` returns at end-of-file, as nothing is ever written.
    SCRIPT = 'read line; kill -s KILL -- "-$1" 2>/dev/null'
    SHELL = "/bin/sh"

    def __init__(self, pid: int, write_fd: int) -> None:
        self.pid = pid
        self.write_fd = write_fd

    @classmethod
    def start(cls, pgid: int) -> _Guardian | None:
        """Spawn a guardian for process group ``pgid`` (None where posix_spawn or sh is missing)."""
        if not hasattr(os, "posix_spawn") or not os.path.exists(cls.SHELL):
            return None
        read_fd, write_fd = os.pipe()
        try:
            pid = os.posix_spawn(
                cls.SHELL,
                [cls.SHELL, "-c", cls.SCRIPT, "concur-guardian", str(pgid)],
                {},
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, read_fd, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                ],
                setpgroup=0,
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        return cls(pid, write_fd)

    def stop(self) -> None:
        """Kill and reap the guardian, then close the pipe (in that order: EOF would make it act)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        finally:
            os.close(self.write_fd)


# --------------------------------------------------------------------------- replaying the child


def _relay(
    conn: Connection,
    unsent: UnsentText,
    pid: int,
    children: Children,
    deadline: float,
    limit: float,
    namespace: dict[str, Any],
    shell: Any,
) -> ChildResult:
    """Replay the child's messages until it reports its result or the deadline passes.

    The child says ``finished`` when the work has returned or raised; from then on ``deadline``
    is replaced by ``COPY_BACK_LIMIT`` seconds for sending the results back.
    """
    __tracebackhide__ = True
    result = ChildResult()
    loader = _NamespaceUnpickler.factory(namespace)
    copying = False
    last_batch = -1  # the number of the last batch of text received through the pipe
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not conn.poll(remaining):
            if time.monotonic() < deadline:
                continue
            frames = None
            if not copying:
                frames, last_batch = _ask_where(conn, pid, shell, last_batch)
            children.kill(pid)
            if copying:
                raise CopyBackTimeout(
                    f"the process-mode work finished, but sending its names and value back took "
                    f"longer than COPY_BACK_LIMIT ({COPY_BACK_LIMIT:g} s, "
                    f"concur_magics.process.COPY_BACK_LIMIT); the child (pid {pid}) was killed and "
                    "nothing was copied back"
                )
            _drain(conn, shell, unsent, last_batch)
            # The child's frames at the deadline, so the traceback shows the line it was on.
            error = CellTimeout(limit, "process", "killed", f"(pid {pid})")
            raise error.with_traceback(rebuilt_frames(frames))
        try:
            kind, *payload = pickle.loads(conn.recv_bytes())
        except EOFError:
            status = children.kill(pid) or "stopped by its owner"
            _write_streams(unsent.after_death(last_batch))
            raise ChildDied(f"the cell's process (pid {pid}) ended without a result: {status}") from None
        if kind == "streams":
            _write_streams(payload[0])
            last_batch = max(last_batch, payload[1])
        elif kind == "display":
            _display(shell, *payload)
        elif kind == "finished":
            copying = True
            deadline = time.monotonic() + COPY_BACK_LIMIT
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


def _write_streams(batch: list[tuple[str, str]]) -> None:
    # One write (and flush) per run of text: a batch is usually a single run.
    for name, text in batch:
        write_stream(name, text)


def _display(shell: Any, kind: str, kwargs: dict[str, Any]) -> None:
    if shell is None:
        return
    if kind == "clear":
        shell.display_pub.clear_output(**kwargs)
    else:
        shell.display_pub.publish(**kwargs)


def _ask_where(
    conn: Connection, pid: int, shell: Any, last_batch: int
) -> tuple[Frames | None, int]:
    """Ask the child which user frames it is running (``WHERE_SIGNAL``); wait up to ``WHERE_WAIT``.

    Returns its answer (None when it can't answer: C code holding the GIL) and the number of the
    last batch of text received, replaying the output that arrives meanwhile.
    """
    try:
        os.kill(pid, WHERE_SIGNAL)
    except ProcessLookupError:
        return None, last_batch
    until = time.monotonic() + WHERE_WAIT
    try:
        while conn.poll(max(until - time.monotonic(), 0)):
            kind, *payload = pickle.loads(conn.recv_bytes())
            if kind == "where":
                return payload[0], last_batch
            last_batch = _show(kind, payload, shell, last_batch)
    except (EOFError, OSError, pickle.UnpicklingError):
        pass
    return None, last_batch


def _drain(conn: Connection, shell: Any, unsent: UnsentText, last_batch: int) -> None:
    """Show output the child produced before it was killed: in the pipe, then never sent."""
    try:
        while conn.poll(0):
            kind, *payload = pickle.loads(conn.recv_bytes())
            last_batch = _show(kind, payload, shell, last_batch)
    except (EOFError, OSError, pickle.UnpicklingError):
        pass
    _write_streams(unsent.after_death(last_batch))


def _show(kind: str, payload: list[Any], shell: Any, last_batch: int) -> int:
    """Show a message of the child's output; return the number of the last batch of text shown."""
    if kind == "streams":
        _write_streams(payload[0])
        return max(last_batch, payload[1])
    if kind == "display":
        _display(shell, *payload)
    return last_batch


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
