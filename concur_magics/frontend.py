"""Drive a real kernel with jupyter_client and keep what a frontend would show in each cell.

Used by the tour, the tests and the benchmarks. A :class:`Kernel` sends ``execute_request`` s and
files every IOPub message under the cell (the request) it answers, by its parent ``msg_id`` — so
output that arrives after a cell's reply, or while another cell runs, lands where a frontend would
put it. ``update_display_data`` updates every cell that showed that display id, as JupyterLab does.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from queue import Empty
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

__all__ = ["Cell", "Kernel", "python_kernelspec_dir", "running_kernel"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """Remove terminal colour codes (tracebacks carry them)."""
    return _ANSI.sub("", text)


@dataclass
class Cell:
    """One executed cell: its request, its reply and the outputs a frontend shows under it."""

    code: str
    msg_id: str
    reply: dict[str, Any] | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    idle: bool = False
    _clear_pending: bool = False

    @property
    def status(self) -> str | None:
        """``"ok"``, ``"error"`` or ``"aborted"`` from the reply (None before it arrives)."""
        return None if self.reply is None else self.reply["status"]

    def stream(self, name: str) -> str:
        return "".join(o["text"] for o in self.outputs if o["output_type"] == "stream" and o["name"] == name)

    @property
    def stdout(self) -> str:
        return self.stream("stdout")

    @property
    def stderr(self) -> str:
        return self.stream("stderr")

    @property
    def error(self) -> dict[str, Any] | None:
        """The last ``error`` output: ``ename``, ``evalue`` and ``traceback`` (ANSI removed)."""
        for out in reversed(self.outputs):
            if out["output_type"] == "error":
                return {**out, "traceback": [strip_ansi(line) for line in out["traceback"]]}
        return None

    @property
    def results(self) -> list[dict[str, Any]]:
        """``data`` bundles of execute results and displays, in order."""
        return [o["data"] for o in self.outputs if o["output_type"] in ("execute_result", "display_data")]

    @property
    def text(self) -> str:
        """Everything shown, as plain text, in order: what a reader sees in the cell."""
        parts: list[str] = []
        for out in self.outputs:
            kind = out["output_type"]
            if kind == "stream":
                parts.append(out["text"])
            elif kind in ("execute_result", "display_data"):
                parts.append(out["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                parts.append(strip_ansi("\n".join(out["traceback"])) + "\n")
        return "".join(parts)

    def _add(self, msg_type: str, content: dict[str, Any]) -> None:
        if self._clear_pending and msg_type in ("stream", "display_data", "execute_result", "error"):
            self.outputs.clear()
            self._clear_pending = False
        if msg_type == "stream":
            self.outputs.append({"output_type": "stream", "name": content["name"], "text": content["text"]})
        elif msg_type in ("display_data", "execute_result"):
            self.outputs.append({"output_type": msg_type, **content})
        elif msg_type == "error":
            self.outputs.append({"output_type": "error", **content})
        elif msg_type == "clear_output":
            if content.get("wait"):
                self._clear_pending = True
            else:
                self.outputs.clear()


class Kernel:
    """A running kernel and the cells executed on it. Not thread-safe: use from one thread."""

    def __init__(self, manager: KernelManager) -> None:
        self.manager = manager
        self.client = manager.client()
        self.client.start_channels()
        self.cells: dict[str, Cell] = {}
        self.messages: list[dict[str, Any]] = []  # every IOPub message, with its arrival time
        self.replies: dict[str, dict[str, Any]] = {}  # every shell and control reply, by request id

    def wait_ready(self, timeout: float = 60) -> None:
        self.client.wait_for_ready(timeout=timeout)
        # Drain startup chatter (status messages) so it is not filed under a cell.
        self.pump(0.1)

    def execute(self, code: str, *, timeout: float = 60, wait: bool = True, cell_id: str | None = None,
                **options: Any) -> Cell:
        """Run ``code``; with ``wait`` return once the kernel is idle again after it.

        ``cell_id`` is sent as the request's ``metadata.cellId``, as JupyterLab, Notebook 7 and
        nbclient send the id of the notebook cell being run.

        Raises
        ------
        TimeoutError
            If the reply or the idle status does not arrive within ``timeout`` seconds.
        """
        if cell_id is None:
            msg_id = self.client.execute(code, **options)
        else:
            content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                       "allow_stdin": False, "stop_on_error": True, **options}
            msg = self.client.session.msg("execute_request", content, metadata={"cellId": cell_id})
            self.client.shell_channel.send(msg)
            msg_id = msg["header"]["msg_id"]
        cell = self.cells[msg_id] = Cell(code, msg_id)
        if wait:
            self.wait(cell, timeout=timeout)
        return cell

    def wait(self, cell: Cell, timeout: float = 60) -> Cell:
        """Wait for ``cell``'s reply and its idle status."""
        code = cell.code if len(cell.code) <= 300 else f"{cell.code[:150]}...{cell.code[-150:]}"
        self.wait_until(lambda: cell.idle and cell.reply is not None, timeout, f"cell {code!r}")
        return cell

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        """Pump messages until ``predicate()`` holds; raise TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            self.pump(min(remaining, 0.05))

    def pump(self, duration: float) -> None:
        """Read shell replies and IOPub messages for about ``duration`` seconds."""
        end = time.monotonic() + duration
        while True:
            got = self._read_one(self.client.get_iopub_msg, self._on_iopub)
            got |= self._read_one(self.client.get_shell_msg, self._on_reply)
            got |= self._read_one(self.client.get_control_msg, self._on_reply)
            if not got and time.monotonic() >= end:
                return
            if not got:
                time.sleep(0.002)

    @staticmethod
    def _read_one(getter: Callable[..., dict[str, Any]], handle: Callable[[dict[str, Any]], None]) -> bool:
        try:
            msg = getter(timeout=0)
        except Empty:
            return False
        handle(msg)
        return True

    def request(self, msg_type: str, content: dict[str, Any] | None = None, *, channel: str = "shell",
                timeout: float = 30) -> dict[str, Any]:
        """Send a request on the shell or control channel and return its reply, while still
        filing every other message (a running cell's output and reply) where it belongs."""
        msg = self.client.session.msg(msg_type, content or {})
        getattr(self.client, f"{channel}_channel").send(msg)
        msg_id = msg["header"]["msg_id"]
        self.wait_until(lambda: msg_id in self.replies, timeout, f"the {msg_type} reply")
        return self.replies.pop(msg_id)

    def _on_reply(self, msg: dict[str, Any]) -> None:
        self.replies[msg["parent_header"].get("msg_id", "")] = msg
        cell = self.cells.get(msg["parent_header"].get("msg_id"))
        if cell is not None:
            cell.reply = msg["content"]

    def _on_iopub(self, msg: dict[str, Any]) -> None:
        msg["received"] = time.time()
        self.messages.append(msg)
        msg_type, content = msg["msg_type"], msg["content"]
        if msg_type == "update_display_data":
            self._update_display(content)
            return
        cell = self.cells.get(msg["parent_header"].get("msg_id"))
        if cell is None:
            return
        if msg_type == "status" and content["execution_state"] == "idle":
            cell.idle = True
        cell._add(msg_type, content)

    def _update_display(self, content: dict[str, Any]) -> None:
        display_id = content.get("transient", {}).get("display_id")
        for cell in self.cells.values():
            for out in cell.outputs:
                if display_id and out.get("transient", {}).get("display_id") == display_id:
                    out["data"], out["metadata"] = content["data"], content.get("metadata", {})

    def children(self) -> list[Any]:
        """The kernel process's descendants (psutil processes)."""
        import psutil

        return psutil.Process(self.pid).children(recursive=True)

    @property
    def pid(self) -> int:
        provisioner = self.manager.provisioner
        return int(provisioner.process.pid)  # type: ignore[union-attr]

    def shutdown(self) -> None:
        """Stop the channels and the kernel (if it still runs). Idempotent."""
        self.client.stop_channels()
        if self.manager.has_kernel:
            self.manager.shutdown_kernel(now=False)


def python_kernelspec_dir(root: str) -> str:
    """Write a kernelspec for an ipykernel on this very interpreter under ``root``; return ``root``."""
    spec_dir = os.path.join(root, "concur-python")
    os.makedirs(spec_dir, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (concur_magics)",
        "language": "python",
    }
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump(spec, f)
    return root


# How often running_kernel starts a kernel that exits as it starts (see there).
START_TRIES = 3


@contextmanager
def running_kernel(
    kernel_name: str = "concur-python",
    *,
    env: dict[str, str] | None = None,
    startup_timeout: float = 60,
    kernel_dirs: list[str] | None = None,
    **start_options: Any,
) -> Iterator[Kernel]:
    """Start a kernel (by default an ipykernel on this interpreter) and shut it down afterwards.

    The kernel gets its own ``IPYTHONDIR`` so a user's profile can't change what it does, and
    never pytest's ``PYTEST_CURRENT_TEST`` (ipykernel stops capturing file descriptors 1 and 2
    when it sees it, so a kernel started from a test would not behave as users' kernels do).

    jupyter_client picks the kernel's five ports by binding and releasing them, and the kernel binds
    them a moment later; if another process took one meanwhile (a Dask worker, another kernel
    starting), the kernel fails ("Address already in use") and exits, or hangs as it exits. A
    kernel that exits or does not answer within ``startup_timeout`` is killed and started again on
    new ports, up to ``START_TRIES`` times in all.

    ``start_options`` go to ``KernelManager.start_kernel`` (``extra_arguments``,
    ``transport_encryption``, ``cwd`` (the current directory by default), ``stderr``, ...).
    """
    with tempfile.TemporaryDirectory(prefix="concur-kernel-") as tmp:
        dirs = kernel_dirs if kernel_dirs is not None else [python_kernelspec_dir(tmp)]
        specs = KernelSpecManager(kernel_dirs=dirs, ensure_native_kernel=False)
        kernel_env = {**os.environ, "IPYTHONDIR": os.path.join(tmp, "ipython"), **(env or {})}
        kernel_env.pop("PYTEST_CURRENT_TEST", None)
        for attempt in range(1, START_TRIES + 1):
            manager = KernelManager(kernel_name=kernel_name, kernel_spec_manager=specs)
            manager.start_kernel(**{"env": kernel_env, "cwd": os.getcwd(), **start_options})
            kernel = Kernel(manager)
            try:
                kernel.wait_ready(startup_timeout)
                break
            except RuntimeError:
                what = "exited as it started" if not manager.is_alive() else f"did not answer within {startup_timeout:g} s"
                if manager.has_kernel:
                    manager.shutdown_kernel(now=True)  # one that lost a port can hang as it exits
                kernel.shutdown()
                manager.cleanup_resources()
                if attempt == START_TRIES:
                    raise
                print(f"concur_magics: the {kernel_name} kernel {what} (a port taken between "
                      "jupyter_client choosing it and the kernel binding it?); starting it again on "
                      "new ports", file=sys.stderr)
        try:
            yield kernel
        finally:
            kernel.shutdown()
