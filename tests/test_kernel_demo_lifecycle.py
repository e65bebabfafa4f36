"""The demo kernel and its frontend: it answers comms as the messaging spec says."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

from concur_magics.frontend import Kernel

# ------------------------------------------------------------------ kernels started here


@contextlib.contextmanager
def started(spec_dir: str, *, extra_arguments: list[str] | None = None, **options: Any) -> Iterator[Kernel]:
    """Start the demo kernel from its kernelspec with these start_kernel options; shut it down after."""
    manager = KernelManager(kernel_name="kernel_demo", kernel_spec_manager=KernelSpecManager(kernel_dirs=[spec_dir]))
    manager.start_kernel(extra_arguments=extra_arguments or [], **options)
    kernel = Kernel(manager)
    try:
        kernel.wait_ready(30)
        yield kernel
    finally:
        kernel.shutdown()


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trace") / "trace.jsonl"


@pytest.fixture(scope="module")
def demo(kernel_demo_spec: str, trace_file: Path) -> Iterator[Kernel]:
    with started(kernel_demo_spec, extra_arguments=["--trace-file", str(trace_file)]) as kernel:
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
