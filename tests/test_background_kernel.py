"""%%background and %jobs in a real ipykernel."""

from __future__ import annotations

import time

import pytest

from concur_magics.frontend import Cell, Kernel
from tests.conftest import refused, run, value

# Generous bounds for a loaded 2-core machine; latency is measured in benchmarks/.
PROMPT = 2.0


def settle(kernel: Kernel, cell: Cell, text: str, timeout: float = 30) -> None:
    kernel.wait_until(lambda: text in cell.text, timeout, f"{text!r} in the job's cell")


def thread_count(kernel: Kernel) -> int:
    # Idle job threads and the thread that starts them wait a few seconds for the next job (see
    # concur_magics.pool); they are not counted.
    return int(value(kernel, "import threading\n"
                             "sum(t.name not in ('concur-job-idle', 'concur-job-starter') for t in threading.enumerate())"))


def test_thread_job_returns_at_once_and_its_output_stays_in_its_cell(kernel: Kernel) -> None:
    start = time.monotonic()
    job_cell = run(
        kernel,
        "%%background -n ticker -o ticker\nimport time\nfor i in range(5):\n"
        "    print('tick', i, flush=True)\n    time.sleep(0.3)\nanswer = 6 * 7\nanswer",
    )
    assert time.monotonic() - start < PROMPT, "the cell should return while the job runs"
    assert job_cell.status == "ok"
    other = run(kernel, "import time\nfor i in range(3):\n    print('main', i)\n    time.sleep(0.5)")
    settle(kernel, job_cell, "42")
    assert other.stdout == "main 0\nmain 1\nmain 2\n"
    assert job_cell.stdout == "".join(f"tick {i}\n" for i in range(5))
    # Some ticks were printed while the other cell was running, and still came here.
    assert value(kernel, "answer") == "42"
    assert value(kernel, "ticker.status") == "'done'"
    assert value(kernel, "ticker.result()") == "42"
    # The status line shown at the start was updated in place when the job ended.
    status_lines = [r["text/plain"] for r in job_cell.results if "Job #" in r["text/plain"]]
    assert len(status_lines) == 1 and " done " in status_lines[0]


def test_loop_job_with_100000_sleeping_tasks_uses_no_thread(kernel: Kernel) -> None:
    before = thread_count(kernel)
    cell = run(
        kernel,
        "%%background -o many\nimport asyncio, threading\nseen = threading.active_count()\n"
        "await asyncio.gather(*(asyncio.sleep(1) for _ in range(100_000)))\n"
        "max(0, threading.active_count() - seen)",
    )
    run(kernel, "%jobs wait many", timeout=120)
    assert value(kernel, "many.mode, many.status") == "('loop', 'done')"
    # No thread was started while 100,000 tasks slept (idle job threads may leave meanwhile).
    assert value(kernel, "many.result()") == "0"
    assert thread_count(kernel) == before
    # One second of sleeping, however many sleepers (generous: creating the tasks takes time too).
    assert float(value(kernel, "many.elapsed")) < 30
    settle(kernel, cell, " done ")
    assert cell.results[-1]["text/plain"] == "0"


def test_a_thousand_loop_jobs_at_once(kernel: Kernel) -> None:
    run(
        kernel,
        "%%background -o fleet\nimport asyncio, concur_magics, threading\nseen = threading.active_count()\n"
        "jobs = [concur_magics.background(asyncio.sleep(1, i), mode='loop', show=False) for i in range(1000)]\n"
        "values = [await job for job in jobs]\n(sum(values), max(0, threading.active_count() - seen))",
    )
    run(kernel, "%jobs wait fleet", timeout=120)
    assert value(kernel, "fleet.result()") == "(499500, 0)"
    assert float(value(kernel, "fleet.elapsed")) < 30
    run(kernel, "%jobs clear")


def test_a_failing_job_shows_its_traceback_in_its_own_cell(kernel: Kernel) -> None:
    job_cell = run(kernel, "%%background -o broken\nimport time\ntime.sleep(0.5)\nx = 1\nx / 0")
    other = run(kernel, "time.sleep(1.5)\n'other'")
    settle(kernel, job_cell, "ZeroDivisionError")
    assert job_cell.error is not None and job_cell.error["ename"] == "ZeroDivisionError"
    text = "\n".join(job_cell.error["traceback"])
    assert "----> 5 x / 0" in text
    assert other.error is None and "ZeroDivisionError" not in other.text
    assert value(kernel, "broken.status") == "'error'"
    assert value(kernel, "type(broken.exception()).__name__") == "'ZeroDivisionError'"


def test_cancel_stops_a_running_thread_job(kernel: Kernel) -> None:
    run(kernel, "%%background -o spinner\nspins = 0\nwhile True:\n    spins += 1")
    time.sleep(0.5)
    assert value(kernel, "spinner.status") == "'running'"
    assert value(kernel, "spinner.cancel()") == "True"
    run(kernel, "%jobs wait spinner --timeout 10")
    assert value(kernel, "spinner.status") == "'cancelled'"
    assert value(kernel, "spins > 0") == "True"
    cell = run(kernel, "spinner.result()")
    assert cell.error is not None and cell.error["ename"] == "CancelledError"


def test_cancel_stops_a_running_loop_job_by_name(kernel: Kernel) -> None:
    run(kernel, "%%background -n sleeper -o sleeper\nimport asyncio\nawait asyncio.sleep(60)")
    time.sleep(0.3)
    assert value(kernel, "sleeper.status") == "'running'"
    cell = run(kernel, "%jobs cancel sleeper")
    assert cell.status == "ok"
    run(kernel, "%jobs wait sleeper --timeout 10")
    assert value(kernel, "sleeper.status") == "'cancelled'"


def test_a_job_awaits_another_job(kernel: Kernel) -> None:
    run(kernel, "%%background -o first\nimport time\ntime.sleep(0.5)\n'A'")
    run(kernel, "%%background -o second\npart = await first\npart + 'B'")
    cell = run(kernel, "await second")
    assert cell.results[-1]["text/plain"] == "'AB'"
    assert value(kernel, "first.mode, second.mode") == "('thread', 'loop')"


def test_job_timeouts_stop_thread_and_loop_jobs(kernel: Kernel) -> None:
    run(kernel, "%%background --timeout 0.5 -o spin_t\nwhile True:\n    pass")
    run(kernel, "%%background --timeout 0.5 -o sleep_t\nimport asyncio\nawait asyncio.sleep(60)")
    run(kernel, "%jobs wait spin_t sleep_t --timeout 20")
    assert value(kernel, "spin_t.status, sleep_t.status") == "('timeout', 'timeout')"
    cell = run(kernel, "spin_t.result()")
    assert cell.error is not None and cell.error["ename"] == "CellTimeout"


def test_forced_modes(kernel: Kernel) -> None:
    run(kernel, "%%background --mode loop -o on_loop\nimport threading\nthreading.current_thread().name")
    run(kernel, "%%background --mode thread -o in_thread\nimport asyncio\nawait asyncio.sleep(0)\n"
        "threading.current_thread().name")
    run(kernel, "%jobs wait on_loop in_thread --timeout 20")
    assert value(kernel, "on_loop.result()") == "'MainThread'"
    assert value(kernel, "in_thread.result()").startswith("'concur-job-")


def test_result_on_the_loop_that_runs_the_job_is_refused(kernel: Kernel) -> None:
    run(kernel, "%%background -o looping\nimport asyncio\nawait asyncio.sleep(5)")
    cell = run(kernel, "looping.result()")
    assert cell.error is not None and "use `await job`" in cell.error["evalue"]
    run(kernel, "%jobs cancel looping")


def test_jobs_lists_them_as_text_and_html(kernel: Kernel) -> None:
    run(kernel, "%%background -n listed\n'x'")
    run(kernel, "%jobs wait listed")
    cell = run(kernel, "%jobs")
    text = cell.results[-1]["text/plain"]
    assert text.splitlines()[0].split() == ["id", "name", "mode", "status", "elapsed", "cell"]
    assert any(line.split()[1:4] == ["listed", "thread", "done"] for line in text.splitlines()[1:])
    assert "<table>" in cell.results[-1]["text/html"]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("%%background --mode banana\nran = True", "invalid choice: 'banana'"),
        ("%%background --timeout 0\nran = True", "must be more than 0"),
        ("%%background --nope\nran = True", "unrecognized arguments: --nope"),
        ("%%background -o 2x\nran = True", "-o needs a variable name"),
        ("%jobs cancel no-such-job", "no job with id or name 'no-such-job'"),
        ("%jobs cancel", "%jobs cancel needs job ids or names"),
        ("%jobs frobnicate", "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_refused_and_nothing_runs(kernel: Kernel, code: str, message: str) -> None:
    before = value(kernel, "len(list(__import__('concur_magics').runtime.Runtime.current().jobs))")
    refused(kernel, code, message, "%background [" if code.startswith("%%") else "%jobs [")
    time.sleep(0.2)
    assert value(kernel, "ran") == "False"
    assert value(kernel, "len(list(__import__('concur_magics').runtime.Runtime.current().jobs))") == before


def test_unload_cancels_running_jobs_and_leaves_no_thread(fresh_kernel: Kernel) -> None:
    before = thread_count(fresh_kernel)
    run(fresh_kernel, "%%background -o a\nwhile True:\n    pass")
    run(fresh_kernel, "%%background -o b\nimport asyncio\nawait asyncio.sleep(60)")
    time.sleep(0.3)
    assert thread_count(fresh_kernel) == before + 1
    run(fresh_kernel, "%unload_ext concur_magics")
    assert value(fresh_kernel, "a.status, b.status") == "('cancelled', 'cancelled')"
    fresh_kernel.wait_until(lambda: thread_count(fresh_kernel) == before, 10, "the job thread to end")
