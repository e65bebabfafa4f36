"""One function per message type, in the order the messaging spec lists them.

Each handler gets the kernel, the stream the request came on, the sender's identities, the request
and its trace record, and answers with ``kernel.reply(...)``. ``execute_request`` is a coroutine, so
a cell that awaits lets the loop dispatch other requests meanwhile.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zmq.eventloop.zmqstream import ZMQStream

from .trace import Record

if TYPE_CHECKING:
    from .kernel import Kernel

Handler = Callable[["Kernel", ZMQStream, list[bytes], dict[str, Any], Record], Any]

LANGUAGE_INFO = {
    "name": "python",
    "version": ".".join(map(str, sys.version_info[:3])),
    "mimetype": "text/x-python",
    "file_extension": ".py",
    "pygments_lexer": "ipython3",
    "codemirror_mode": {"name": "ipython", "version": 3},
    "nbconvert_exporter": "python",
}


# ------------------------------------------------------------------ shell


async def execute_request(kernel: Kernel, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
    content = msg["content"]
    code = content.get("code", "")
    if not isinstance(code, str):
        kernel.reply(stream, idents, msg, _error("TypeError", "code must be a string", kernel), record)
        return
    reply = await kernel.executor.execute(
        code,
        msg,
        silent=bool(content.get("silent", False)),
        store_history=bool(content.get("store_history", True)),
        user_expressions=content.get("user_expressions") or {},
        allow_stdin=bool(content.get("allow_stdin", False)),
        idents=idents,
        record=record,
    )
    if reply["status"] == "error" and content.get("stop_on_error", True):
        kernel.reply_stopping(stream, idents, msg, reply, record)
    else:
        kernel.reply(stream, idents, msg, reply, record)


def inspect_request(kernel: Kernel, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
    content = msg["content"]
    data = kernel.executor.inspect(content.get("code", ""), int(content.get("cursor_pos", 0)))
    kernel.reply(stream, idents, msg, {"status": "ok", "found": bool(data), "data": data, "metadata": {}}, record)


def complete_request(kernel: Kernel, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
    content = msg["content"]
    code = content.get("code", "")
    matches, start, end = kernel.executor.complete(code, int(content.get("cursor_pos", len(code))))
    kernel.reply(stream, idents, msg, {
        "status": "ok", "matches": matches, "cursor_start": start, "cursor_end": end, "metadata": {},
    }, record)


def history_request(kernel: Kernel, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
    history = kernel.executor.history.query(**msg["content"])
    kernel.reply(stream, idents, msg, {"status": "ok", "history": history}, record)


def is_complete_request(kernel: Kernel, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
    kernel.reply(stream, idents, msg, kernel.executor.is_complete(msg["content"].get("code", "")), record)


def comm_info_request(kernel: Kernel, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
    kernel.reply(stream, idents, msg, {"status": "ok", "comms": {}}, record)


def kernel_info_request(kernel: Kernel, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
    from . import __version__

    kernel.reply(stream, idents, msg, {
        "status": "ok",
        "protocol_version": "5.5",
        "implementation": "kernel_demo",
        "implementation_version": __version__,
        "language_info": LANGUAGE_INFO,
        "banner": "kernel_demo: a small Jupyter kernel that shows how messages are dispatched",
        "help_links": [],
        "debugger": False,
        "supported_features": [],
    }, record)


def shutdown_request(kernel: Kernel, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
    content = {"status": "ok", "restart": bool(msg["content"].get("restart", False))}
    if kernel.execution is not None:
        kernel.interrupt()  # a running cell would keep the main loop from stopping
    kernel.reply(stream, idents, msg, content, record)
    kernel.publish("shutdown_reply", content, msg, record=record)  # 5.4: also broadcast on IOPub
    kernel.stop()


# ------------------------------------------------------------------ control


def interrupt_request(kernel: Kernel, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
    kernel.interrupt()
    kernel.reply(stream, idents, msg, {"status": "ok"}, record)


# ------------------------------------------------------------------ comms (the spec's custom messages)
# This kernel registers no comm targets, so no comm is ever open here.


def comm_open(kernel: Kernel, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
    """A target we don't have: close the comm at once, so the frontend doesn't think it is open."""
    kernel.publish("comm_close", {"comm_id": msg["content"].get("comm_id", ""), "data": {}}, msg, record=record)


def comm_msg(kernel: Kernel, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
    """For a comm we don't know: ignored, as the spec says."""


def comm_close(kernel: Kernel, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
    """For a comm we don't know: ignored, as the spec says."""


# ------------------------------------------------------------------ anything else


def unknown(kernel: Kernel, stream: ZMQStream, idents: list[bytes], msg: dict[str, Any], record: Record) -> None:
    """Every request gets an answer: an error reply for a type we don't handle here."""
    msg_type = msg["msg_type"]
    if not msg_type.endswith("_request"):
        record.rejected = f"not a request: {msg_type}"
        return
    kernel.reply(stream, idents, msg, _error("UnknownMessageType", f"kernel_demo does not handle {msg_type} here", kernel), record)


def _error(ename: str, evalue: str, kernel: Kernel) -> dict[str, Any]:
    return {"status": "error", "ename": ename, "evalue": evalue, "traceback": [], "execution_count": kernel.executor.count}


def table(shell_types: tuple[str, ...], control_types: tuple[str, ...]) -> dict[str, dict[str, Handler]]:
    """The dispatch table: for each channel, message type -> handler."""
    module = sys.modules[__name__]
    return {
        "shell": {t: getattr(module, t) for t in shell_types},
        "control": {t: getattr(module, t) for t in control_types},
    }
