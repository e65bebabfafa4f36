"""background() and Job from plain Python, without IPython."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from concur_magics import CellTimeout, Job, background
from concur_magics.runtime import Runtime

pytestmark = pytest.mark.usefixtures("no_leaks")

WITHIN = 10.0  # generous: proves the job ended, not how fast


def test_a_callable_runs_in_a_thread_and_returns_its_value(capsys: pytest.CaptureFixture[str]) -> None:
    def work() -> str:
        print("working in", threading.current_thread().name)
        return "result"

    job = background(work, name="api-callable")
    assert job.result(timeout=WITHIN) == "result"
    assert (job.status, job.mode, job.name) == ("done", "thread", "api-callable")
    assert capsys.readouterr().out == f"working in concur-job-{job.id}\n"


def test_cell_source_runs_in_the_given_namespace() -> None:
    namespace: dict[str, object] = {"base": 40}
    job = background("total = base + 2\ntotal * 10", namespace=namespace)
    assert job.result(timeout=WITHIN) == 420
    assert namespace["total"] == 42


def test_a_failure_keeps_its_traceback() -> None:
    def inner() -> None:
        raise LookupError("deep down")

    def outer() -> None:
        inner()

    job = background(outer)
    error = job.exception(timeout=WITHIN)
    assert isinstance(error, LookupError) and job.status == "error"
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert frames[-2:] == ["outer", "inner"]
    with pytest.raises(LookupError, match="deep down"):
        job.result()


def test_cancel_a_running_thread_job_at_its_next_bytecode() -> None:
    counter = [0]

    def spin() -> None:
        while True:
            try:
                counter[0] += 1
            except Exception:  # noqa: BLE001 - careless code does not stop a cancel
                pass

    job = background(spin)
    deadline = time.monotonic() + WITHIN
    while counter[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.status == "running"
    assert job.cancel() is True
    with pytest.raises(concurrent.futures.CancelledError):
        job.result(timeout=WITHIN)
    assert job.status == "cancelled" and job.cancelled()
    assert job.cancel() is False


def test_thread_job_timeout() -> None:
    def spin() -> None:
        while True:
            pass

    job = background(spin, timeout=0.3)
    with pytest.raises(CellTimeout, match="time limit of 0.3 s"):
        job.result(timeout=WITHIN)
    assert job.status == "timeout"


def test_result_timeout_and_done_callbacks() -> None:
    release = threading.Event()
    ended: list[Job] = []
    job = background(lambda: release.wait(WITHIN) and "released")
    job.add_done_callback(ended.append)
    with pytest.raises(concurrent.futures.TimeoutError):
        job.result(timeout=0.05)
    release.set()
    assert job.result(timeout=WITHIN) == "released"
    assert ended == [job]


def test_loop_jobs_run_on_the_running_loop_and_can_be_awaited() -> None:
    async def main() -> tuple[list[int], int]:
        threads = threading.active_count()
        jobs = [background(asyncio.sleep(0.2, i)) for i in range(200)]
        assert {job.mode for job in jobs} == {"loop"}
        values = [await job for job in jobs]
        return values, threading.active_count() - threads

    values, extra_threads = asyncio.run(main())
    assert values == list(range(200)) and extra_threads == 0


def test_cancel_a_loop_job_at_its_await() -> None:
    async def main() -> Job:
        job = background(asyncio.sleep(60), name="api-sleeper")
        await asyncio.sleep(0.1)
        assert job.status == "running"
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        return job

    assert asyncio.run(main()).status == "cancelled"


def test_loop_mode_needs_a_loop() -> None:
    with pytest.raises(RuntimeError, match="loop mode needs a running event loop"):
        background(lambda: None, mode="loop")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode must be one of thread, loop, dask, got 'fork'"):
        background(lambda: None, mode="fork")
    with pytest.raises(ValueError, match="time limit must be more than 0"):
        background(lambda: None, timeout=0)
    with pytest.raises(TypeError, match="takes cell source, a callable or an awaitable, not int"):
        background(42)  # type: ignore[arg-type]


def test_table_finds_by_id_and_name_and_clears_finished_jobs() -> None:
    job = background(lambda: 1, name="api-findable")
    job.result(timeout=WITHIN)
    assert Runtime.current().jobs.find(str(job.id)) is job and Runtime.current().jobs.find(f"#{job.id}") is job
    assert Runtime.current().jobs.find("api-findable") is job
    with pytest.raises(KeyError, match="no job with id or name 'nobody'"):
        Runtime.current().jobs.find("nobody")
    assert Runtime.current().jobs.clear() >= 1
    with pytest.raises(KeyError, match="api-findable"):
        Runtime.current().jobs.find("api-findable")


def test_reprs() -> None:
    job = background("import time\ntime.sleep(0.01)\n'x'", name="api-repr", namespace={})
    job.result(timeout=WITHIN)
    assert repr(job).startswith(f"<Job #{job.id} api-repr [thread] done ")
    assert "time.sleep(0.01)" in repr(job) and "<b>Job #" in job._repr_html_()  # imports are skipped
    view = Runtime.current().jobs.view([job])
    assert repr(view).splitlines()[1].split()[:4] == [str(job.id), "api-repr", "thread", "done"]


def test_the_newest_job_of_a_name_is_found() -> None:
    old = background(lambda: "old", name="api-twice")
    new = background(lambda: "new", name="api-twice")
    assert Runtime.current().jobs.find("api-twice") is new
    assert old.result(timeout=WITHIN) == "old" and new.result(timeout=WITHIN) == "new"
