"""The demo kernel on the wire: no lost output, stop_on_error as the spec says, and message order.

These tests read the sockets with a bare jupyter_client client, the way a script or nbclient does,
and most read IOPub only once the reply is in: whatever the cell published must be there by then.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from queue import Empty
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from concur_magics.frontend import Kernel, running_kernel


@pytest.fixture(scope="module")
def demo(kernel_demo_spec: str) -> Iterator[Kernel]:
    with running_kernel("kernel_demo", kernel_dirs=[kernel_demo_spec]) as kernel:
        yield kernel


@pytest.fixture
def client(demo: Kernel) -> BlockingKernelClient:
    """The kernel's client, with nothing left unread from an earlier test."""
    client: BlockingKernelClient = demo.client
    for get in (client.get_iopub_msg, client.get_shell_msg):
        while True:
            try:
                get(timeout=0.05)
            except Empty:
                break
    return client


def wait_reply(client: BlockingKernelClient, msg_id: str, timeout: float = 30) -> dict[str, Any]:
    """The shell reply to ``msg_id`` (other replies are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = client.get_shell_msg(timeout=max(0.0, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def read_after_reply(client: BlockingKernelClient, code: str, timeout: float = 60) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``code``; once its reply is in, read its IOPub messages up to ``idle``, and 0.3 s more
    to catch anything sent after ``idle``. Returns the reply and the cell's messages in order."""
    msg_id = client.execute(code)
    reply = wait_reply(client, msg_id, timeout)
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    quiet_until = None
    while quiet_until is None or time.monotonic() < quiet_until:
        try:
            # After idle, the 0.3 s are to see that nothing more comes; until then, the timeout.
            msg = client.get_iopub_msg(timeout=0.05 if quiet_until else max(0.0, deadline - time.monotonic()))
        except Empty:
            if quiet_until is None:
                raise TimeoutError(f"no idle for {code!r} within {timeout} s") from None
            continue
        if msg["parent_header"].get("msg_id") == msg_id:
            messages.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                quiet_until = time.monotonic() + 0.3
    return reply, messages


def kinds(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"]["execution_state"] if m["msg_type"] == "status" else m["msg_type"] for m in messages]


# ------------------------------------------------------------------ order on the wire


def test_a_cell_publishes_everything_before_its_reply_and_idle_last(client: BlockingKernelClient) -> None:
    code = "print('one')\nprint('two')\ndisplay(42)\nprint('three', end='')\n'value'"
    reply, messages = read_after_reply(client, code)
    assert reply["content"]["status"] == "ok"
    # Printed text comes before the display and the result that follow it, and idle is last.
    assert kinds(messages) == ["busy", "execute_input", "stream", "display_data", "stream", "execute_result", "idle"]
    assert [m["content"]["text"] for m in messages if m["msg_type"] == "stream"] == ["one\ntwo\n", "three"]
    assert messages[-2]["content"]["data"]["text/plain"] == "'value'"
    # The kernel's own clock: each message was made before the reply, except idle, made after it.
    reply_made = reply["header"]["date"]
    assert all(m["header"]["date"] <= reply_made for m in messages[:-1])
    assert messages[-1]["header"]["date"] >= reply_made


def test_50000_printed_lines_all_arrive_in_few_messages(client: BlockingKernelClient) -> None:
    reply, messages = read_after_reply(client, "for i in range(50000):\n    print(i)")
    assert reply["content"]["status"] == "ok"
    streams = [m for m in messages if m["msg_type"] == "stream"]
    assert "".join(m["content"]["text"] for m in streams) == "".join(f"{i}\n" for i in range(50000))
    # Batched: 50 ms of output, or 64 KiB, per message (the text is ~290 kB).
    assert len(streams) <= 300, len(streams)
    assert kinds(messages)[-1] == "idle" and kinds(messages).count("idle") == 1


def test_idle_is_never_lost_after_20000_lines(client: BlockingKernelClient) -> None:
    for _ in range(5):
        reply, messages = read_after_reply(client, "for i in range(20000):\n    print(i)")
        assert reply["content"]["status"] == "ok" and kinds(messages)[-1] == "idle"
        assert sum(m["content"]["text"].count("\n") for m in messages if m["msg_type"] == "stream") == 20000


def test_output_from_a_thread_of_the_cell_comes_before_idle(client: BlockingKernelClient) -> None:
    code = "import threading\nt = threading.Thread(target=print, args=('from a thread',))\nt.start(); t.join()"
    _, messages = read_after_reply(client, code)
    assert kinds(messages) == ["busy", "execute_input", "stream", "idle"]


# ------------------------------------------------------------------ stop_on_error


def test_a_cell_sent_after_the_error_reply_runs(client: BlockingKernelClient) -> None:
    # The aborting drain must read only what arrived before the reply went out: 50 tries in a row,
    # each sending the next cell the moment the error reply is in.
    for attempt in range(50):
        failing = client.execute("1/0")
        assert wait_reply(client, failing)["content"]["status"] == "error"
        after = client.execute(f"ran = {attempt}")
        assert wait_reply(client, after)["content"]["status"] == "ok", f"aborted on try {attempt}"


@pytest.mark.parametrize("wait", ["time.sleep(0.3)", "await asyncio.sleep(0.3)"])
def test_requests_waiting_behind_a_failing_cell_are_aborted(client: BlockingKernelClient, wait: str) -> None:
    # time.sleep blocks the loop, so the next requests wait in the socket; while the cell awaits,
    # they are read and queued behind it. Either way they were sent before the error: aborted.
    assert wait_reply(client, client.execute("marks = []"))["content"]["status"] == "ok"
    failing = client.execute(f"import asyncio, time\n{wait}\n1/0")
    waiting = [client.execute(f"marks.append({i})") for i in range(3)]
    first = client.get_shell_msg(timeout=30)
    assert first["parent_header"]["msg_id"] == failing and first["content"]["ename"] == "ZeroDivisionError"
    for msg_id in waiting:
        content = wait_reply(client, msg_id)["content"]
        assert content["status"] == "error" and content["ename"] == "ExecutionAborted"
    reply, messages = read_after_reply(client, "marks")
    assert reply["content"]["status"] == "ok" and messages[-2]["content"]["data"]["text/plain"] == "[]"


# ------------------------------------------------------------------ interrupts


def test_interrupting_a_displaying_cell_garbles_nothing(demo: Kernel, client: BlockingKernelClient) -> None:
    # The cell spends its time publishing displays. An interrupt that lands mid-send waits until
    # the message is out: every display arrives, in order, then the cell's error, then idle. (Cut
    # between its frames, a message garbled the next one within the first few tries.)
    for _ in range(15):
        msg_id = client.execute("i = 0\nwhile True:\n    display(i)\n    i += 1")
        messages: list[dict[str, Any]] = []

        def read_until(kind: str) -> None:
            while kind not in kinds(messages):
                msg = client.get_iopub_msg(timeout=10)
                if msg["parent_header"].get("msg_id") == msg_id:
                    messages.append(msg)

        read_until("display_data")  # the loop runs: interrupt it, at some point of its work
        time.sleep(0.05)
        demo.manager.interrupt_kernel()
        assert wait_reply(client, msg_id, timeout=10)["content"]["ename"] == "KeyboardInterrupt"
        read_until("idle")
        shown = [m["content"]["data"]["text/plain"] for m in messages if m["msg_type"] == "display_data"]
        assert shown == [str(i) for i in range(len(shown))]
        assert kinds(messages)[-2:] == ["error", "idle"]
