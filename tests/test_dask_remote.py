"""--dask cells on a cluster the user already runs: workers with ``distributed`` and nothing of ours,
left as we found them, each result moved once, and every job ending when its connection goes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from concur_magics.frontend import Kernel, running_kernel
from tests.conftest import dask_cluster, run, value

# Generous bounds for a loaded 2-core machine (precision is in benchmarks/).
WITHIN = 20.0
# A job whose connection goes must end "within seconds": the stop waits up to 5 s for the work.
ENDS_WITHIN = 10.0


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bin directory of a virtual environment with only ``distributed`` and its dependencies,
    from the index pip uses: made once per run. Each package whose version distributed compares
    between client, scheduler and workers is the kernel's version (or the cluster would warn), and
    so is tblib, with which distributed pickles a task's exception (other releases can't read it)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in ("distributed", "dask", "msgpack", "cloudpickle", "tornado", "toolz", "tblib"):
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    root = tmp_path_factory.mktemp("bare-venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    bin_dir = root / "bin"
    subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", *pins],
        check=True, timeout=300, capture_output=True,
    )
    return str(bin_dir)


def _bare_env() -> dict[str, str]:
    """An environment in which nothing points a worker at this checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def bare_cluster(bare_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """``dask scheduler`` + ``dask worker`` run from the bare environment, on 127.0.0.1."""
    with dask_cluster(tmp_path_factory.mktemp("bare"), bare_python, env=_bare_env()) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def observer(bare_cluster: dict[str, object]) -> Iterator[Any]:
    """A plain ``distributed.Client`` of someone else on the same cluster."""
    from distributed import Client

    client = Client(str(bare_cluster["address"]), timeout="30s", set_as_default=False)
    try:
        client.wait_for_workers(1, timeout=60)
        yield client
    finally:
        client.close(timeout=30)


def _connected(address: object) -> Iterator[Kernel]:
    with running_kernel(env={"CONCUR_DASK_SCHEDULER": ""}) as kernel:
        assert run(kernel, "%load_ext concur_magics").status == "ok"
        cell = run(kernel, f"%dask connect {address}")
        assert cell.status == "ok", cell.text
        yield kernel


@pytest.fixture(scope="module")
def kernel(bare_cluster: dict[str, object]) -> Iterator[Kernel]:
    """A kernel connected to the bare cluster with ``%dask connect``."""
    yield from _connected(bare_cluster["address"])


def _state(observer: Any) -> dict[str, Any]:
    """What our routing would touch, on each worker (by address): identities and type names."""
    return observer.run(
        lambda: {
            "sys.stdout": (id(sys.stdout), type(sys.stdout).__name__),
            "sys.stderr": (id(sys.stderr), type(sys.stderr).__name__),
            "builtins.print": id(__import__("builtins").print),
            "distributed.print": id(__import__("distributed").print),
            "distributed.worker.print": id(__import__("distributed.worker").worker.print),
        }
    )


def _plugins(observer: Any) -> list[str]:
    """Our worker plugins on the scheduler's list (``Scheduler.worker_plugins``, see the note at the
    end of ``concur_magics.compat``: that module is not on the scheduler)."""
    names = observer.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
    return sorted(name for name in names if name.startswith("concur-output-"))


# --------------------------------------------------------------------------- nothing of ours


def test_remote_imports_only_the_standard_library_and_distributed() -> None:
    import ast

    import concur_magics.remote

    tree = ast.parse(Path(concur_magics.remote.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))
    assert imported - set(sys.stdlib_module_names) == {"distributed"}


def test_the_workers_have_no_concur_magics(observer: Any) -> None:
    import importlib.util

    found = observer.run(lambda: importlib.util.find_spec("concur_magics") is None)
    assert found and all(found.values()), found


def test_a_cell_runs_on_a_bare_worker(kernel: Kernel) -> None:
    run(kernel, "base = 20\ndef helper(n):\n    return n + 1")
    cell = run(kernel, "%%background --dask -o job\nimport os, distributed\nprint('on the worker', flush=True)\n"
                       "distributed.print('via distributed.print')\n"
                       "doubled = helper(base) * 2\nworker_pid = os.getpid()\ndoubled")
    run(kernel, "%jobs wait job --timeout 60")
    assert value(kernel, "job.status, job.result(), doubled") == "('done', 42, 42)"
    kernel.wait_until(lambda: any(r.get("text/plain") == "42" for r in cell.results), WITHIN, "the value")
    assert cell.stdout == "on the worker\nvia distributed.print\n"
    assert int(value(kernel, "worker_pid")) != int(value(kernel, "__import__('os').getpid()"))
    cell = run(kernel, "%%timeout 60 --mode dask\nimport asyncio\nawait asyncio.sleep(0.1)\n'awaited'")
    assert cell.results[-1]["text/plain"] == "'awaited'", cell.text


def test_a_failure_shows_the_users_frames(kernel: Kernel) -> None:
    cell = run(kernel, "%%timeout 60 --mode dask\nx = 1\ndef fail():\n    raise KeyError('remote boom')\nfail()")
    assert cell.error is not None and cell.error["ename"] == "KeyError", cell.text
    text = "\n".join(cell.error["traceback"])
    assert "----> 5 fail()" in text and "----> 4     raise KeyError('remote boom')" in text
    assert "remote.py" not in text and "dynamic-code" not in text
    cell = run(kernel, "%%timeout 60 --mode dask\nimport sys\nsys.exit(3)")
    assert cell.error is not None and "SystemExit: 3 (raised by the cell on the Dask worker)" in cell.error["evalue"]


def test_a_timeout_kills_the_worker_process_and_the_next_cell_runs(kernel: Kernel) -> None:
    cell = run(kernel, "%%timeout 1 --mode dask\nimport os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass")
    assert cell.error is not None and cell.error["ename"] == "CellTimeout", cell.text
    spinner = int(cell.stdout.split()[-1])
    cell = run(kernel, "%%timeout 60 --mode dask\nimport os\nprint('fresh worker', flush=True)\nos.getpid()")
    assert int(cell.results[-1]["text/plain"]) != spinner, cell.text
    assert cell.stdout == "fresh worker\n"  # the new worker process got the plugin as it joined


# --------------------------------------------------------------------------- results move once


def test_a_pending_job_goes_to_dask_as_a_dependency(kernel: Kernel) -> None:
    run(kernel, "%%background --dask -o first\nimport time\ntime.sleep(1.5)\n'A'")
    run(kernel, "%%background --dask -o second\npart = first\npart + 'B'")
    # Submitted at once, with the first job's task as its dependency (not held back until it ends).
    assert value(kernel, "first.done(), second._dask_future is not None") == "(False, True)"
    run(kernel, "%jobs wait second --timeout 60")
    assert value(kernel, "second.result(), part") == "('AB', 'A')"
    assert value(kernel, "first._dask_future, second._dask_future") == "(None, None)"



def test_a_finished_cell_is_not_run_again_when_its_worker_dies(kernel: Kernel, tmp_path: Path) -> None:
    ran = tmp_path / "ran.txt"
    run(kernel, f"%%background --dask -o once\nimport os\n"
                f"fd = os.open({str(ran)!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n"
                "os.write(fd, b'ran\\n')\nos.close(fd)\n'once'")
    run(kernel, "%jobs wait once --timeout 60")
    assert value(kernel, "once.result()") == "'once'"
    # One worker process: the deadline kills the one that holds (held) the finished cell's result.
    cell = run(kernel, "%%timeout 1 --mode dask\nwhile True:\n    pass")
    assert cell.error is not None and cell.error["ename"] == "CellTimeout", cell.text
    assert run(kernel, "%%timeout 60 --mode dask\n'after'").results[-1]["text/plain"] == "'after'"
    time.sleep(1)  # a re-run, if there were one, would be under way by now
    assert ran.read_text() == "ran\n"


# --------------------------------------------------------------------------- leave it as we found it


def test_two_kernels_get_their_own_output_and_leave_the_workers_as_they_were(
    bare_cluster: dict[str, object], observer: Any, kernel: Kernel
) -> None:
    assert run(kernel, "%dask close").status == "ok"  # the module's kernel leaves too, for a while
    before, plugins = _state(observer), _plugins(observer)
    assert plugins == []
    assert {w["sys.stdout"][1] for w in before.values()} == {"TextIOWrapper"}, before
    with running_kernel(env={"CONCUR_DASK_SCHEDULER": ""}) as first:
        with running_kernel(env={"CONCUR_DASK_SCHEDULER": ""}) as second:
            for k in (first, second):
                run(k, f"%load_ext concur_magics\n%dask connect {bare_cluster['address']}")
            cells = {}
            for k, who in ((first, "first"), (second, "second")):
                cells[who] = run(k, f"%%background --dask -o talk\nimport time\nfor i in range(3):\n"
                                    f"    print('{who}', i, flush=True)\n    time.sleep(0.2)")
            for k in (first, second):
                run(k, "%jobs wait talk --timeout 60")
            assert len(_plugins(observer)) == len(plugins) + 2
            assert cells["first"].stdout == "first 0\nfirst 1\nfirst 2\n", cells["first"].text
            assert cells["second"].stdout == "second 0\nsecond 1\nsecond 2\n", cells["second"].text
            # Someone else's task on the same workers, meanwhile: its output is left alone.
            theirs = observer.submit(
                lambda: (print("someone else's print"), __import__("distributed").print("someone else's too")),
                pure=False,
            )
            theirs.result(timeout=30)
            events = observer.get_events("concur-output")
            assert events and not [e for e in events if "someone else" in str(e)], events
            # The first to connect leaves first: its wrappers are under the second's.
            assert run(first, "%dask close").status == "ok"
            assert len(_plugins(observer)) == len(plugins) + 1
        # The second kernel shut down.
        assert _plugins(observer) == plugins
        assert _state(observer) == before
    assert run(kernel, f"%dask connect {bare_cluster['address']}").status == "ok"


def test_unload_removes_the_plugin(bare_cluster: dict[str, object], observer: Any) -> None:
    before, plugins = _state(observer), _plugins(observer)
    with running_kernel(env={"CONCUR_DASK_SCHEDULER": ""}) as k:
        run(k, f"%load_ext concur_magics\n%dask connect {bare_cluster['address']}")
        cell = run(k, "%%timeout 60 --mode dask\nprint('routed')")
        assert cell.stdout == "routed\n", cell.text
        assert _state(observer) != before and len(_plugins(observer)) == len(plugins) + 1
        assert run(k, "%unload_ext concur_magics").status == "ok"
        assert _plugins(observer) == plugins
        assert _state(observer) == before


# --------------------------------------------------------------------------- every job ends

SPIN = "%%background --dask -o spin\nimport time\nwhile True:\n    time.sleep(0.05)"


def test_dask_close_ends_a_running_job(kernel: Kernel, bare_cluster: dict[str, object]) -> None:
    cell = run(kernel, SPIN)
    time.sleep(1)
    start = time.monotonic()
    assert run(kernel, "%dask close").status == "ok"
    run(kernel, f"%jobs wait spin --timeout {ENDS_WITHIN}")
    assert time.monotonic() - start < ENDS_WITHIN
    assert value(kernel, "spin.status") == "'cancelled'"
    assert "CancelledError" in run(kernel, "spin.result(timeout=5)").text
    kernel.wait_until(lambda: "ended: the Dask connection was closed" in cell.text, WITHIN, "the reason")
    assert run(kernel, f"%dask connect {bare_cluster['address']}").status == "ok"


def test_unload_ends_a_running_job(bare_cluster: dict[str, object]) -> None:
    with running_kernel(env={"CONCUR_DASK_SCHEDULER": ""}) as k:
        run(k, f"%load_ext concur_magics\n%dask connect {bare_cluster['address']}")
        cell = run(k, SPIN)
        time.sleep(1)
        start = time.monotonic()
        assert run(k, "%unload_ext concur_magics").status == "ok"
        assert value(k, "spin.status") == "'cancelled'"
        assert time.monotonic() - start < ENDS_WITHIN
        assert "CancelledError" in run(k, "spin.result(timeout=5)").text
        k.wait_until(lambda: "ended: concur_magics was unloaded" in cell.text, WITHIN, "the reason")


def test_losing_the_scheduler_ends_a_running_job(bare_python: str, tmp_path: Path) -> None:
    with dask_cluster(tmp_path, bare_python, env=_bare_env()) as cluster:
        with running_kernel(env={"CONCUR_DASK_SCHEDULER": ""}) as k:
            run(k, f"%load_ext concur_magics\n%dask connect {cluster['address']}")
            cell = run(k, SPIN)
            time.sleep(1)
            scheduler = cluster["scheduler"]
            assert isinstance(scheduler, subprocess.Popen)
            start = time.monotonic()
            scheduler.kill()
            run(k, f"%jobs wait spin --timeout {ENDS_WITHIN}")
            assert time.monotonic() - start < ENDS_WITHIN
            assert value(k, "spin.status") == "'error'"
            k.wait_until(lambda: cell.error is not None, WITHIN, "the error in the job's cell")
            assert cell.error is not None and cell.error["ename"] == "ConnectionError"
            assert "lost the connection to the Dask scheduler" in cell.error["evalue"]
            assert "ConnectionError" in run(k, "spin.result(timeout=5)").text
