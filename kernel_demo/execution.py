"""Running Python code for the demo kernel: streams, display, results, errors, await, input()."""

from __future__ import annotations

import ast
import base64
import builtins
import codeop
import contextvars
import fnmatch
import functools
import importlib.util
import inspect
import io
import linecache
import os
import re
import rlcompleter
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import zmq

from .trace import bundle

if TYPE_CHECKING:
    from .kernel import Kernel
    from .trace import Record

_AWAIT = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))  # the kernel's own files
_REPRS = (
    ("text/html", "_repr_html_"), ("text/markdown", "_repr_markdown_"), ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"), ("image/jpeg", "_repr_jpeg_"), ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
)


# The request of the cell whose work is running: one per context, not one attribute, so that what a
# cell started finds *its* cell while a later one runs (docs/how-a-kernel-works.md, "kernel_demo does
# it too"). Each cell runs in an asyncio task, so in a copy of the context, and sets it there; a task
# the cell creates copies the cell's context, and so do its threads (see inherit_context).
request: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("request", default=None)


def inherit_context() -> None:
    """Run each thread, and each function given to a thread pool, in a copy of the context that
    started it, as Python 3.14 does for threads with ``-X thread_inherit_context=1`` (without it a
    thread starts in an empty context, where :data:`request` names no cell)."""
    start, submit = threading.Thread.start, ThreadPoolExecutor.submit

    def start_in_context(thread: threading.Thread) -> None:
        thread.run = functools.partial(contextvars.copy_context().run, thread.run)  # type: ignore[method-assign]
        start(thread)

    def submit_in_context(pool: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return submit(pool, contextvars.copy_context().run, fn, *args, **kwargs)

    threading.Thread.start = start_in_context  # type: ignore[method-assign,assignment]
    ThreadPoolExecutor.submit = submit_in_context  # type: ignore[method-assign,assignment]


class StdinNotImplementedError(RuntimeError):
    """input() was called but the frontend does not accept input (allow_stdin is false)."""


def mime_bundle(obj: Any) -> dict[str, Any]:
    """The data of an output: ``text/plain`` always, plus what the object's ``_repr_*_`` give."""
    if hasattr(obj, "_repr_mimebundle_"):
        data = obj._repr_mimebundle_()
        data = data[0] if isinstance(data, tuple) else data
        if isinstance(data, dict) and data:
            return {"text/plain": repr(obj), **data}
    data = {"text/plain": repr(obj)}
    for mime, method in _REPRS:
        produce = getattr(obj, method, None)
        if callable(produce) and not isinstance(obj, type):
            value = produce()
            if value is not None:
                data[mime] = base64.b64encode(value).decode() if isinstance(value, bytes) else value
    return data


class OutStream(io.TextIOBase):
    """sys.stdout / sys.stderr: text goes out in batches, as ``stream`` messages, while the cell runs.

    A write only buffers, as in ipykernel: per request, the writer's (:data:`request`), read when it
    writes. The buffers are sent 50 ms after the first write (by a timer on the IOPub thread, which
    keeps running while the main thread computes), as soon as they hold 64 KiB, and before anything
    else is published or replied (the kernel flushes them first), so output keeps its order and a
    loop of prints costs a few messages, not one per line. Thread-safe.
    """

    FLUSH_AFTER = 0.05  # seconds: output stays live
    FLUSH_AT = 64 * 1024  # characters: a fast printer sends big messages, and few

    def __init__(self, executor: Executor, name: str) -> None:
        self.executor = executor
        self._name = name
        self._buffers: dict[int, tuple[dict[str, Any] | None, list[str]]] = {}  # id(request): request, texts
        self._size = 0
        self._lock = threading.Lock()
        self._scheduled = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        parent = request.get() or self.executor.latest  # the writer's cell: Executor.parent, inlined
        if not text or (parent and parent["content"].get("silent")):
            return len(text)
        with self._lock:
            buffer = self._buffers.get(id(parent))
            if buffer is None:
                buffer = self._buffers[id(parent)] = (parent, [])
            buffer[1].append(text)
            self._size += len(text)
            full = self._size >= self.FLUSH_AT
            schedule = not full and not self._scheduled
            self._scheduled = self._scheduled or schedule
        if full:
            self.flush()
        elif schedule:
            thread = self.executor.kernel.iopub_thread
            thread.call(lambda: thread.loop.call_later(self.FLUSH_AFTER, self.flush))  # type: ignore[union-attr]
        return len(text)

    def flush(self) -> None:
        if not self._buffers:
            return  # nothing to send (checked without the lock: every publish asks)
        with self._lock:
            buffers, self._buffers, self._size, self._scheduled = self._buffers, {}, 0, False
            # Published under the lock, so a timer's flush and the cell's own can't swap texts.
            for parent, texts in buffers.values():
                self.executor.kernel.publish("stream", {"name": self._name, "text": "".join(texts)}, parent)


class History:
    """The inputs (and plain-text outputs) of cells run with store_history, in memory."""

    session = 1

    def __init__(self) -> None:
        self.entries: list[tuple[int, str, str | None]] = []

    def add(self, line: int, source: str, output: str | None) -> None:
        self.entries.append((line, source, output))

    def query(self, hist_access_type: str = "tail", output: bool = False, n: int | None = None,
              session: int | None = None, start: int = 0, stop: int | None = None,
              pattern: str = "*", unique: bool = False, **_: Any) -> list[Any]:
        entries = self.entries
        if hist_access_type == "range":
            entries = [e for e in entries if (session in (None, 0, self.session))
                       and e[0] >= (start or 0) and (stop is None or e[0] < stop)]
        elif hist_access_type == "search":
            entries = [e for e in entries if fnmatch.fnmatch(e[1], pattern or "*")]
            if unique:
                seen: dict[str, tuple[int, str, str | None]] = {}
                for e in entries:
                    seen.pop(e[1], None)
                    seen[e[1]] = e
                entries = list(seen.values())
        if hist_access_type in ("tail", "search") and n:
            entries = entries[-n:]
        return [[self.session, line, [src, out] if output else src] for line, src, out in entries]


class Executor:
    """The user namespace and everything needed to run cells in it."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.count = 0
        self.history = History()
        self.latest: dict[str, Any] | None = None  # the request of the cell that started last
        self.in_user_code = False
        self.interrupt_pending = False  # an interrupt came as the cell started: raised on entering its code
        self.live: tuple[str, dict[str, Any]] | None = None  # %dispatch --live: display id, parent
        self.namespace: dict[str, Any] = {
            "__name__": "__main__", "__builtins__": builtins,
            "display": self.display, "clear_output": self.clear_output,
            "exit": _AskExit(self), "quit": _AskExit(self),
        }
        self.ask_exit: bool | None = None  # exit() in the running cell: keep the kernel?
        self._stdin: tuple[list[bytes], bool] = ([], False)
        sys.stdout = OutStream(self, "stdout")  # type: ignore[assignment]
        sys.stderr = OutStream(self, "stderr")  # type: ignore[assignment]
        builtins.input = self.input  # type: ignore[assignment]
        inherit_context()
        # With IPython installed, IPython.display's functions publish through this kernel too; without
        # it nothing of IPython is imported, and our display / clear_output above are the only ones.
        self.ipython = None
        if importlib.util.find_spec("IPython") is not None:
            from .ipython_display import install

            self.ipython = install(self)

    @property
    def parent(self) -> dict[str, Any] | None:
        """The request output belongs to: the cell whose work calls, else (code that runs in no cell's
        context, such as a thread C code started) the latest cell, as in ipykernel."""
        return request.get() or self.latest

    # -------------------------------------------------------------- execute
    async def execute(self, code: str, msg: dict[str, Any], *, silent: bool, store_history: bool,
                      user_expressions: dict[str, str], allow_stdin: bool, idents: list[bytes],
                      record: Record) -> dict[str, Any]:
        """Run one cell; return the execute_reply content."""
        store_history = store_history and not silent
        if store_history:
            self.count += 1  # the spec: only cells stored in history advance the count
        request.set(msg)  # in this cell's task: its context, copied by what the cell starts
        self.latest, self._stdin = msg, (idents, allow_stdin)
        if not silent:
            self.kernel.publish("execute_input", {"code": code, "execution_count": self.count}, msg, record=record)
        output: str | None = None
        payload: list[dict[str, Any]] = []
        self.ask_exit = None
        if self.ipython is not None:
            self.ipython.events.trigger("pre_execute")
        try:
            help_for = re.fullmatch(r"\s*([\w.]+)\?\s*", code)
            if help_for:  # `name?` pages the object's help, as in IPython
                page = self.inspect(help_for.group(1), len(help_for.group(1)))
                if not page:
                    raise NameError(f"no object named {help_for.group(1)!r}")
                payload.append({"source": "page", "data": page, "start": 0})
                value = None
            elif code.strip().startswith("%dispatch"):
                value = self._dispatch_magic(code.strip().split()[1:])
            else:
                value = await self._run(code)
            if value is not None and not silent:
                self.namespace["_"] = value
                data, metadata = self._format(value)
                output = data.get("text/plain")
                if data:  # empty when the object displayed itself (IPython's _ipython_display_)
                    self.kernel.publish("execute_result", {
                        "execution_count": self.count, "data": data, "metadata": metadata,
                    }, msg, record=record)
            if self.ask_exit is not None:  # the frontend closes (jupyter console quits), as in IPython
                payload.append({"source": "ask_exit", "keepkernel": self.ask_exit})
            reply: dict[str, Any] = {"status": "ok", "execution_count": self.count, "payload": payload,
                                     "user_expressions": self._user_expressions(user_expressions)}
        except BaseException as exc:  # noqa: BLE001 - the user's error becomes the reply
            # SystemExit (sys.exit()) and GeneratorExit too: a cell can't end the kernel,
            # as in ipykernel; shutdown_request (or the frontend's restart button) does.
            error = self._error(exc)
            if not silent:
                self.kernel.publish("error", error, msg, record=record)
            reply = {"status": "error", "execution_count": self.count, **error}
        finally:
            if self.ipython is not None:
                self.ipython.events.trigger("post_execute")  # e.g. matplotlib redraws here
            sys.stdout.flush()
            sys.stderr.flush()
        if store_history:
            self.history.add(self.count, code, output)
        return reply

    async def _run(self, code: str) -> Any:
        """Compile once; run every statement; return the last expression's value. Awaits if needed."""
        filename = self._filename()
        linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
        tree = ast.parse(code, filename=filename)
        last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        if last is not None:
            del tree.body[-1]
        value = None
        for node, mode in ((ast.Module(tree.body, []), "exec"), (ast.Expression(last.value) if last else None, "eval")):
            if node is None:
                continue
            compiled = compile(node, self._filename(), mode, flags=_AWAIT, dont_inherit=True)
            self.in_user_code = True
            try:
                if self.interrupt_pending:
                    self.interrupt_pending = False
                    raise KeyboardInterrupt
                result = eval(compiled, self.namespace)
                if compiled.co_flags & inspect.CO_COROUTINE:
                    result = await result
            finally:
                self.in_user_code = False
            if mode == "eval":
                value = result
        return value

    def _format(self, value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """A cell's value as data and metadata: IPython's formatter when it is there, else ours."""
        if self.ipython is not None and self.ipython.display_formatter is not None:
            return self.ipython.display_formatter.format(value)
        return mime_bundle(value), {}

    def _filename(self) -> str:
        return f"<cell {self.count}>"

    def _user_expressions(self, expressions: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, expression in expressions.items():
            try:
                out[name] = {"status": "ok", "data": mime_bundle(eval(expression, self.namespace)), "metadata": {}}
            except Exception as exc:  # noqa: BLE001 - reported per expression, as the spec says
                out[name] = {"status": "error", **self._error(exc)}
        return out

    @staticmethod
    def _error(exc: BaseException) -> dict[str, Any]:
        import asyncio

        if isinstance(exc, asyncio.CancelledError):  # keep its traceback: where the cell awaited
            exc = KeyboardInterrupt("the cell was interrupted while it awaited").with_traceback(exc.__traceback__)
        frames = traceback.extract_tb(exc.__traceback__)
        # Keep the user's frames (from "<cell N>") and what they called. Drop the kernel's own: those
        # that ran the cell, before it, and after the cell's last frame, from the first of ours on
        # (the SIGINT handler that stopped it, input() waiting for the frontend, and what they called).
        cells = [i for i, f in enumerate(frames) if f.filename.startswith("<cell ")]
        start, after = (cells[0], cells[-1] + 1) if cells else (len(frames), len(frames))
        own = (i for i in range(after, len(frames)) if os.path.dirname(os.path.abspath(frames[i].filename)) == _PACKAGE_DIR)
        lines = traceback.format_list(frames[start:next(own, len(frames))])
        lines += traceback.format_exception_only(type(exc), exc)
        return {"ename": type(exc).__name__, "evalue": str(exc),
                "traceback": ["Traceback (most recent call last):"] + [line.rstrip("\n") for line in lines]}

    # -------------------------------------------------------------- display and input
    def display(self, *objs: Any, display_id: str | None = None, update: bool = False) -> None:
        """Show objects in the cell, with their rich representations (as IPython's display)."""
        for obj in objs:
            self.publish_display(mime_bundle(obj), {}, {"display_id": display_id} if display_id else {}, update=update)

    def publish_display(self, data: dict[str, Any], metadata: dict[str, Any], transient: dict[str, Any], *,
                        update: bool = False) -> None:
        """Publish ``display_data`` (or ``update_display_data``) in the running cell, after its prints."""
        sys.stdout.flush()
        content = {"data": data, "metadata": metadata, "transient": transient}
        self.kernel.publish("update_display_data" if update else "display_data", content, self.parent)

    def clear_output(self, wait: bool = False) -> None:
        """Clear the cell's output, now or (``wait=True``) when the next output arrives."""
        sys.stdout.flush()
        self.kernel.publish("clear_output", {"wait": wait}, self.parent)

    def input(self, prompt: str = "") -> str:
        """input(): ask the frontend over the stdin channel and wait for its reply."""
        idents, allowed = self._stdin
        if not allowed:
            raise StdinNotImplementedError("input() is not available: this frontend does not accept input")
        sys.stdout.flush()
        socket = self.kernel.stdin_socket
        with self.kernel.session_lock:
            self.kernel.session.send(socket, "input_request", {"prompt": str(prompt), "password": False},
                                     parent=self.parent, ident=idents)
        while True:  # poll, so an interrupt (SIGINT) can stop the wait
            if socket.poll(100, zmq.POLLIN):
                _, frames = self.kernel.session.feed_identities(socket.recv_multipart())
                with self.kernel.session_lock:
                    reply = self.kernel.session.deserialize(frames)
                return str(reply["content"].get("value", ""))

    # -------------------------------------------------------------- %dispatch
    def _dispatch_magic(self, args: list[str]) -> Any:
        """``%dispatch [N]`` (the table and the records), ``%dispatch --live [N]``, ``--stop``."""
        usage = "usage: %dispatch [N] | %dispatch --live [N] | %dispatch --stop"
        flags = [a for a in args if a.startswith("--")]
        numbers = [a for a in args if not a.startswith("--")]
        if any(f not in ("--live", "--stop") for f in flags) or len(numbers) > 1 or (numbers and not numbers[0].isdigit()):
            raise ValueError(usage)
        n = int(numbers[0]) if numbers else 20
        trace = self.kernel.trace
        if "--stop" in flags:
            trace.listeners.clear()
            self.live = None
            return None
        if "--live" in flags:
            display_id = f"dispatch-{time.time_ns()}"
            parent = self.parent or {}
            self.display(_Bundle(bundle(trace.last(n))), display_id=display_id)

            def refresh() -> None:
                self.kernel.publish("update_display_data", {
                    "data": bundle(trace.last(n)), "metadata": {}, "transient": {"display_id": display_id},
                }, parent)

            trace.listeners[:] = [refresh]
            return None
        return _Bundle(bundle(trace.last(n)))  # the table, with the records as data, in one output

    # -------------------------------------------------------------- complete, inspect, is_complete
    def complete(self, code: str, cursor: int) -> tuple[list[str], int, int]:
        token = re.search(r"[\w.]*$", code[:cursor])
        prefix = token.group(0) if token else ""
        completer = rlcompleter.Completer(self.namespace)
        matches: list[str] = []
        for state in range(1000):
            match = completer.complete(prefix, state)
            if match is None:
                break
            match = match.rstrip("(")
            if match not in matches:
                matches.append(match)
        return matches, cursor - len(prefix), cursor

    def inspect(self, code: str, cursor: int) -> dict[str, str]:
        left = re.search(r"[\w.]*$", code[:cursor])
        right = re.match(r"\w*", code[cursor:])
        name = (left.group(0) if left else "") + (right.group(0) if right else "")
        try:
            parts = name.split(".")
            obj = self.namespace[parts[0]] if parts[0] in self.namespace else getattr(builtins, parts[0])
            for part in parts[1:]:
                obj = getattr(obj, part)
        except (AttributeError, KeyError, IndexError):
            return {}
        try:
            signature = f"{name}{inspect.signature(obj)}"
        except (TypeError, ValueError):
            signature = name
        doc = inspect.getdoc(obj) or ""
        return {"text/plain": f"{signature}\ntype: {type(obj).__name__}\n\n{doc}".rstrip()}

    @staticmethod
    def is_complete(code: str) -> dict[str, Any]:
        compiler = codeop.CommandCompiler()
        compiler.compiler.flags |= _AWAIT  # top-level await is valid here
        try:
            complete = compiler(code, "<input>", "exec") is not None
        except (SyntaxError, OverflowError, ValueError):
            return {"status": "invalid"}
        # An indented block stays open until an empty line, as at a Python prompt.
        if complete and not code.endswith("\n\n") and _indented_block(code):
            complete = False
        if complete:
            return {"status": "complete"}
        last = code.rstrip("\n").split("\n")[-1]
        indent = len(last) - len(last.lstrip())
        if last.rstrip().endswith(":"):
            indent += 4
        return {"status": "incomplete", "indent": " " * indent}


def _indented_block(code: str) -> bool:
    """A multi-line block whose last line is indented is still open until an empty line."""
    last = code.rstrip("\n").split("\n")[-1]
    return last.startswith((" ", "\t"))


class _AskExit:
    """``exit()`` and ``quit()`` in a cell: ask the frontend to close, as IPython's do (a payload on
    the reply); ``exit(keep_kernel=True)`` leaves the kernel running."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def __repr__(self) -> str:
        return "Use exit() or Ctrl-D to close the frontend."

    def __call__(self, keep_kernel: bool = False) -> None:
        self.executor.ask_exit = keep_kernel


class _Bundle:
    """An object whose representation is a ready mime bundle (what %dispatch returns)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __repr__(self) -> str:
        return str(self.data["text/plain"])

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return self.data
