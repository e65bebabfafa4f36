"""%%background --dask, %%timeout --mode dask and %dask against real Dask processes."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import psutil
import pytest

from concur_magics.frontend import Kernel, running_kernel
from tests.conftest import refused, run, value, worker_pids

# Generous bounds for a loaded 2-core machine (precision is in benchmarks/).
WITHIN = 20.0


@pytest.fixture(scope="module")
def dask_kernel(dask_processes: dict[str, object]) -> Iterator[Kernel]:
    """A kernel pointed at the scheduler by CONCUR_DASK_SCHEDULER."""
    env = {"CONCUR_DASK_SCHEDULER": str(dask_processes["address"]), "JUPYTER_PLATFORM_DIRS": "1"}
    with running_kernel(env=env) as kernel:
        assert run(kernel, "%load_ext concur_magics").status == "ok"
        yield kernel


def test_dask_shows_the_existing_cluster(dask_kernel: Kernel, dask_processes: dict[str, object]) -> None:
    cell = run(dask_kernel, "%dask")
    assert cell.status == "ok", cell.text
    text = cell.results[-1]["text/plain"]
    assert f"Dask scheduler {dask_processes['address']} (existing cluster)" in text
    assert "workers: 1, threads: 2" in text


def test_inputs_go_out_results_and_names_come_back(dask_kernel: Kernel, dask_processes: dict[str, object]) -> None:
    run(dask_kernel, "import os\nbase = 20\nkernel_pid = os.getpid()")
    cell = run(
        dask_kernel,
        "%%background --dask -o remote\nimport os\ndoubled = base * 2\nworker_pid = os.getpid()\ndoubled + 2",
    )
    run(dask_kernel, "%jobs wait remote --timeout 60")
    assert value(dask_kernel, "remote.status, remote.mode, remote.result()") == "('done', 'dask', 42)"
    assert value(dask_kernel, "doubled") == "40"
    assert int(value(dask_kernel, "worker_pid")) in worker_pids(dask_processes["nanny"])
    dask_kernel.wait_until(lambda: any(r.get("text/plain") == "42" for r in cell.results), 10, "the value")


def test_remote_output_and_traceback_land_in_their_own_cell(dask_kernel: Kernel) -> None:
    cell = run(
        dask_kernel,
        "%%background --dask -o chatty\nimport time, distributed\nprint('from the worker')\n"
        "time.sleep(1)\ndistributed.print('via distributed.print')\ndef fail():\n    raise KeyError('remote boom')\nfail()",
    )
    other = run(dask_kernel, "import time\ntime.sleep(2)\nprint('main cell')")
    run(dask_kernel, "%jobs wait chatty --timeout 60")
    dask_kernel.wait_until(lambda: cell.error is not None, WITHIN, "the remote traceback")
    assert cell.stdout == "from the worker\nvia distributed.print\n"
    assert other.stdout == "main cell\n"
    assert cell.error is not None and cell.error["ename"] == "KeyError"
    text = "\n".join(cell.error["traceback"])
    assert "----> 8 fail()" in text and "----> 7     raise KeyError('remote boom')" in text
    assert value(dask_kernel, "chatty.status") == "'error'"


@pytest.mark.parametrize("code", ["import sys\nsys.exit(3)", "raise KeyboardInterrupt"])
def test_an_exit_on_a_worker_ends_the_job_not_the_worker(dask_kernel: Kernel, code: str) -> None:
    cell = run(dask_kernel, f"%%background --dask -o exiting\n{code}")
    assert cell.status == "ok", cell.text
    dask_kernel.wait_until(lambda: value(dask_kernel, "exiting.done()") == "True", WITHIN, "the job to end")
    assert value(dask_kernel, "exiting.status") == "'error'"
    name = "SystemExit" if "exit" in code else "KeyboardInterrupt"
    dask_kernel.wait_until(lambda: name in cell.text, WITHIN, "the exit in the job's cell")
    after = run(dask_kernel, "%%background --dask -o fine\n6 * 7")
    dask_kernel.wait_until(lambda: value(dask_kernel, "fine.done()") == "True", WITHIN, "the next job")
    assert value(dask_kernel, "fine.result()") == "42", after.text


def test_jobs_chain_on_the_cluster(dask_kernel: Kernel) -> None:
    run(dask_kernel, "%%background --dask -o first\nimport time\ntime.sleep(0.5)\n'A'")
    run(dask_kernel, "%%background --dask -o second\npart = first\npart + 'B'")
    run(dask_kernel, "%jobs wait second --timeout 60")
    assert value(dask_kernel, "second.result(), part") == "('AB', 'A')"


def test_dask_timeout_stops_a_running_loop_and_the_cluster_goes_on(
    dask_kernel: Kernel, dask_processes: dict[str, object]
) -> None:
    before = worker_pids(dask_processes["nanny"])
    start = time.monotonic()
    cell = run(dask_kernel, "%%timeout 1 --mode dask\nimport os\nprint('spinning in', os.getpid(), flush=True)\nwhile True:\n    pass")
    assert time.monotonic() - start < WITHIN
    assert cell.error is not None and cell.error["ename"] == "CellTimeout", cell.text
    assert "(mode: dask); stopped: the Dask task was cancelled and the worker process" in cell.error["evalue"]
    spinner = int(cell.stdout.split()[-1])
    assert spinner in before
    # SIGKILL was sent before the cell failed; on a busy machine the process takes a moment to die.
    gone_by = time.monotonic() + 5
    while psutil.pid_exists(spinner) and time.monotonic() < gone_by:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(spinner).status() == psutil.STATUS_ZOMBIE:
                break
        time.sleep(0.01)
    assert not psutil.pid_exists(spinner) or psutil.Process(spinner).status() == psutil.STATUS_ZOMBIE
    cell = run(dask_kernel, "%%timeout 60 --mode dask\nimport os\nafter = os.getpid()\n'next job ran'")
    assert cell.results[-1]["text/plain"] == "'next job ran'"
    assert int(value(dask_kernel, "after")) != spinner


def test_a_background_dask_job_is_cancelled_for_real(dask_kernel: Kernel, dask_processes: dict[str, object]) -> None:
    run(dask_kernel, "%%background --dask -o spinning\nimport os\nwhile True:\n    pass")
    time.sleep(1.5)
    run(dask_kernel, "%jobs cancel spinning")
    run(dask_kernel, "%jobs wait spinning --timeout 30")
    assert value(dask_kernel, "spinning.status") == "'cancelled'"
    cell = run(dask_kernel, "%%timeout 60 --mode dask\n'still serving'")
    assert cell.results[-1]["text/plain"] == "'still serving'"


def test_an_input_that_cannot_be_sent_is_named(dask_kernel: Kernel) -> None:
    run(dask_kernel, "import threading\nlock = threading.Lock()")
    cell = run(dask_kernel, "%%timeout 30 --mode dask\nlock")
    assert cell.error is not None and cell.error["ename"] == "TypeError"
    assert "these inputs can't be serialised: lock" in cell.error["evalue"]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("%%background --dask --mode thread\nran = True", "--dask and --mode thread contradict each other"),
        ("%%background --dusk\nran = True", "unrecognized arguments: --dusk"),
        ("%dask frobnicate", "invalid choice: 'frobnicate'"),
        ("%dask connect", "%dask connect needs a scheduler address"),
        ("%dask info tcp://x:1", "%dask info takes no address"),
    ],
)
def test_bad_input_is_refused(dask_kernel: Kernel, code: str, message: str) -> None:
    refused(dask_kernel, code, message, "%background [" if code.startswith("%%") else "%dask [")


def test_local_cluster_starts_on_first_use_and_is_gone_after_unload() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CONCUR_DASK_SCHEDULER"}
    with running_kernel(env={**env, "CONCUR_DASK_SCHEDULER": ""}) as kernel:
        run(kernel, "%load_ext concur_magics")
        assert kernel.children() == []
        cell = run(kernel, "%%timeout 120 --mode dask\nimport os\nos.getpid()", timeout=180)
        assert cell.status == "ok", cell.text
        workers = kernel.children()
        assert int(cell.results[-1]["text/plain"]) in {p.pid for p in workers}
        info = run(kernel, "%dask").results[-1]["text/plain"]
        assert "(local cluster started by concur_magics)" in info and "127.0.0.1" in info
        # A worker's own log records go to the kernel's log, not to the stderr the worker process
        # inherited from the kernel (which ipykernel would show in whichever cell runs).
        run(kernel, "%%timeout 60 --mode dask\nimport logging\n"
                    "logging.getLogger('distributed.worker').critical('a worker record, 7f3a')", timeout=90)
        run(kernel, "import time\ntime.sleep(1.5)")
        kernel.pump(0.5)
        assert not [c.text for c in kernel.cells.values() if "7f3a" in c.text]
        run(kernel, "%unload_ext concur_magics", timeout=60)
        gone, alive = psutil.wait_procs(workers, timeout=WITHIN)
        # Python's multiprocessing resource tracker, shared by everything in the kernel that uses
        # spawned processes, stays until the kernel exits; every worker process is gone.
        assert [p for p in alive if not _is_resource_tracker(p)] == []
        assert [p for p in kernel.children() if not _is_resource_tracker(p)] == []


def _is_resource_tracker(process: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" in " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False


def test_an_unreachable_scheduler_fails_quickly() -> None:
    with running_kernel(env={"CONCUR_DASK_SCHEDULER": "tcp://127.0.0.1:9"}) as kernel:
        run(kernel, "%load_ext concur_magics\n%config ConcurMagics.dask_connect_timeout = 2")
        start = time.monotonic()
        cell = run(kernel, "%%background --dask\n1")
        assert time.monotonic() - start < WITHIN
        assert cell.reply["ename"] == "UsageError"
        assert "could not reach the Dask scheduler at tcp://127.0.0.1:9 within 2 s" in cell.stderr
        assert value(kernel, "'responsive'") == "'responsive'"


def test_a_worker_that_dies_mid_job_fails_the_job_with_a_reason(dask_kernel: Kernel) -> None:
    # Dask re-runs a task whose worker died (distributed.scheduler.allowed-failures, 3 by default);
    # a cell that kills every worker it runs on ends as an error that says so.
    start = time.monotonic()
    cell = run(dask_kernel, "%%background --dask -o doomed\nimport os\nos._exit(1)")
    run(dask_kernel, "%jobs wait doomed --timeout 120", timeout=150)
    assert value(dask_kernel, "doomed.status") == "'error'"
    dask_kernel.wait_until(lambda: cell.error is not None, WITHIN, "the error")
    assert cell.error is not None and "the Dask worker running this job died" in cell.error["evalue"]
    assert time.monotonic() - start < 150
    assert run(dask_kernel, "%%timeout 60 --mode dask\n'alive'").results[-1]["text/plain"] == "'alive'"
