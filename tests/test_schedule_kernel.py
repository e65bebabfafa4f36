"""%clock and %%every in a real ipykernel, timed by the messages the client receives."""

from __future__ import annotations

import statistics
import time
from datetime import datetime
from typing import Any

import psutil
import pytest

from concur_magics.frontend import Kernel
from tests.conftest import refused, run, value


def clock_updates(kernel: Kernel, display_id: str, since: float = 0.0) -> list[dict[str, Any]]:
    return [
        m
        for m in kernel.messages
        if m["msg_type"] == "update_display_data"
        and m["content"].get("transient", {}).get("display_id") == display_id
        and m["received"] >= since
        and "(stopped)" not in m["content"]["data"]["text/plain"]
    ]


def sent_at(message: dict[str, Any]) -> float:
    date: datetime = message["header"]["date"]
    return date.timestamp()


def start_clock(kernel: Kernel, line: str = "") -> str:
    run(kernel, f"clock = %clock {line}")
    return value(kernel, "clock.display_id").strip("'")


def test_ticks_are_aligned_to_the_wall_clock_and_do_not_bunch(kernel: Kernel) -> None:
    display_id = start_clock(kernel)
    try:
        kernel.pump(4.2)
        updates = clock_updates(kernel, display_id)
        assert len(updates) >= 3
        sent = [sent_at(m) for m in updates]
        # Generous bounds for a loaded machine: the median tick is sent within 0.1 s after the
        # second it shows (typically ~2 ms; see benchmarks/), and ticks are about a second apart.
        assert statistics.median(t - int(t) for t in sent) < 0.1
        gaps = [b - a for a, b in zip(sent, sent[1:])]
        assert all(0.5 < gap < 1.5 for gap in gaps), gaps
        shown = [m["content"]["data"]["text/plain"] for m in updates]
        assert shown == [time.strftime("%d-%m-%Y %H:%M:%S", time.localtime(round(t))) for t in sent]
    finally:
        run(kernel, "clock.stop()")


def test_ticks_keep_coming_while_a_cell_blocks(kernel: Kernel) -> None:
    display_id = start_clock(kernel, "--interval 0.5")
    try:
        for blocking in ["import time\ntime.sleep(4)", "t0 = time.time()\nwhile time.time() - t0 < 3:\n    pass"]:
            start = time.time()
            cell = kernel.execute(blocking, wait=False)
            # Read while the cell runs: updates must arrive before the cell's reply.
            kernel.wait(cell, timeout=30)
            during = [m for m in clock_updates(kernel, display_id, since=start) if sent_at(m) < time.time()]
            replied = max(m["received"] for m in kernel.messages if m["parent_header"].get("msg_id") == cell.msg_id)
            ticks_while_busy = [m for m in during if m["received"] < replied - 0.3]
            assert len(ticks_while_busy) >= 4, (blocking, len(ticks_while_busy))
    finally:
        run(kernel, "%clock --stop")


def test_stop_stops_the_updates(kernel: Kernel) -> None:
    display_id = start_clock(kernel, "--interval 0.2")
    kernel.pump(0.7)
    assert clock_updates(kernel, display_id)
    cell = run(kernel, f"%clock --stop {value(kernel, 'clock.id')}")
    assert cell.status == "ok", cell.text
    stopped = time.time()
    kernel.pump(1.0)
    late = [m for m in clock_updates(kernel, display_id) if sent_at(m) > stopped + 0.05]
    assert late == []
    assert value(kernel, "clock.running") == "False"
    final = [m for m in kernel.messages if m["msg_type"] == "update_display_data"
             and m["content"]["transient"]["display_id"] == display_id][-1]
    assert "(stopped)" in final["content"]["data"]["text/plain"]


def test_an_idle_clock_costs_next_to_no_cpu(kernel: Kernel) -> None:
    start_clock(kernel, "--interval 0.1")
    try:
        process = psutil.Process(kernel.pid)
        before = sum(process.cpu_times()[:2])
        kernel.pump(3)
        used = sum(process.cpu_times()[:2]) - before
        # 30 ticks; generous: a busy-waiting clock would burn ~3 s of CPU here.
        assert used < 0.6, used
    finally:
        run(kernel, "clock.stop()")


def test_every_runs_exactly_n_times(kernel: Kernel) -> None:
    cell = run(kernel, "%%every 1s --times 3 -n thrice -o thrice\nruns = globals().get('runs', 0) + 1\nprint('run', runs)")
    assert cell.status == "ok"
    run(kernel, "%jobs wait thrice --timeout 20")
    kernel.pump(1.5)  # a fourth run would come a second after the third
    assert value(kernel, "runs") == "3"
    assert value(kernel, "thrice.status") == "'done'"
    assert cell.stdout == "run 1\nrun 2\nrun 3\n"


def test_every_runs_between_cells_and_never_during_one(kernel: Kernel) -> None:
    run(kernel, "stamps = []\nimport asyncio, time")
    run(kernel, "%%every 100ms -o stamper\nstamps.append(time.time())")
    # An awaiting cell yields the loop for a second; no run may slip into it.
    cell = run(kernel, "start = time.time()\nawait asyncio.sleep(1)\nend = time.time()")
    assert cell.status == "ok"
    kernel.pump(0.5)
    run(kernel, "%jobs cancel stamper")
    assert value(kernel, "[s for s in stamps if start < s < end]") == "[]"
    assert int(value(kernel, "len([s for s in stamps if s > end])")) >= 1
    assert int(value(kernel, "stamper.skipped")) >= 1


def test_an_exception_stops_the_schedule_with_its_traceback(kernel: Kernel) -> None:
    cell = run(kernel, "%%every 100ms -o failing\ntick = globals().get('tick', 0) + 1\nif tick == 2:\n    raise ValueError('second run')")
    kernel.wait_until(lambda: cell.error is not None, 10, "the traceback")
    assert cell.error is not None and cell.error["evalue"] == "second run"
    assert "----> 4     raise ValueError('second run')" in "\n".join(cell.error["traceback"])
    kernel.pump(0.5)
    assert value(kernel, "tick, failing.status") == "(2, 'error')"


def test_every_is_cancelled_from_jobs(kernel: Kernel) -> None:
    run(kernel, "%%every 100ms -n ticking\npass")
    kernel.pump(0.3)
    cell = run(kernel, "%jobs cancel ticking")
    assert "cancelled" in cell.text
    assert value(kernel, "__import__('concur_magics').runtime.Runtime.current().jobs.find('ticking').status") == "'cancelled'"


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("%clock --interval 0", "must be more than 0"),
        ("%clock --interval -1", "durations must be positive, got '-1'"),
        ("%clock --frobnicate", "unrecognized arguments: --frobnicate"),
        ("%clock --stop banana", "--stop takes a clock id"),
        ("%clock --stop 999", "no running clock 999"),
        ("%%every\nran = True", "the following arguments are required: interval"),
        ("%%every banana\nran = True", "expected a positive number of seconds"),
        ("%%every -5s\nran = True", "durations must be positive, got '-5s'"),
        ("%%every 1s --times 0\nran = True", "--times must be at least 1"),
        ("%%every 1s --frobnicate\nran = True", "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_scheduled(kernel: Kernel, code: str, message: str) -> None:
    before = value(kernel, "len(__import__('concur_magics').runtime.Runtime.current().clocks), len(list(__import__('concur_magics').runtime.Runtime.current().jobs))")
    refused(kernel, code, message, "%every [" if code.startswith("%%") else "%clock [")
    kernel.pump(0.3)
    assert value(kernel, "ran") == "False"
    assert value(kernel, "len(__import__('concur_magics').runtime.Runtime.current().clocks), len(list(__import__('concur_magics').runtime.Runtime.current().jobs))") == before


def test_unload_stops_clocks_and_schedules(fresh_kernel: Kernel) -> None:
    display_id = start_clock(fresh_kernel, "--interval 0.2")
    run(fresh_kernel, "%%every 100ms -o sched\npass")
    fresh_kernel.pump(0.5)
    run(fresh_kernel, "%unload_ext concur_magics")
    stopped = time.time()
    fresh_kernel.pump(1.0)
    assert [m for m in clock_updates(fresh_kernel, display_id) if sent_at(m) > stopped + 0.05] == []
    assert value(fresh_kernel, "clock.running, sched.status") == "(False, 'cancelled')"
