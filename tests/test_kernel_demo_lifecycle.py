"""The demo kernel and its frontend: it exits when its launcher dies, answers comms as the
messaging spec says, and encrypts every socket when the launcher provisions CurveZMQ keys."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from jupyter_client import BlockingKernelClient
from jupyter_client.session import Session

from concur_magics.frontend import Kernel, running_kernel

# ------------------------------------------------------------------ dies with its frontend

# Each launcher starts a kernel and then sleeps until it is killed. argv[1] is a scratch directory.
LAUNCHERS = {
    # A real Jupyter application: it starts the kernel with KernelManager, as jupyter console does,
    # so the kernel's parent is the launcher and JPY_PARENT_PID names it.
    "jupyter kernel": [os.path.join(os.path.dirname(sys.executable), "jupyter-kernel"), "--kernel=kernel_demo"],
    # A plain Popen with a connection file and no JPY_PARENT_PID: the parent pid alone tells.
    "Popen": [sys.executable, "-c", """
import os, subprocess, sys, time
from jupyter_client.connect import write_connection_file
path, _ = write_connection_file(os.path.join(sys.argv[1], "k.json"), ip="127.0.0.1", key=b"k")
env = {k: v for k, v in os.environ.items() if k != "JPY_PARENT_PID"}
subprocess.Popen([sys.executable, "-m", "kernel_demo", "-f", path], env=env)
time.sleep(600)
"""],
    # A wrapper between launcher and kernel (as `sh -c`, `conda run`): the wrapper lives on, so only
    # JPY_PARENT_PID tells. `; true` keeps sh from exec'ing the kernel.
    "behind sh": [sys.executable, "-c", """
import os, subprocess, sys, time
from jupyter_client.connect import write_connection_file
path, _ = write_connection_file(os.path.join(sys.argv[1], "k.json"), ip="127.0.0.1", key=b"k")
env = dict(os.environ, JPY_PARENT_PID=str(os.getpid()))
subprocess.Popen(["sh", "-c", f"{sys.executable} -m kernel_demo -f {path}; true"], env=env)
time.sleep(600)
"""],
    # The kernel's stderr dies with the launcher (a closed terminal, here a pipe nobody reads any
    # more): saying why it shuts down fails, and must not stop it shutting down.
    "stderr gone too": [sys.executable, "-c", """
import os, subprocess, sys, time
from jupyter_client.connect import write_connection_file
path, _ = write_connection_file(os.path.join(sys.argv[1], "k.json"), ip="127.0.0.1", key=b"k")
subprocess.Popen([sys.executable, "-m", "kernel_demo", "-f", path], stderr=subprocess.PIPE)
time.sleep(600)
"""],
}


def _kernel_under(launcher: subprocess.Popen[bytes], timeout: float = 30) -> psutil.Process:
    """The kernel_demo process somewhere below ``launcher``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert launcher.poll() is None, "the launcher exited"
        for child in psutil.Process(launcher.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if "kernel_demo" in child.cmdline() and "-f" in child.cmdline():
                    return child
        time.sleep(0.05)
    raise TimeoutError(f"no kernel under the launcher within {timeout} s")


def _gone(process: psutil.Process) -> bool:
    # An orphan that exited is reaped by whoever adopted it; until then it is a zombie.
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _launch(how: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], psutil.Process, BlockingKernelClient, Path]:
    """Start ``how``'s launcher; return it, its kernel, a ready client and the launcher's stderr.

    The ports in a connection file are picked by binding and releasing them; if another process
    takes one before the kernel binds it, the kernel exits as it starts. That kernel is launched
    again (three tries in all), each try in a directory of its own."""
    for attempt in range(1, 4):
        scratch = tmp_path / f"try{attempt}"
        scratch.mkdir()
        stderr = scratch / "stderr.txt"
        env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(scratch))
        with stderr.open("w") as err:
            launcher = subprocess.Popen([*LAUNCHERS[how], str(scratch)], env=env, stdout=subprocess.DEVNULL, stderr=err)
        client = BlockingKernelClient()
        try:
            kernel = _kernel_under(launcher)
            client.load_connection_file(kernel.cmdline()[kernel.cmdline().index("-f") + 1])
            # Ready when kernel_info is answered. (With the heartbeat channel, jupyter_client would
            # call a kernel that takes over a second to start, on a busy machine, dead.)
            client.start_channels(hb=False)
            client.wait_for_ready(timeout=30)
            return launcher, kernel, client, stderr
        except (RuntimeError, psutil.NoSuchProcess):
            client.stop_channels()
            launcher.kill()
            launcher.wait(timeout=10)
            if attempt == 3:
                raise
    raise AssertionError("unreachable")


def _orphaned(launcher: subprocess.Popen[bytes], kernel: psutil.Process, within: float) -> float:
    """Kill the launcher; return how many seconds its kernel ran on (``within`` at most)."""
    launcher.kill()
    launcher.wait(timeout=10)
    killed = time.monotonic()
    while not _gone(kernel) and time.monotonic() - killed < within:
        time.sleep(0.01)
    return time.monotonic() - killed


@contextlib.contextmanager
def _launched(how: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], psutil.Process, BlockingKernelClient, Path]]:
    """``_launch``, then stop the client and kill whatever is left of launcher and kernel."""
    launcher, kernel, client, stderr = _launch(how, tmp_path)
    try:
        yield launcher, kernel, client, stderr
    finally:
        client.stop_channels()
        launcher.kill()
        launcher.wait(timeout=10)
        with contextlib.suppress(psutil.NoSuchProcess):
            kernel.kill()


@pytest.mark.parametrize("how", list(LAUNCHERS))
def test_the_kernel_exits_when_its_launcher_is_killed(how: str, tmp_path: Path) -> None:
    with _launched(how, tmp_path) as (launcher, kernel, client, stderr):
        client.execute("while True: pass")  # the kernel must notice even while a cell computes
        time.sleep(0.5)
        # While its launcher lives, the kernel serves (on control: shell is busy with the cell).
        client.control_channel.send(client.session.msg("kernel_info_request"))
        assert client.get_control_msg(timeout=5)["content"]["status"] == "ok"
        exited_after = _orphaned(launcher, kernel, within=10)
        # Well under the 5 s after which the kernel would end itself with os._exit: it shut down
        # cleanly (stopping the running cell). Pidfds take milliseconds; polling up to 1 s.
        log = stderr.read_text()
        assert exited_after < 4, f"the kernel still ran {exited_after:.1f} s after its launcher was killed:\n{log}"
        assert "Traceback" not in log, log
        assert ("exited; shutting down" in log) == (how != "stderr gone too"), log


def test_a_cell_that_swallows_the_interrupt_keeps_an_orphan_alive_5_s_at_most(tmp_path: Path) -> None:
    with _launched("Popen", tmp_path) as (launcher, kernel, client, stderr):
        client.execute("import time\nwhile True:\n    try:\n        time.sleep(1)\n    except KeyboardInterrupt:\n        pass")
        time.sleep(0.5)
        exited_after = _orphaned(launcher, kernel, within=15)
        log = stderr.read_text()
        assert 4.5 < exited_after < 10, (exited_after, log)
        # It says why, and where each thread was: the main one in the user's cell.
        assert "still running 5 s after shutting down began" in log, log
        assert 'File "<cell 1>", line 4' in log, log


# ------------------------------------------------------------------ kernels started here


def started(spec_dir: str, **options: Any) -> contextlib.AbstractContextManager[Kernel]:
    """Start the demo kernel from its kernelspec with these start_kernel options; shut it down after."""
    return running_kernel("kernel_demo", kernel_dirs=[spec_dir], startup_timeout=30, **options)


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trace") / "trace.jsonl"


@pytest.fixture(scope="module")
def demo(kernel_demo_spec: str, trace_file: Path) -> Iterator[Kernel]:
    with started(kernel_demo_spec, extra_arguments=["--trace-file", str(trace_file)]) as kernel:
        yield kernel


@pytest.fixture(scope="module")
def encrypted(kernel_demo_spec: str) -> Iterator[Kernel]:
    with started(kernel_demo_spec, transport_encryption="required") as kernel:
        yield kernel


def _send(kernel: Kernel, msg_type: str, content: dict[str, Any]) -> str:
    msg = kernel.client.session.msg(msg_type, content)
    kernel.client.shell_channel.send(msg)
    return str(msg["header"]["msg_id"])


def _iopub_for(kernel: Kernel, msg_id: str, timeout: float = 5) -> list[dict[str, Any]]:
    """The IOPub messages whose parent is ``msg_id``, up to its idle status."""
    def mine() -> list[dict[str, Any]]:
        return [m for m in kernel.messages if m["parent_header"].get("msg_id") == msg_id]

    kernel.wait_until(lambda: any(m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
                                  for m in mine()), timeout, "idle")
    return mine()


def _records(trace_file: Path, msg_id: str) -> dict[str, Any]:
    for line in trace_file.read_text().splitlines():
        record = json.loads(line)
        if record["msg_id"] == msg_id:
            return dict(record)
    raise AssertionError(f"no dispatch record for {msg_id}")


# ------------------------------------------------------------------ comms, as the spec says


def test_comm_open_for_a_missing_target_is_closed_at_once(demo: Kernel, trace_file: Path) -> None:
    msg_id = _send(demo, "comm_open", {"comm_id": "c-1", "target_name": "nobody.here", "data": {}})
    messages = _iopub_for(demo, msg_id)
    assert [m["msg_type"] for m in messages] == ["status", "comm_close", "status"]
    assert messages[1]["content"] == {"comm_id": "c-1", "data": {}}
    record = _records(trace_file, msg_id)
    assert record["handler"] == "comm_open" and record["rejected"] is None
    assert record["sent"] == ["status", "comm_close", "status"]


@pytest.mark.parametrize("msg_type", ["comm_msg", "comm_close"])
def test_messages_for_an_unknown_comm_are_ignored(demo: Kernel, trace_file: Path, msg_type: str) -> None:
    msg_id = _send(demo, msg_type, {"comm_id": "never-opened", "data": {"x": 1}})
    assert [m["msg_type"] for m in _iopub_for(demo, msg_id)] == ["status", "status"]
    demo.pump(0.2)
    assert msg_id not in demo.replies  # not a request: no reply
    record = _records(trace_file, msg_id)
    assert record["handler"] == msg_type and record["rejected"] is None
    assert record["sent"] == ["status", "status"]


def test_comm_info_lists_no_comms(demo: Kernel) -> None:
    _send(demo, "comm_open", {"comm_id": "c-2", "target_name": "nobody.here", "data": {}})
    assert demo.request("comm_info_request")["content"] == {"status": "ok", "comms": {}}


# ------------------------------------------------------------------ transport encryption


def _raw(kernel: Kernel, kind: int, port: str, server_key: bytes | None = None) -> zmq.Socket[bytes]:
    """A socket on one of the kernel's ports: plain, or a Curve client expecting ``server_key``."""
    info = kernel.manager.get_connection_info()
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(kind)
    sock.linger = 0
    if server_key is not None:
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.curve_serverkey = server_key
    sock.connect(f"tcp://{info['ip']}:{info[port]}")
    return sock


def _answers(sock: zmq.Socket[bytes], frames: list[bytes], wait_ms: int = 1000) -> bool:
    return _offer(sock, frames) and bool(sock.poll(wait_ms))


def _offer(sock: zmq.Socket[bytes], frames: list[bytes]) -> bool:
    """Queue ``frames`` without waiting; False if the socket has no connection to queue them on.

    A connection whose security handshake the kernel refused is dropped and tried again every
    0.1 s; a plain send would wait, for ever, for one that is never accepted."""
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True


def _kernel_info_frames(kernel: Kernel) -> list[bytes]:
    # Signed with the right key: what is missing is only the Curve key.
    session = Session(key=kernel.manager.session.key)
    return list(session.serialize(session.msg("kernel_info_request", {})))


def test_without_keys_the_kernel_is_not_encrypted(demo: Kernel) -> None:
    assert "curve_publickey" not in demo.manager.get_connection_info()
    sock = _raw(demo, zmq.DEALER, "shell_port")
    try:
        assert _answers(sock, _kernel_info_frames(demo), 5000), "a plain client got no reply"
    finally:
        sock.close()


def test_an_encrypted_kernel_serves_its_client(encrypted: Kernel) -> None:
    info = encrypted.manager.get_connection_info()
    assert info["curve_publickey"] and info["curve_secretkey"]
    cell = encrypted.execute("print('over curve'); 6 * 7", timeout=10)
    assert cell.stdout == "over curve\n" and cell.results[-1]["text/plain"] == "42"
    # Heartbeat: a Curve client with the server key gets its ping back (as jupyter_client's does).
    hb = _raw(encrypted, zmq.REQ, "hb_port", server_key=info["curve_publickey"].encode())
    try:
        assert _answers(hb, [b"ping"], 5000) and hb.recv() == b"ping"
    finally:
        hb.close()
    # jupyter_client's own heartbeat channel pings once a second; give it a few on a busy machine.
    beating_by = time.monotonic() + 10
    while not encrypted.client.hb_channel.is_beating() and time.monotonic() < beating_by:
        time.sleep(0.1)
    assert encrypted.client.hb_channel.is_beating()
    # Interrupt over the (encrypted) control channel.
    cell = encrypted.execute("while True: pass", wait=False)
    time.sleep(0.3)
    assert encrypted.request("interrupt_request", channel="control", timeout=5)["content"]["status"] == "ok"
    encrypted.wait(cell, timeout=10)
    assert cell.error is not None and cell.error["ename"] == "KeyboardInterrupt"


def test_a_client_without_the_server_key_gets_nothing(encrypted: Kernel) -> None:
    wrong_key = zmq.curve_keypair()[0]
    sockets = {
        "plain shell": (_raw(encrypted, zmq.DEALER, "shell_port"), _kernel_info_frames(encrypted)),
        "plain control": (_raw(encrypted, zmq.DEALER, "control_port"), _kernel_info_frames(encrypted)),
        "shell, wrong server key": (_raw(encrypted, zmq.DEALER, "shell_port", server_key=wrong_key),
                                    _kernel_info_frames(encrypted)),
        "plain heartbeat": (_raw(encrypted, zmq.REQ, "hb_port"), [b"ping"]),
    }
    iopub = _raw(encrypted, zmq.SUB, "iopub_port")
    iopub.subscribe(b"")
    try:
        for sock, frames in sockets.values():
            _offer(sock, frames)  # refused outright or queued and never answered: nothing either way
        # Meanwhile the right client runs a cell, whose output a plain subscriber must not see.
        cell = encrypted.execute("print('secret')", timeout=10)
        assert cell.stdout == "secret\n"
        time.sleep(0.5)  # generous for an answer on localhost, which took about a millisecond
        answered = [name for name, (sock, _) in sockets.items() if sock.poll(0)]
        assert not answered, f"answered without the server key: {answered}"
        assert not iopub.poll(0), "a plain subscriber received IOPub messages"
    finally:
        iopub.close()
        for sock, _ in sockets.values():
            sock.close()
    assert encrypted.execute("'still serving'", timeout=10).results[-1]["text/plain"] == "'still serving'"
