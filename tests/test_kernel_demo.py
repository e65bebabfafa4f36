"""The demo kernel, from its installed kernelspec: the protocol conformance suite, and the rest."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import jupyter_kernel_test
import pytest
import zmq
from jupyter_client.session import Session

from concur_magics.frontend import Kernel, running_kernel
from kernel_demo.trace import MIME_TYPE
from tests.conftest import run


class DemoKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = "kernel_demo"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}, {"text": "x = str.up", "matches": {"str.upper"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n    return x * 2\n\n", "await x"]
    incomplete_code_samples = ["print('''hello", "def f(x):", "def f(x):\n    x = 2", "x = (1,"]
    invalid_code_samples = ["import = 7q", "a b c"]
    code_generate_error = "raise ValueError('planned')"
    code_execute_result = [{"code": "1+2+3", "result": "6"}, {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"}]
    code_display_data = [
        {"code": "display(42)", "mime": "text/plain"},
        {"code": "class H:\n    def _repr_html_(self): return '<b>h</b>'\ndisplay(H())", "mime": "text/html"},
    ]
    code_history_pattern = "1?2*"
    supported_history_operations = ("tail", "range", "search")
    code_inspect_sample = "zip"
    code_page_something = "zip?"
    code_clear_output = "print('soon gone'); clear_output()"


class DemoKernelWelcomeTests(jupyter_kernel_test.IopubWelcomeTests):
    kernel_name = "kernel_demo"
    support_iopub_welcome = True


@pytest.fixture(scope="module")
def demo(kernel_demo_spec: str) -> Iterator[Kernel]:
    with running_kernel("kernel_demo", kernel_dirs=[kernel_demo_spec]) as kernel:
        yield kernel


def control(kernel: Kernel, msg_type: str, content: dict[str, Any] | None = None, timeout: float = 5) -> dict[str, Any]:
    """Send a request on the control channel and return its reply."""
    msg = kernel.client.session.msg(msg_type, content or {})
    kernel.client.control_channel.send(msg)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = kernel.client.control_channel.get_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            return reply
    raise TimeoutError(f"no {msg_type} reply within {timeout} s")


def dispatch_records(kernel: Kernel, n: int = 50) -> list[dict[str, Any]]:
    cell = run(kernel, f"%dispatch {n}")
    assert cell.status == "ok", cell.text
    return list(cell.results[-1][MIME_TYPE])


@pytest.mark.parametrize("code, ename", [
    ("raise SystemExit", "SystemExit"),
    ("import sys; sys.exit(3)", "SystemExit"),
    ("raise GeneratorExit", "GeneratorExit"),
    ("raise KeyboardInterrupt", "KeyboardInterrupt"),
    ("async def f():\n    raise SystemExit(2)\nawait f()", "SystemExit"),
])
def test_exits_from_a_cell_are_its_errors_and_the_kernel_stays(demo: Kernel, code: str, ename: str) -> None:
    cell = demo.execute(code, timeout=10)
    assert cell.status == "error" and cell.reply is not None and cell.reply["ename"] == ename, cell.text
    assert "<cell " in cell.text and "kernel_demo" not in cell.text, cell.text
    assert demo.execute("6 * 7", timeout=10).results[-1]["text/plain"] == "42"


def test_exit_asks_the_frontend_to_close_as_in_ipython(demo: Kernel) -> None:
    for code, keep in (("exit()", False), ("quit(keep_kernel=True)", True)):
        cell = demo.execute(code, timeout=10)
        assert cell.status == "ok" and cell.reply is not None, cell.text
        assert {"source": "ask_exit", "keepkernel": keep} in cell.reply["payload"]
    assert demo.execute("6 * 7", timeout=10).reply["payload"] == []  # type: ignore[index]


def test_control_is_answered_while_a_cell_sleeps(demo: Kernel) -> None:
    cell = demo.execute("import time\ntime.sleep(5)", wait=False)
    time.sleep(0.3)
    start = time.monotonic()
    reply = control(demo, "kernel_info_request")
    assert reply["content"]["implementation"] == "kernel_demo"
    # Generous (a loaded machine): the cell sleeps 5 s; the reply must not have waited for it.
    assert time.monotonic() - start < 4
    assert cell.reply is None
    demo.wait(cell, timeout=10)


@pytest.mark.parametrize("how", ["signal", "message"])
@pytest.mark.parametrize("code", ["while True:\n    pass", "import asyncio\nawait asyncio.sleep(30)"])
def test_interrupt_stops_a_cell_and_shows_only_the_users_code(demo: Kernel, how: str, code: str) -> None:
    """A busy loop is stopped where it runs; a cell that awaits is cancelled at its await."""
    cell = demo.execute(code, wait=False)
    time.sleep(0.5)
    if how == "signal":
        demo.manager.interrupt_kernel()
    else:
        assert control(demo, "interrupt_request")["content"]["status"] == "ok"
    demo.wait(cell, timeout=10)
    assert cell.error is not None and cell.error["ename"] == "KeyboardInterrupt"
    traceback = cell.error["traceback"]
    files = [line.split('"')[1] for line in traceback if line.lstrip().startswith('File "')]
    assert files and files[0].startswith("<cell "), traceback  # where the cell was stopped
    assert not [f for f in files if "kernel_demo" in f], traceback  # not the kernel's signal handler
    assert run(demo, "'still here'").results[-1]["text/plain"] == "'still here'"


def test_an_interrupt_sent_as_a_cell_starts_is_not_lost(demo: Kernel) -> None:
    """Interrupt the moment the cell's busy status arrives, ten times. The cell is long (20,000
    lines take the kernel tens of milliseconds to compile), so the interrupt lands before its code
    has started, and must stop it as soon as it starts."""
    code = "x = 0\n" * 20_000 + "while True:\n    pass"
    for _ in range(10):
        cell = demo.execute(code, wait=False)
        demo.wait_until(lambda: any(m["parent_header"].get("msg_id") == cell.msg_id and m["msg_type"] == "status"
                                    for m in demo.messages), 10, "busy")
        demo.manager.interrupt_kernel()
        demo.wait(cell, timeout=10)
        assert cell.error is not None and cell.error["ename"] == "KeyboardInterrupt"
    assert run(demo, "'still here'").results[-1]["text/plain"] == "'still here'"


def test_input_round_trip(demo: Kernel) -> None:
    cell = demo.execute("name = input('name? ')\nprint('hello', name)", wait=False, allow_stdin=True)
    request = demo.client.get_stdin_msg(timeout=10)
    assert request["msg_type"] == "input_request" and request["content"]["prompt"] == "name? "
    demo.client.input("Ada")
    demo.wait(cell, timeout=10)
    assert cell.stdout == "hello Ada\n"


def test_input_without_stdin_is_a_clear_error(demo: Kernel) -> None:
    cell = demo.execute("input('?')", allow_stdin=False)
    assert cell.error is not None and cell.error["ename"] == "StdinNotImplementedError"


def test_a_cell_that_awaits_lets_other_requests_through(demo: Kernel) -> None:
    cell = demo.execute("import asyncio\nawait asyncio.sleep(5)\n'slept'", wait=False)
    time.sleep(0.3)
    start = time.monotonic()
    reply = demo.client.complete("zi", reply=True, timeout=5)
    assert "zip" in reply["content"]["matches"]
    assert time.monotonic() - start < 4 and cell.reply is None  # the cell awaits for 5 s
    demo.wait(cell, timeout=10)
    assert cell.results[-1]["text/plain"] == "'slept'"


def test_stop_on_error_aborts_queued_requests(demo: Kernel) -> None:
    run(demo, "queued_ran = False")
    failing = demo.execute("import time\ntime.sleep(0.5)\n1/0", wait=False)
    queued = demo.execute("queued_ran = True", wait=False)
    demo.wait(failing, timeout=10)
    demo.wait(queued, timeout=10)
    assert failing.status == "error" and queued.status == "error"
    assert queued.reply is not None and queued.reply["ename"] == "ExecutionAborted"
    assert run(demo, "queued_ran").results[-1]["text/plain"] == "False"


def test_execution_count_advances_only_with_store_history(demo: Kernel) -> None:
    first = run(demo, "1").reply["execution_count"]
    quiet = demo.execute("2", store_history=False)
    assert quiet.reply["execution_count"] == first
    assert run(demo, "3").reply["execution_count"] == first + 1


def test_user_expressions(demo: Kernel) -> None:
    cell = demo.execute("a = 6", user_expressions={"double": "a * 2", "bad": "nope"})
    expressions = cell.reply["user_expressions"]
    assert expressions["double"]["data"]["text/plain"] == "12"
    assert expressions["bad"]["status"] == "error" and expressions["bad"]["ename"] == "NameError"


def test_streams_arrive_while_the_cell_runs(demo: Kernel) -> None:
    cell = demo.execute("import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')", wait=False)
    demo.wait_until(lambda: "first" in cell.stdout, 10, "the first line")
    assert cell.reply is None
    demo.wait(cell, timeout=10)
    assert cell.stdout == "first\nsecond\n"


def test_dispatch_records_kernel_info_and_complete_in_order(demo: Kernel) -> None:
    demo.client.kernel_info(reply=True, timeout=5)
    demo.client.complete("pri", reply=True, timeout=5)
    records = dispatch_records(demo)
    assert set(records[0]) == {"channel", "msg_type", "msg_id", "handler", "received", "started", "finished", "sent", "rejected"}
    info = [r for r in records if r["msg_type"] == "kernel_info_request"][-1]
    complete = [r for r in records if r["msg_type"] == "complete_request"][-1]
    for record in (info, complete):
        assert record["received"] <= record["started"] <= record["finished"]
        assert record["channel"] == "shell" and record["rejected"] is None
    assert info["received"] < complete["received"]
    assert complete["handler"] == "complete_request"
    assert complete["sent"] == ["status", "complete_reply", "status"]


def test_dispatch_live_updates_until_stopped(demo: Kernel) -> None:
    cell = run(demo, "%dispatch --live 5")
    display_id = cell.outputs[0]["transient"]["display_id"]
    demo.client.complete("zi", reply=True, timeout=5)
    demo.pump(0.5)
    updates = [m for m in demo.messages if m["msg_type"] == "update_display_data"
               and m["content"]["transient"]["display_id"] == display_id]
    assert updates and "complete_request" in updates[-1]["content"]["data"]["text/plain"]
    run(demo, "%dispatch --stop")
    count = len([m for m in demo.messages if m["msg_type"] == "update_display_data"])
    demo.client.complete("zi", reply=True, timeout=5)
    demo.pump(0.5)
    assert len([m for m in demo.messages if m["msg_type"] == "update_display_data"]) == count


def _dealer(demo: Kernel, port: str) -> zmq.Socket[bytes]:
    info = demo.manager.get_connection_info()
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"tcp://{info['ip']}:{info[port]}")
    return sock


def test_forged_and_replayed_messages_are_not_executed(demo: Kernel) -> None:
    run(demo, "marker = 0")
    sock = _dealer(demo, "shell_port")
    try:
        forged = Session(key=b"not-the-key")
        forged.send(sock, "execute_request", {"code": "marker = 1", "silent": False})
        genuine = Session(key=demo.manager.session.key)
        msg = genuine.msg("execute_request", {"code": "marker += 10", "silent": False, "store_history": False})
        frames = genuine.serialize(msg)
        sock.send_multipart(frames)
        sock.send_multipart(frames)  # the very same signature again: a replay
        assert sock.poll(5000), "the genuine request got no reply"
        sock.recv_multipart()
        time.sleep(0.5)
        assert not sock.poll(500), "a forged or replayed request was answered"
    finally:
        sock.close()
    assert run(demo, "marker").results[-1]["text/plain"] == "10"
    rejected = [r["rejected"] for r in dispatch_records(demo, 200) if r["rejected"]]
    assert any("Invalid Signature" in r for r in rejected)
    assert any("Duplicate Signature" in r for r in rejected)


def test_hundreds_of_garbage_messages_leave_the_kernel_answering(demo: Kernel) -> None:
    rng = random.Random(7)
    for port in ("shell_port", "control_port"):
        sock = _dealer(demo, port)
        try:
            for _ in range(300):
                frames = [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 8))]
                if rng.random() < 0.5:
                    frames.insert(rng.randint(0, len(frames)), b"<IDS|MSG>")
                sock.send_multipart(frames)
        finally:
            sock.close()
    reply = control(demo, "kernel_info_request")
    assert reply["content"]["status"] == "ok"
    assert run(demo, "6 * 7").results[-1]["text/plain"] == "42"


def test_unknown_requests_get_an_error_reply(demo: Kernel) -> None:
    msg = demo.client.session.msg("frobnicate_request", {})
    demo.client.shell_channel.send(msg)
    reply = demo.client.get_shell_msg(timeout=5)
    assert reply["msg_type"] == "frobnicate_reply" and reply["content"]["status"] == "error"


def test_trace_file_and_empty_key_warning(tmp_path: Any) -> None:
    connection = {"transport": "tcp", "ip": "127.0.0.1", "key": "", "signature_scheme": "hmac-sha256"}
    with zmq.Context() as ctx:
        for name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
            s = ctx.socket(zmq.ROUTER)
            connection[name] = s.bind_to_random_port("tcp://127.0.0.1")
            s.close()
    conn_file = tmp_path / "conn.json"
    conn_file.write_text(json.dumps(connection))
    trace = tmp_path / "trace.jsonl"
    command = [sys.executable, "-m", "kernel_demo", "-f", str(conn_file), "--trace-file", str(trace)]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as process:
        try:
            from jupyter_client import BlockingKernelClient

            client = BlockingKernelClient()
            client.load_connection_info(connection)
            # Ready when kernel_info is answered. (With the heartbeat channel, jupyter_client would
            # call a kernel that takes over a second to start, on a busy machine, dead.)
            client.start_channels(hb=False)
            try:
                client.wait_for_ready(timeout=30)
                client.kernel_info(reply=True, timeout=5)
            finally:
                client.shutdown()
                client.stop_channels()
            _, err = process.communicate(timeout=15)
        finally:
            if process.poll() is None:
                process.kill()
    assert "empty key" in err
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert {"kernel_info_request", "shutdown_request"} <= {r["msg_type"] for r in records}
