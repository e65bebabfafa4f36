"""The heart of the demo kernel: sockets, streams and the dispatch loop.

Read it top to bottom as the life of one message:

1. it **arrives** on a socket — shell or control (ROUTER) — and its stream hands us the frames;
2. we **verify** its HMAC signature and **deserialise** it (``jupyter_client.Session``; a bad or
   replayed signature is dropped and recorded, never executed);
3. we **record** it in the dispatch trace;
4. we **publish** ``busy`` on IOPub, with the request as parent, so frontends know we work for it;
5. we **dispatch** it to its handler, from a table built from the declared message types;
6. the handler **replies** on the socket the request came from;
7. we **publish** ``idle``.

Threads: shell requests run on the main thread's Tornado IOLoop, where user code runs too. Control
has its own thread and loop, so ``kernel_info``, ``interrupt`` and ``shutdown`` get through while a
cell runs. Everything published goes through one door, :meth:`Kernel.publish`, which sends at once
from the publishing thread under one lock, so nothing overtakes anything else and no message waits
for a thread to wake up. IOPub also has its own thread and loop, which greets subscribers and runs
the timers that flush ``print`` output while the main thread computes. The heartbeat is a ZMQ
device echoing on its own thread.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import zmq
from jupyter_client.session import Session
from tornado.ioloop import IOLoop, PeriodicCallback
from zmq.eventloop.zmqstream import ZMQStream

from . import handlers
from .execution import Executor, OutStream
from .parent import ParentWatch
from .trace import Record, Trace

PROTOCOL_VERSION = "5.5"

# The message types we answer, per channel, in the order the messaging spec lists them.
SHELL_TYPES = (
    "execute_request", "inspect_request", "complete_request", "history_request",
    "is_complete_request", "comm_info_request", "kernel_info_request", "shutdown_request",
    "comm_open", "comm_msg", "comm_close",
)
CONTROL_TYPES = ("shutdown_request", "interrupt_request", "kernel_info_request")

# IOPub's high-water mark, in messages queued for one subscriber. At the mark ZMQ drops that
# subscriber's further messages, silently; we keep that (blocking would let one stalled client
# freeze the kernel and every other client; no mark would let it grow our memory without end), and
# raise the mark from ZMQ's 1,000 so that only a client far behind loses anything. Print output is
# batched (see OutStream): a cell sends at most ~20 stream messages a second per stream, or one per
# 64 KiB when it prints faster, so a client must fall behind by minutes of output, or ~640 MB of
# it, before a message is dropped, and then only that client's copy.
IOPUB_HWM = 10_000


class LoopThread(threading.Thread):
    """A thread running its own Tornado IOLoop, with a stream on it if given ``on_recv``;
    :meth:`call` is its door."""

    def __init__(self, name: str, socket: zmq.Socket[bytes], on_recv: Callable[[list[Any]], None] | None) -> None:
        super().__init__(name=name, daemon=True)
        self.socket = socket
        self.on_recv = on_recv
        self.loop: IOLoop | None = None
        self.stream: ZMQStream | None = None
        self._ready = threading.Event()

    def run(self) -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        self.loop = IOLoop.current()
        if self.on_recv is not None:
            # A stream belongs to the loop of the thread that made it.
            self.stream = ZMQStream(self.socket, self.loop)
            self.stream.on_recv(self.on_recv, copy=False)
        self._ready.set()
        self.loop.start()
        if self.stream is not None:
            self.stream.close()
        self.loop.close(all_fds=False)

    def start_and_wait(self) -> ZMQStream | None:
        self.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"the {self.name} thread did not start")
        return self.stream

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on this thread's loop. Thread-safe."""
        assert self.loop is not None
        self.loop.add_callback(fn, *args)

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.add_callback(self.loop.stop)
        self.join(5)


class Kernel:
    """A kernel bound as ``connection`` (a parsed connection file) says."""

    def __init__(self, connection: dict[str, Any], trace_file: str | None = None) -> None:
        key = connection.get("key", "")
        if not key:
            print(
                "kernel_demo: WARNING: empty key in the connection file; messages are NOT signed "
                "and anyone who can reach these ports can run code", file=sys.stderr, flush=True,
            )
        self.session = Session(key=key.encode(), signature_scheme=connection.get("signature_scheme", "hmac-sha256"))
        self.session_lock = threading.Lock()  # Session counts message ids; we send from 3 threads
        self.trace = Trace(trace_file)
        self.executor = Executor(self)
        self.streams = [s for s in (sys.stdout, sys.stderr) if isinstance(s, OutStream)]
        self.context = zmq.Context()
        self.loop = IOLoop.current()
        url = f"{connection['transport']}://{connection['ip']}"
        sep = "-" if connection["transport"] == "ipc" else ":"
        # CurveZMQ: when the launcher put a key pair in the connection file, every socket is a Curve
        # server. Traffic is encrypted, and a client without the server's public key can't connect.
        curve_secretkey = connection.get("curve_secretkey")

        def bind(kind: int, port_name: str, sndhwm: int = 1000) -> zmq.Socket[bytes]:
            sock: zmq.Socket[bytes] = self.context.socket(kind)
            sock.linger = 1000
            sock.sndhwm = sndhwm  # before bind: a bound socket's connections take it from there
            if curve_secretkey:
                sock.curve_server = True
                sock.curve_secretkey = curve_secretkey.encode()
            sock.bind(f"{url}{sep}{connection[port_name]}")
            return sock

        self.shell_socket = bind(zmq.ROUTER, "shell_port")
        self.control_socket = bind(zmq.ROUTER, "control_port")
        self.stdin_socket = bind(zmq.ROUTER, "stdin_port")  # used only by input(), on the main thread
        self.iopub_socket = bind(zmq.XPUB, "iopub_port", sndhwm=IOPUB_HWM)
        self.iopub_socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # hear every subscription, to welcome it
        self.hb_socket = bind(zmq.ROUTER, "hb_port")

        # IOPub is used from every thread that publishes, under this lock (no ZMQStream on it).
        self.iopub_lock = threading.RLock()
        self.iopub_sender: int | None = None  # the thread sending on IOPub right now
        self.interrupt_deferred = False  # SIGINT came mid-send: publish() raises once the message is out
        self.pid = os.getpid()
        self.iopub_thread = LoopThread("iopub", self.iopub_socket, None)
        self.iopub_thread.start_and_wait()
        self.iopub_thread.call(self._watch_subscriptions)
        self.control_thread = LoopThread("control", self.control_socket, self._on_control)
        control_stream = self.control_thread.start_and_wait()
        assert control_stream is not None
        self.control_stream = control_stream
        self.shell_stream = ZMQStream(self.shell_socket, self.loop)
        self.shell_stream.on_recv(self._on_shell, copy=False)
        # The heartbeat's proxy is stopped by a TERMINATE on this pair (closing its socket from
        # another thread would not wake it).
        self.hb_control = self.context.socket(zmq.PAIR)
        self.hb_control.bind(f"inproc://kernel-demo-heartbeat-{id(self)}")
        self.hb_stop = self.context.socket(zmq.PAIR)
        self.hb_stop.connect(f"inproc://kernel-demo-heartbeat-{id(self)}")
        self.hb_thread = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        self.hb_thread.start()
        self.parent_watch = ParentWatch(self._on_parent_gone)

        self.handlers = handlers.table(SHELL_TYPES, CONTROL_TYPES)
        self.execution: asyncio.Task[Any] | None = None  # the running execute request
        self.queued: list[tuple[list[bytes], dict[str, Any], Record]] = []
        signal.signal(signal.SIGINT, self._on_sigint)

    # -------------------------------------------------------------- 1. arrival
    def _on_shell(self, frames: list[Any]) -> None:
        self.dispatch("shell", self.shell_stream, frames)

    def _on_control(self, frames: list[Any]) -> None:
        self.dispatch("control", self.control_stream, frames)

    def dispatch(self, channel: str, stream: ZMQStream, frames: list[Any]) -> None:
        """Steps 2 to 7 for one message: shared by shell and control."""
        received = time.time()
        # ---------------------------------------------------------- 2. verify and deserialise
        try:
            idents, msg_list = self.session.feed_identities(frames, copy=False)
            with self.session_lock:
                msg = self.session.deserialize(msg_list, content=True, copy=False)
        except Exception as exc:  # noqa: BLE001 - a bad signature or garbage: drop and record
            self.trace.add(Record(channel, "?", "?", None, received, rejected=f"{type(exc).__name__}: {exc}"))
            return
        # ---------------------------------------------------------- 3. record
        record = self.trace.add(Record(channel, msg["msg_type"], msg["header"].get("msg_id", ""), None, received))
        if channel == "shell" and msg["msg_type"] == "execute_request" and self.execution is not None:
            # One cell at a time: this one waits while the running cell awaits.
            self.queued.append((idents, msg, record))
            return
        self._handle(channel, stream, idents, msg, record)

    def _handle(self, channel: str, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
        handler = self.handlers[channel].get(msg["msg_type"], handlers.unknown)
        record.handler = handler.__name__
        record.started = time.time()
        # ---------------------------------------------------------- 4. busy
        self.publish("status", {"execution_state": "busy"}, msg, record=record)
        # ---------------------------------------------------------- 5. dispatch, 6. reply
        result = handler(self, stream, idents, msg, record)
        if asyncio.iscoroutine(result):
            self.execution = asyncio.ensure_future(result)
            self.execution.add_done_callback(lambda _: self._cell_finished(msg, record))
        else:
            self._finished(msg, record)

    def _finished(self, msg: dict[str, Any], record: Record) -> None:
        # ---------------------------------------------------------- 7. idle
        # Last of all the request's messages on IOPub: publish() sends any buffered output first.
        self.publish("status", {"execution_state": "idle"}, msg, record=record)
        record.finished = time.time()
        self.trace.finished(record)

    def _cell_finished(self, msg: dict[str, Any], record: Record) -> None:
        self._finished(msg, record)
        self.execution = None
        self.executor.interrupt_pending = False  # it came after the cell's code: the cell is over
        if self.queued:  # the next cell's turn
            idents, queued, queued_record = self.queued.pop(0)
            self._handle("shell", self.shell_stream, idents, queued, queued_record)

    # -------------------------------------------------------------- sending
    def reply(self, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], content: dict[str, Any], record: Record) -> None:
        """Answer ``msg`` on the stream it came from (call on that stream's loop).

        Everything published for the request is on the wire before: publish() sends at once, and
        buffered output goes out here.
        """
        for out in self.streams:
            out.flush()
        reply_type = msg["msg_type"].replace("_request", "_reply")
        with self.session_lock:
            self.session.send(stream, reply_type, content, parent=msg, ident=idents)
        record.sent.append(reply_type)

    def publish(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None, *, record: Record | None = None) -> None:
        """Publish on IOPub, at once, from the calling thread. Thread-safe.

        Output still buffered in sys.stdout / sys.stderr goes first, so a display, a result, an
        error or ``idle`` never overtakes the text printed before it. One lock orders every send;
        nothing waits for the IOPub thread. A process forked from the kernel publishes nothing:
        the socket is the parent's.
        """
        if record is not None:
            record.sent.append(msg_type)
        if msg_type != "stream":
            for out in self.streams:
                out.flush()
        if os.getpid() != self.pid:
            return
        with self.iopub_lock:
            if self.iopub_socket.closed:
                return  # the kernel has shut down; a thread of the user's printed late
            sender, self.iopub_sender = self.iopub_sender, threading.get_ident()
            try:
                with self.session_lock:
                    self.session.send(self.iopub_socket, msg_type, content, parent=parent, ident=[msg_type.encode()])
                self._welcome_subscribers()
            finally:
                self.iopub_sender = sender
        if self.interrupt_deferred and sender is None and threading.current_thread() is threading.main_thread():
            self.interrupt_deferred = False
            raise KeyboardInterrupt

    def _watch_subscriptions(self) -> None:
        """On the IOPub thread: greet subscribers as they come, also while the main thread computes."""
        IOLoop.current().add_handler(self.iopub_socket, lambda *_: self._greet(), IOLoop.READ)
        self._greet()

    def _greet(self) -> None:
        with self.iopub_lock:
            if not self.iopub_socket.closed:
                self._welcome_subscribers()

    def _welcome_subscribers(self) -> None:
        # XPUB hands us b"\x01" + topic for each new subscriber (protocol 5.5: greet it). Call with
        # the IOPub lock held, after every use of the socket: a send can take the wake-up of the
        # IOPub thread's loop (ZMQ signals its file descriptor once per change, not per message).
        while cast(int, self.iopub_socket.get(zmq.EVENTS)) & zmq.POLLIN:
            first = self.iopub_socket.recv_multipart()[0]
            if first[:1] == b"\x01":
                topic = first[1:].decode(errors="replace")
                with self.session_lock:
                    self.session.send(self.iopub_socket, "iopub_welcome", {"subscription": topic}, parent=None)

    def reply_stopping(self, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], content: dict[str, Any], record: Record) -> None:
        """Reply to a cell that failed with ``stop_on_error``, and abort what was sent before it.

        The spec aborts the execute requests already waiting when the error happened: those
        queued behind the cell and those already in the shell socket. We read the socket *before*
        the reply goes out (they join the queue, as the cell still runs): a request sent after the
        client saw the error reply cannot be among them, and runs.
        """
        self.shell_stream.flush(zmq.POLLIN)
        self.reply(stream, idents, msg, content, record)
        waiting, self.queued = self.queued, []
        for queued_idents, queued, queued_record in waiting:
            self._abort(queued_idents, queued, queued_record)

    def _abort(self, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
        record.handler = "abort"
        record.started = time.time()
        self.publish("status", {"execution_state": "busy"}, msg)
        self.reply(self.shell_stream, idents, msg, {
            "status": "error", "ename": "ExecutionAborted", "execution_count": self.executor.count,
            "evalue": "not run: an earlier cell failed (stop_on_error)", "traceback": [],
        }, record)
        self._finished(msg, record)

    # -------------------------------------------------------------- interrupt, heartbeat, run
    def _on_sigint(self, signum: int, frame: Any) -> None:
        """SIGINT (or an interrupt_request): stop the running cell, never the kernel's own loop."""
        task = self.execution
        if task is None:
            return  # idle: nothing of the user's to stop
        if not self.executor.in_user_code:
            self.executor.interrupt_pending = True  # the cell's code has not started: stop it as it does
            return
        if asyncio.current_task(self.loop.asyncio_loop) is task:  # type: ignore[attr-defined]
            if self.iopub_sender == threading.get_ident():
                # The cell prints or displays: stopping it between the frames of a message would
                # garble that message and the next one (its error) for every client.
                self.interrupt_deferred = True
                return
            raise KeyboardInterrupt  # the cell's code is running right now
        task.get_loop().call_soon_threadsafe(task.cancel)  # the cell awaits: cancel its task

    def interrupt(self) -> None:
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    def _heartbeat(self) -> None:
        try:
            # Each ping goes straight back, until TERMINATE arrives on the control pair.
            zmq.proxy_steerable(self.hb_socket, self.hb_socket, None, self.hb_control)
        except zmq.ContextTerminated:
            pass

    def _on_parent_gone(self, reason: str) -> None:
        """The launcher died without a shutdown_request: shut down as if it had sent one."""
        # A running cell would keep the main loop from stopping, and so would one that starts before
        # the loop gets to stop (its request already read): interrupt whatever cell runs until then.
        PeriodicCallback(self._interrupt_any, 100).start()
        self._interrupt_any()
        self.stop()
        # A cell that ignores the interrupt must not keep an orphan alive. We are on the control
        # loop, which runs while the main thread is stuck; a shutdown that gets through stops it first.
        IOLoop.current().call_later(5, self._backstop)
        try:  # to the terminal or log the kernel was started with (sys.stderr goes to cells)...
            print(f"kernel_demo: {reason}; shutting down", file=sys.__stderr__, flush=True)
        except (OSError, ValueError, AttributeError):
            pass  # ...which may have died with the launcher (a closed terminal: EIO)

    @staticmethod
    def _backstop() -> None:
        """Still running 5 s after the launcher died: say where each thread is, and exit."""
        try:
            if sys.__stderr__ is not None:
                print("kernel_demo: still running 5 s after shutting down began; exiting now. Where "
                      "each thread was:", file=sys.__stderr__, flush=True)
                faulthandler.dump_traceback(file=sys.__stderr__.fileno(), all_threads=True)
        except (OSError, ValueError, AttributeError, RuntimeError):
            pass  # no terminal left to say it on
        os._exit(1)

    def _interrupt_any(self) -> None:
        if self.execution is not None:
            self.interrupt()

    def start(self) -> None:
        self.control_thread.call(self.parent_watch.start)  # exit with the launcher, from now on
        self.loop.start()

    def stop(self) -> None:
        """Stop all loops and close every socket (from any thread)."""

        def on_main() -> None:
            self.loop.stop()

        self.loop.add_callback(on_main)

    def close(self) -> None:
        self.control_thread.call(self.parent_watch.close)
        self.control_thread.stop()
        self.iopub_thread.stop()
        self.trace.close()
        self.hb_stop.send(b"TERMINATE")  # the proxy returns; then its sockets can close
        self.hb_thread.join(5)
        self.context.destroy(linger=1000)


def main(connection_file: str, trace_file: str | None = None) -> None:
    """Run a kernel until it is asked to shut down."""
    with open(connection_file) as f:
        connection = json.load(f)
    kernel = Kernel(connection, trace_file)
    try:
        kernel.start()
    finally:
        kernel.close()
