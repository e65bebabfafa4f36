"""Everything a job starts reports to the job's cell.

A job's own code runs in a context where :data:`~concur_magics.output.current_job` names it and
ipykernel's per-context parent headers carry the job's id (:func:`~concur_magics.output.enter_job`).
While the extension is loaded, :class:`Routing` makes what that code starts carry the job along:

- **its output**: a hook on the kernel's streams and display publisher (ipykernel's public
  ``register_hook``) sees each message before it is sent; one carrying a job's id is recorded in the
  job's log and sent with the parent header of the job's home cell (which a rerun of the cell moves,
  see :meth:`~concur_magics.output.CellOutput.rehome`), so it is never lost to a cleared cell;
- **threads** (``threading.Thread``) started by a job run in a copy of the job's context, and so do
  functions submitted to a ``concurrent.futures.ThreadPoolExecutor`` from anywhere (an executor's
  threads are shared, so each task carries its submitter's context, as ``asyncio.to_thread`` does);
- **subprocesses** started by a job through ``subprocess`` (``run``, ``Popen``, ``check_output``...)
  or ``os.system`` write their stdout/stderr into pipes that one relay thread reads into the job's
  cell, instead of into the kernel's shared file descriptors;
- **output no context names** — C code or an inherited child writing to file descriptor 1 or 2 (which
  ipykernel captures without knowing the writer), a thread started outside any job: ipykernel sends
  it to the cell that runs (or ran last). While jobs run it could be theirs, so it comes under a line
  saying so, never as if the running cell had written it.

:meth:`Routing.close` (``%unload_ext``, kernel shutdown) takes every hook and patch away and stops
the relay.
"""

from __future__ import annotations

import codecs
import concurrent.futures
import contextvars
import functools
import inspect
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import compat
from .output import JOB_KEY, UNOWNED_KEY, current_job, flush_streams, untagged, write_stream

if TYPE_CHECKING:
    from .jobs import Job
    from .table import JobTable

__all__ = ["Routing"]

# How long Popen.wait() waits for the relay to pass on the last output of a finished child, so the
# job's next print comes after it. A grandchild that keeps the pipe open only costs this once.
DRAIN = 0.5


class Routing:
    """The patches that carry a job's context into what it starts, and the subprocess relay.

    Installed once per shell (:meth:`install`); :meth:`close` undoes exactly what was done and is
    idempotent. Thread-safe.
    """

    def __init__(self, jobs: JobTable) -> None:
        self.jobs = jobs
        self.shell: Any = None
        self.relay = Relay()
        self._undo: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._unowned_at: dict[str, float] = {}

    def install(self, shell: Any) -> None:
        with self._lock:
            if self._undo:
                return
            self.shell = shell
            for stream in (sys.stdout, sys.stderr):
                if hasattr(stream, "register_hook"):  # ipykernel's streams
                    self._hook(stream)
            publisher = getattr(shell, "display_pub", None)
            if publisher is not None:
                self._patch_instance(publisher, "publish", self._job_publish(publisher.publish, "publish"))
                self._patch_instance(publisher, "clear_output",
                                     self._job_publish(publisher.clear_output, "clear_output"))
            self._patch(threading.Thread, "start", _thread_start)
            self._patch(concurrent.futures.ThreadPoolExecutor, "submit", _executor_submit)
            self._patch(subprocess.Popen, "__init__", self._popen_init)
            self._patch(subprocess.Popen, "wait", self._popen_wait)
            self._patch(os, "system", self._system)

    def close(self) -> None:
        with self._lock:
            undo, self._undo = self._undo, []
        for step in reversed(undo):
            step()
        self.relay.close()

    def _hook(self, stream: Any) -> None:
        """See every message a kernel stream sends. A stream's hooks are per thread, and its
        messages are sent from the IOPub thread: the hook is registered there."""
        shell = self.shell

        def call(fn: Callable[..., Any]) -> None:
            compat.on_iopub_thread(shell, functools.partial(fn, self._on_message))

        call(stream.register_hook)
        self._undo.append(lambda: call(stream.unregister_hook))

    def _patch_instance(self, obj: Any, name: str, replacement: Callable[..., Any]) -> None:
        obj.__dict__[name] = replacement

        def undo() -> None:
            if obj.__dict__.get(name) is replacement:
                del obj.__dict__[name]

        self._undo.append(undo)

    def _patch(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        replacement = make(original)
        setattr(owner, name, replacement)

        def undo() -> None:
            if getattr(owner, name) is replacement:  # someone patched over us: leave theirs
                setattr(owner, name, original)

        self._undo.append(undo)

    # ------------------------------------------------------------------ messages
    def _on_message(self, msg: dict[str, Any]) -> dict[str, Any]:
        """A stream message about to be sent (on the IOPub thread): a job's goes to the job's home
        cell and into its log; one whose writer no context names is labelled while jobs run."""
        parent = msg.get("parent_header") or {}
        if JOB_KEY in parent:
            job = self.jobs.get(parent[JOB_KEY])
            if job is not None and job._out is not None:
                content = msg.get("content", {})
                job.log.add_stream(content.get("name", "stdout"), content.get("text", ""))
                msg["parent_header"] = job._out.header
            else:
                msg["parent_header"] = untagged(parent)
        elif UNOWNED_KEY in parent:
            msg["parent_header"] = untagged(parent)
            if msg.get("msg_type") == "stream":
                msg["content"] = {**msg["content"], "text": self._unowned(msg["content"]["name"], msg["content"]["text"])}
        return msg

    @staticmethod
    def _job_publish(original: Callable[..., Any], kind: str) -> Callable[..., Any]:
        """The display publisher's ``publish`` / ``clear_output`` for a job's code: recorded in its
        log and sent to its home cell."""

        def publish(*args: Any, **kwargs: Any) -> Any:
            job = current_job.get()
            if job is None or job._out is None:
                return original(*args, **kwargs)
            if kind == "publish":
                flush_streams()  # what the job printed before this display is logged before it
                data = kwargs.get("data", args[0] if args else {})
                display_id = (kwargs.get("transient") or {}).get("display_id")
                job.log.add_display(data, kwargs.get("metadata", args[1] if len(args) > 1 else None),
                                    display_id=display_id, update=bool(kwargs.get("update")))
            result = job._out.run(original, *args, **kwargs)
            if kind == "clear_output":
                job._out.start_job(job)  # the job's own status line stays in its cell
            return result

        return publish

    def _unowned(self, name: str, text: str) -> str:
        """Text no cell's or job's context wrote (file descriptor 1 or 2, a thread started outside
        any job): while local jobs run it could be theirs, so a line above it says so."""
        running = [job for job in self.jobs.running() if job.mode != "dask"]
        if not running:
            return text
        now = time.monotonic()
        last, self._unowned_at[name] = self._unowned_at.get(name, 0.0), now
        if now - last < 1.0:
            return text  # the same burst: its label is just above
        labels = ", ".join(job.label for job in running[:5]) + (", ..." if len(running) > 5 else "")
        return f"[{name} of no known cell, written while jobs {labels} ran; it may be theirs:]\n{text}"

    # ------------------------------------------------------------------ subprocesses
    def _popen_init(self, original: Callable[..., None]) -> Callable[..., None]:
        relay = self.relay

        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(popen: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
            job = current_job.get()
            if job is None or job._out is None:
                original(popen, *args, **kwargs)
                return
            # By name, however they were passed (Popen takes no **kwargs: every argument has one).
            kwargs = dict(signature.bind(popen, *args, **kwargs).arguments)
            del kwargs[next(iter(signature.parameters))]  # self
            pipes: dict[str, tuple[int, int]] = {}
            for name in ("stdout", "stderr"):
                if _inherits(kwargs.get(name), name):
                    pipes[name] = os.pipe()
                    kwargs[name] = pipes[name][1]
            try:
                original(popen, **kwargs)
            except BaseException:
                for read_end, write_end in pipes.values():
                    os.close(read_end)
                    os.close(write_end)
                raise
            for read_end, write_end in pipes.values():
                os.close(write_end)  # the child has it; the relay sees EOF when the child is done
            popen._concur_relayed = [relay.add(read_end, name, job) for name, (read_end, _) in pipes.items()]  # type: ignore[attr-defined]

        return __init__

    def _popen_wait(self, original: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(original)
        def wait(popen: subprocess.Popen[Any], timeout: float | None = None) -> int:
            code = original(popen, timeout)
            for done in getattr(popen, "_concur_relayed", ()):
                done.wait(DRAIN)  # the last lines before the job's next ones
            return code

        return wait

    def _system(self, original: Callable[[str], int]) -> Callable[[str], int]:
        @functools.wraps(original)
        def system(command: str) -> int:
            if current_job.get() is None:
                return original(command)
            with subprocess.Popen(command, shell=True) as child:  # relayed: see _popen_init
                code = child.wait()
            # os.system's answer is a wait status: the exit code in the high byte, or the signal.
            return code << 8 if code >= 0 else -code

        return system


def _write_as_code(job: Job, name: str, text: str) -> None:
    """Write ``text`` as the job's own code would print it, so output relayed from what the job
    started keeps its place among the job's prints."""
    context = job._code_context
    if context is not None:
        context.copy().run(write_stream, name, text, False)
    elif job._out is not None:
        job._out.write(name, text)


def _inherits(target: Any, name: str) -> bool:
    """Whether a child given this stdout/stderr argument would write to the kernel's own fd."""
    if target is None:
        return True
    return target is getattr(sys, name) and hasattr(target, "register_hook")


def _thread_start(original: Callable[[threading.Thread], None]) -> Callable[[threading.Thread], None]:
    @functools.wraps(original)
    def start(thread: threading.Thread) -> None:
        if current_job.get() is not None:
            # The instance's run, so a subclass's own run() is the one called in the context.
            thread.run = functools.partial(  # type: ignore[method-assign]
                contextvars.copy_context().run, _run_reporting, thread, thread.run
            )
        original(thread)

    return start


def _run_reporting(thread: threading.Thread, run: Callable[[], None]) -> None:
    """Run a job's thread; if it fails, call ``threading.excepthook`` here, in the job's context,
    so its traceback goes to the job's cell (threading would call it outside the context)."""
    try:
        run()
    except SystemExit:
        pass  # threading ignores it too
    except BaseException as exc:  # noqa: BLE001 - reported as threading reports it
        threading.excepthook(threading.ExceptHookArgs([type(exc), exc, exc.__traceback__, thread]))


def _executor_submit(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def submit(executor: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return original(executor, contextvars.copy_context().run, fn, *args, **kwargs)

    return submit


class Relay:
    """One thread that copies subprocess pipes into their jobs' cells; it runs while pipes are open.

    :meth:`add` is thread-safe; :meth:`close` stops the thread and closes what is left.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = False

    def add(self, fd: int, name: str, job: Job) -> threading.Event:
        """Relay ``fd`` (a pipe's read end, now ours) to ``job``'s ``name`` stream until EOF; the
        event is set at EOF."""
        done = threading.Event()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with self._lock:
            if self._closed:
                os.close(fd)
                done.set()
                return done
            self._selector.register(fd, selectors.EVENT_READ, (name, job, decoder, done))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="concur-relay", daemon=True)
                self._thread.start()
        self._poke()
        return done

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already poked, or closed

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    os.read(self._wake_r, 4096)
                    continue
                self._read(key.fd, *key.data)
            with self._lock:
                if self._closed or len(self._selector.get_map()) <= 1:
                    self._thread = None
                    return

    def _read(self, fd: int, name: str, job: Job, decoder: Any, done: threading.Event) -> None:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        text = decoder.decode(data, final=not data)
        if text:
            _write_as_code(job, name, text)
        if not data:
            with self._lock:
                self._selector.unregister(fd)
            os.close(fd)
            done.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        self._poke()
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)
        with self._lock:
            for key in list(self._selector.get_map().values()):
                if key.data is not None:
                    self._selector.unregister(key.fd)
                    os.close(key.fd)
                    key.data[3].set()
            self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
