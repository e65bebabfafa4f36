"""Fixtures: real kernels started with jupyter_client, and leak checks."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from concur_magics.frontend import Cell, Kernel, running_kernel

# jupyter_core warns on every start unless told which directory layout to use.
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the browser's fixtures is a browser test (``-m "not browser"`` skips it)."""
    for item in items:
        if {"browser", "server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.browser)


def _start(load: bool = True) -> Iterator[Kernel]:
    with running_kernel(startup_timeout=60) as kernel:
        if load:
            cell = kernel.execute("%load_ext concur_magics", timeout=60)
            assert cell.status == "ok", cell.text
        yield kernel


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    """An ipykernel with the extension loaded, shared by the tests of one module."""
    yield from _start()


@pytest.fixture
def fresh_kernel() -> Iterator[Kernel]:
    """A new ipykernel with the extension loaded, for tests that count what the kernel holds."""
    yield from _start()


def run(kernel: Kernel, code: str, timeout: float = 60) -> Cell:
    """Run a cell and return what a frontend shows in it."""
    return kernel.execute(code, timeout=timeout)


def value(kernel: Kernel, expr: str) -> str:
    """The text/plain value of ``expr`` in the kernel."""
    cell = run(kernel, expr)
    assert cell.status == "ok", cell.text
    return str(cell.results[-1]["text/plain"])


def refused(kernel: Kernel, code: str, message: str, usage: str) -> Cell:
    """Run ``code``, whose body would set ``ran``; check it is a UsageError that says ``message``
    and shows the magic's usage line (starting with ``usage``), and that the body did not run."""
    run(kernel, "ran = False")
    cell = run(kernel, code)
    # IPython reports a UsageError on stderr, and the reply carries it as the cell's error.
    assert cell.status == "error" and cell.reply is not None and cell.reply["ename"] == "UsageError", cell.text
    assert message in cell.stderr
    assert any(line.strip().startswith(usage) for line in cell.stderr.splitlines()), cell.stderr
    assert value(kernel, "ran") == "False"
    return cell


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail if a test leaves threads or child processes behind in this process once the owner
    of what the API started is closed (as unload and shutdown close it)."""
    from concur_magics.runtime import Runtime

    threads = set(threading.enumerate())
    yield
    Runtime.current().close()
    # A thread that is being joined may take a moment to leave the list; 5 s is far beyond that.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        children = psutil.Process().children(recursive=True)
        if not extra and not children:
            return
        time.sleep(0.05)
    pytest.fail(f"leaked threads {extra} / child processes {children}")


@pytest.fixture(scope="module")
def dask_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A real ``dask scheduler`` and ``dask worker`` (with its nanny), as processes on 127.0.0.1."""
    import sys

    with dask_cluster(tmp_path_factory.mktemp("dask"), os.path.dirname(sys.executable)) as cluster:
        yield cluster


@contextlib.contextmanager
def dask_cluster(tmp: Path, bin_dir: str, env: dict[str, str] | None = None) -> Iterator[dict[str, object]]:
    """Run ``dask scheduler`` and ``dask worker`` (one worker process, two threads, under a nanny)
    from ``bin_dir`` on 127.0.0.1, in ``tmp``; yield their address and processes, kill them after."""
    import json
    import subprocess

    scheduler_file = tmp / "scheduler.json"
    dask = os.path.join(bin_dir, "dask")
    common = {"cwd": str(tmp), "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    scheduler = subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
         "--scheduler-file", str(scheduler_file)], **common,  # type: ignore[call-overload]
    )
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            assert time.monotonic() < deadline, "the dask scheduler did not start within 60 s"
            assert scheduler.poll() is None, "the dask scheduler exited"
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        worker = subprocess.Popen(
            [dask, "worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
             "--nworkers", "1", "--nthreads", "2", "--no-dashboard"], **common,  # type: ignore[call-overload]
        )
        # Wait until the nanny has started its worker process.
        while len(psutil.Process(worker.pid).children(recursive=True)) < 1:
            assert time.monotonic() < deadline, "the dask worker did not start within 60 s"
            time.sleep(0.1)
        yield {"address": address, "scheduler": scheduler, "nanny": worker}
    finally:
        for process in (worker, scheduler):
            if process is None:
                continue
            try:
                for child in psutil.Process(process.pid).children(recursive=True):
                    child.kill()
            except psutil.NoSuchProcess:
                pass
            process.kill()
            process.wait(timeout=30)


def worker_pids(nanny: object) -> set[int]:
    """Pids of the worker processes under a ``dask worker`` (nanny) process."""
    import subprocess

    assert isinstance(nanny, subprocess.Popen)
    return {p.pid for p in psutil.Process(nanny.pid).children(recursive=True)}


@pytest.fixture(scope="session", autouse=True)
def kernel_demo_spec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Install the demo kernel's kernelspec (with its own installer) where jupyter_client finds it."""
    import subprocess
    import sys

    prefix = tmp_path_factory.mktemp("prefix")
    subprocess.run([sys.executable, "-m", "kernel_demo", "install", "--prefix", str(prefix)], check=True,
                   capture_output=True, timeout=60)
    path = str(prefix / "share" / "jupyter")
    before = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = path + (os.pathsep + before if before else "")
    yield str(prefix / "share" / "jupyter" / "kernels")
    if before is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = before
