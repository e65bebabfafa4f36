"""The door to private internals (``concur_magics.compat``): each door works on the installed
releases, and each fallback answers as documented when what it reads is missing.

The version matrix (``noxfile.py``) runs this file on every Python and on the oldest releases, so
a release that moves an internal fails here, by name, rather than somewhere in a job. A fallback is
reached by handing the door a real object that lacks the internal (``object()``, a plain shell).
"""

from __future__ import annotations

import ast
import asyncio
import linecache
import sys
import threading
import time
from collections.abc import Iterator
from types import FunctionType, SimpleNamespace
from typing import Any

import cloudpickle
import pytest
import zmq
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_magic, magics_class

from concur_magics import compat
from concur_magics.frontend import Kernel, running_kernel
from concur_magics.remote import _kill_worker_process
from tests.conftest import run

# Every wait here is for something that takes milliseconds; 5 s covers a loaded 2-core machine.
SOON = 5


class Stop(Exception):
    pass


# --------------------------------------------------------------------------- CPython and asyncio

def _spinning_thread() -> tuple[threading.Thread, list[BaseException], threading.Event]:
    caught: list[BaseException] = []
    running = threading.Event()

    def spin() -> None:
        try:
            while True:
                running.set()
        except Stop as exc:
            caught.append(exc)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    assert running.wait(SOON)
    return thread, caught, running


def test_async_raise_reaches_a_running_thread() -> None:
    thread, caught, _ = _spinning_thread()
    assert thread.ident is not None
    assert compat.async_raise(thread.ident, Stop) is True
    thread.join(SOON)
    assert not thread.is_alive() and isinstance(caught[0], Stop)


def test_async_raise_to_a_thread_that_has_ended_is_refused() -> None:
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join(SOON)
    assert thread.ident is not None
    assert compat.async_raise(thread.ident, Stop) is False


def test_absorb_takes_a_raise_meant_for_this_thread() -> None:
    try:
        assert compat.async_raise(threading.get_ident(), Stop) is True
        early = False
    except Stop:  # delivered as the call returned: nothing left to absorb
        early = True
    assert compat.absorb(Stop) is not early  # it arrives exactly once
    assert compat.absorb(Stop) is False  # and nothing is left to surface later


def test_handled_exception_sees_an_except_block_in_another_thread() -> None:
    inside, leave = threading.Event(), threading.Event()

    def handling() -> None:
        try:
            raise Stop("cleaning up")
        except Stop:
            inside.set()
            leave.wait(SOON)

    thread = threading.Thread(target=handling, daemon=True)
    thread.start()
    assert inside.wait(SOON) and thread.ident is not None
    try:
        seen = compat.handled_exception(thread.ident)
        assert isinstance(seen, Stop) and str(seen) == "cleaning up"
        assert compat.handled_exception(threading.get_ident()) is None
    finally:
        leave.set()
        thread.join(SOON)


def test_is_running_in_sees_a_frame_on_another_threads_stack_until_it_returns() -> None:
    inside, leave = threading.Event(), threading.Event()
    frames: list[Any] = []

    def block() -> None:
        frames.append(sys._getframe())
        inside.set()
        leave.wait(SOON)

    thread = threading.Thread(target=block)
    thread.start()
    try:
        assert inside.wait(SOON)
        assert compat.is_running_in(thread.ident, frames[0]) is True  # type: ignore[arg-type]
        assert compat.is_running_in(threading.get_ident(), frames[0]) is False  # not this thread's
    finally:
        leave.set()
        thread.join(SOON)
    assert compat.is_running_in(thread.ident, frames[0]) is False  # type: ignore[arg-type]


def test_loop_thread_id_names_the_thread_of_a_running_loop() -> None:
    loop = asyncio.new_event_loop()
    assert compat.loop_thread_id(loop) is None  # not running
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        seen = asyncio.run_coroutine_threadsafe(asyncio.sleep(0, compat.loop_thread_id(loop)), loop)
        assert seen.result(SOON) == thread.ident
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(SOON)
        loop.close()
    assert compat.main_thread_id() == threading.main_thread().ident


def test_loop_thread_id_of_a_loop_without_one_is_none() -> None:
    assert compat.loop_thread_id(object()) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- IPython

@pytest.fixture(scope="module")
def shell() -> Iterator[InteractiveShell]:
    """IPython's shell in this process, for this module only: a shell left behind would make
    ``get_ipython()`` return it in every later test of the worker (and display there)."""
    import builtins
    import sys

    from traitlets.config import Config

    saved = sys.modules["__main__"], sys.displayhook, sys.excepthook, dict(vars(builtins))
    config = Config()
    config.HistoryManager.enabled = False  # no history file, no saving thread
    yield InteractiveShell.instance(config=config)
    InteractiveShell.clear_instance()
    sys.modules["__main__"], sys.displayhook, sys.excepthook = saved[:3]
    for name in set(vars(builtins)) - set(saved[3]):
        delattr(builtins, name)
    for name, value in saved[3].items():
        if vars(builtins).get(name) is not value:
            setattr(builtins, name, value)


def test_cell_filename_names_the_cell_and_keeps_its_source(shell: InteractiveShell) -> None:
    source = "x = 1\nraise ValueError(x)\n"
    filename = compat.cell_filename(shell, source, 7, source)
    assert filename is not None and filename in linecache.cache
    assert linecache.getline(filename, 2) == "raise ValueError(x)\n"


def test_cell_filename_without_ipythons_compiler_is_none() -> None:
    assert compat.cell_filename(object(), "x = 1\n", 7, "x = 1\n") is None
    # A compiler whose cache() takes other arguments (as IPython 7's did).
    other = SimpleNamespace(compile=SimpleNamespace(cache=lambda code: "<cell>"))
    assert compat.cell_filename(other, "x = 1\n", 7, "x = 1\n") is None


def _raised() -> BaseException:
    try:
        raise ValueError("from the cell")
    except ValueError as exc:
        return exc


@pytest.mark.parametrize("with_shell", [True, False], ids=["shell", "no-shell"])
def test_format_traceback_shows_the_frames_and_the_error(shell: InteractiveShell, with_shell: bool) -> None:
    error = _raised()
    lines = compat.format_traceback(shell if with_shell else None, error, error.__traceback__)
    text = "\n".join(lines)
    assert "ValueError" in text and "from the cell" in text and "_raised" in text


def test_format_syntax_error_shows_the_line_without_frames(shell: InteractiveShell) -> None:
    try:
        compile("x = (1,\n", "<cell>", "exec")
    except SyntaxError as exc:
        error = exc
    lines = compat.format_syntax_error(shell, error)
    assert lines is not None and "SyntaxError" in "\n".join(lines)
    assert "Traceback" not in "\n".join(lines)
    assert compat.format_syntax_error(object(), error) is None


@magics_class
class Doors(Magics):
    @line_magic
    def door(self, line: str) -> str:
        return "open"


def test_unregister_magics_takes_back_only_ours(shell: InteractiveShell) -> None:
    ours = Doors(shell)
    shell.register_magics(ours)
    assert shell.run_line_magic("door", "") == "open"
    assert shell.ev(compat.magics_instance("Doors")) is ours
    assert compat.unregister_magics(shell, ours) is True
    assert "door" not in shell.magics_manager.magics["line"]
    assert "Doors" not in shell.magics_manager.registry

    first, second = Doors(shell), Doors(shell)
    shell.register_magics(first)
    shell.register_magics(second)  # registered over the first: stays when the first goes
    compat.unregister_magics(shell, first)
    assert shell.magics_manager.magics["line"]["door"].__self__ is second
    compat.unregister_magics(shell, second)
    assert "door" not in shell.magics_manager.magics["line"]


def test_unregister_magics_without_a_magics_manager_leaves_them(shell: InteractiveShell) -> None:
    assert compat.unregister_magics(object(), Doors(shell)) is False


def _calls(source: str) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)]


def test_magic_call_reads_what_ipython_makes_of_magics(shell: InteractiveShell) -> None:
    cell = shell.transform_cell("%%timeout 2 --mode thread\nawait f('it')\n")
    assert [compat.magic_call(c) for c in _calls(cell) if compat.magic_call(c)] == [
        ("run_cell_magic", "timeout", ["2 --mode thread", "await f('it')\n"])
    ]
    line = shell.transform_cell("%jobs wait\n")
    assert [compat.magic_call(c) for c in _calls(line) if compat.magic_call(c)] == [
        ("run_line_magic", "jobs", ["wait"])
    ]


def test_magic_call_of_any_other_call_is_none() -> None:
    assert [compat.magic_call(c) for c in _calls("print('%%timeout 2'); get_ipython().system('ls')")] == [
        None, None, None
    ]


# --------------------------------------------------------------------------- ipykernel

def test_kernel_doors_in_a_running_kernel(kernel: Kernel) -> None:
    cell = run(kernel, "\n".join([
        "import threading",
        "from concur_magics import compat",
        "ip = get_ipython()",
        "cell_id, request = compat.execution(ip)",
        "print('request', request is not None and request == compat.parent_header(ip)['msg_id'])",
        "print('cell', compat.running_cell(ip).startswith('import threading'))",
        "print('loop', type(compat.iopub_loop(ip)).__name__)",
        "ran = []",
        "done = threading.Event()",
        "print('scheduled', compat.on_iopub_thread(ip, lambda: (ran.append(threading.current_thread().name), done.set())))",
        f"print('iopub thread', done.wait({SOON}) and ran[0] != threading.current_thread().name)",
        "print('log', compat.kernel_log().name)",
    ]))
    assert cell.status == "ok", cell.text
    assert cell.stdout.splitlines() == [
        "request True", "cell True", "loop AsyncIOLoop", "scheduled True", "iopub thread True", "log IPKernelApp",
    ]


def test_kernel_doors_outside_a_kernel_say_so() -> None:
    outside = object()
    assert compat.execution(outside) == (None, None)
    assert compat.running_cell(outside) is None
    assert compat.iopub_loop(outside) is None
    called: list[int] = []
    assert compat.on_iopub_thread(outside, lambda: called.append(1)) is False and called == []
    assert compat.parent_header(outside) == {}  # pytest's stdout has no parent header
    assert compat.kernel_log() is None


def test_publish_error_outside_a_kernel_prints_the_traceback(
        shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    error = _raised()
    compat.publish_error(shell, ValueError, error, ["the lines of the traceback"])
    assert "the lines of the traceback" in capsys.readouterr().out


# --------------------------------------------------------------------------- distributed

@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster:
        with Client(cluster, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=30)
            yield client


def test_scheduler_workers_lists_every_worker(client: Any) -> None:
    workers = compat.scheduler_workers(client)
    assert len(workers) == 2
    assert all(info["nthreads"] == 1 for info in workers.values())


def test_scheduler_workers_of_a_release_without_n_workers() -> None:
    class Before2025:  # scheduler_info() as distributed 2024.x has it: no n_workers
        def scheduler_info(self) -> dict[str, Any]:
            return {"workers": {"tcp://127.0.0.1:1": {"nthreads": 2}}}

    assert compat.scheduler_workers(Before2025()) == {"tcp://127.0.0.1:1": {"nthreads": 2}}


def test_scheduler_address(client: Any) -> None:
    assert compat.scheduler_address(client) == client.cluster.scheduler_address
    # Without the connection's address: the cluster's, else a phrase for messages.
    assert compat.scheduler_address(SimpleNamespace(cluster=client.cluster)) == client.cluster.scheduler_address
    assert compat.scheduler_address(object()) == "an unknown address"


def test_cancel_reason(client: Any) -> None:
    import distributed

    future = client.submit(time.sleep, 1, pure=False)  # a thread of this process: keep it short
    client.cancel([future])
    try:
        future.result(timeout=SOON)
    except BaseException as exc:  # noqa: BLE001 - whichever type this release raises
        error = exc
    if hasattr(distributed.client, "FutureCancelledError"):
        assert isinstance(compat.cancel_reason(error), str)
    else:  # older releases raise concurrent.futures' CancelledError, with no reason
        assert compat.cancel_reason(error) is None
    assert compat.cancel_reason(ValueError("not a cancellation")) is None


def test_stopping_a_worker_through_a_nanny_without_a_pid_says_why() -> None:
    import distributed

    with pytest.raises(RuntimeError, match=rf"distributed {distributed.__version__}: .*Nanny\.pid"):
        _kill_worker_process(12345, dask_worker=object())


# --------------------------------------------------------------------------- cloudpickle

def test_pickled_away_filename_matches_what_cloudpickle_does() -> None:
    namespace: dict[str, Any] = {"__name__": "not_an_importable_module"}
    exec(compile("def f():\n    return 1\n", "<cell>", "exec"), namespace)
    function = namespace["f"]
    assert isinstance(function, FunctionType)
    filename = cloudpickle.loads(cloudpickle.dumps(function)).__code__.co_filename
    assert compat.pickled_away_filename(filename) is (filename != "<cell>")
    assert compat.pickled_away_filename("<cell>") is False


# --------------------------------------------------------------------------- pyzmq (kernel_demo)

def test_the_demo_kernels_heartbeat_echoes(kernel_demo_spec: str) -> None:
    with running_kernel("kernel_demo", kernel_dirs=[kernel_demo_spec]) as demo:
        info = demo.manager.get_connection_info()
        context = zmq.Context()
        socket = context.socket(zmq.REQ)
        socket.linger = 0
        try:
            socket.connect(f"{info['transport']}://{info['ip']}:{info['hb_port']}")
            socket.send(b"ping")
            assert socket.poll(SOON * 1000), "no echo from the heartbeat"
            assert socket.recv() == b"ping"
        finally:
            socket.close()
            context.term()
