"""%%timeout in a real ipykernel, driven over the messaging protocol."""

from __future__ import annotations

import time

import pytest

from concur_magics.frontend import Kernel
from tests.conftest import refused, run, value

# Bounds are generous on purpose (a loaded 2-core CI machine): they prove the work stopped near the
# deadline instead of running on. Precision is measured in benchmarks/.
STOPPED_WITHIN = 10.0


def timed(kernel: Kernel, code: str) -> tuple[float, object]:
    start = time.monotonic()
    cell = run(kernel, code)
    return time.monotonic() - start, cell


def assert_timed_out(cell: object, limit: str, mode: str, step: str) -> None:
    error = cell.error  # type: ignore[attr-defined]
    assert error is not None, cell.text  # type: ignore[attr-defined]
    assert error["ename"] == "CellTimeout"
    assert f"time limit of {limit} s exceeded (mode: {mode})" in error["evalue"]
    assert step in error["evalue"]


def test_pure_python_loop_is_stopped_and_kernel_goes_on(kernel: Kernel) -> None:
    elapsed, cell = timed(kernel, "%%timeout 1\nn = 0\nwhile True:\n    n += 1")
    assert_timed_out(cell, "1", "signal", "raised in the running Python code")
    assert elapsed < STOPPED_WITHIN
    # The namespace is intact and the kernel runs the next cell.
    assert int(value(kernel, "n")) > 0
    assert value(kernel, "1 + 1") == "2"


def test_traceback_points_at_the_line_that_was_stopped(kernel: Kernel) -> None:
    cell = run(kernel, "%%timeout 0.5\nimport time\ntime.sleep(60)")
    assert_timed_out(cell, "0.5", "signal", "raised")
    tail = cell.error["traceback"][-2]
    assert "----> 3 time.sleep(60)" in tail


def test_sleep_is_interrupted(kernel: Kernel) -> None:
    elapsed, cell = timed(kernel, "%%timeout 0.5\nimport time\ntime.sleep(60)")
    assert_timed_out(cell, "0.5", "signal", "raised")
    assert elapsed < STOPPED_WITHIN


def test_c_loop_holding_the_gil_is_killed_in_process_mode(kernel: Kernel) -> None:
    # sum() over a range runs entirely in C and never releases the GIL.
    elapsed, cell = timed(kernel, "%%timeout 1 --mode process\nsum(range(10**13))")
    assert_timed_out(cell, "1", "process", "killed with SIGKILL")
    assert elapsed < STOPPED_WITHIN
    assert value(kernel, "2 * 21") == "42"


def test_c_call_that_ignores_signals_is_reported_in_the_cell(kernel: Kernel) -> None:
    # pbkdf2 releases the GIL and never checks for signals: signal mode can't stop it, and must say
    # so in the cell while it is still running, naming the mode that can.
    code = (
        "%%timeout 0.2\nimport hashlib, time\nstarted = time.monotonic()\n"
        "hashlib.pbkdf2_hmac('sha256', b'pw', b'salt', 8_000_000)"
    )
    cell = run(kernel, code)
    assert_timed_out(cell, "0.2", "signal", "raised")
    assert "still running" in cell.stderr
    assert "--mode process" in cell.stderr
    kinds = [o["output_type"] for o in cell.outputs]
    assert kinds.index("stream") < kinds.index("error")


def test_process_mode_copies_names_back_and_streams_output(kernel: Kernel) -> None:
    run(kernel, "import os\nkernel_pid = os.getpid()\ndoomed = 1")
    code = (
        "%%timeout 30 --mode process\n"
        "import os\n"
        "child_pid = os.getpid()\n"
        "print('hello from the child')\n"
        "from IPython.display import display, HTML\n"
        "display(HTML('<b>shown by the child</b>'))\n"
        "result = [i * i for i in range(5)]\n"
        "del doomed\n"
        "result[-1]"
    )
    cell = run(kernel, code)
    assert cell.status == "ok", cell.text
    assert cell.stdout == "hello from the child\n"
    assert any("<b>shown by the child</b>" in r.get("text/html", "") for r in cell.results)
    assert cell.results[-1]["text/plain"] == "16"
    assert value(kernel, "result") == "[0, 1, 4, 9, 16]"
    assert value(kernel, "child_pid != kernel_pid") == "True"
    assert value(kernel, "'doomed' in globals()") == "False"


def test_output_streams_live_before_the_child_ends(kernel: Kernel) -> None:
    cell = kernel.execute(
        "%%timeout 30 --mode process\nimport time\nprint('early', flush=True)\ntime.sleep(3)",
        wait=False,
    )
    kernel.wait_until(lambda: "early" in cell.stdout, timeout=20, what="the child's first line")
    assert cell.reply is None, "the line should arrive while the cell still runs"
    kernel.wait(cell, timeout=30)
    assert cell.status == "ok"


def test_unpicklable_names_are_named_in_a_warning(kernel: Kernel) -> None:
    cell = run(kernel, "%%timeout 30 --mode process\nimport threading\nlock = threading.Lock()\nkept = 7")
    assert cell.status == "ok", cell.text
    assert "NamesNotCopiedWarning" in cell.stderr
    assert "'lock'" in cell.stderr
    assert value(kernel, "kept") == "7"


def test_functions_come_back_without_dragging_their_globals(kernel: Kernel) -> None:
    # `guard` refuses to be pickled: if copying `reader` back dragged the globals it names along,
    # `reader` would be reported as not copied.
    run(kernel, "class Guard:\n    def __reduce__(self):\n        raise RuntimeError('dragged')\nguard = Guard()")
    cell = run(kernel, "%%timeout 30 --mode process\ndef reader():\n    return guard\nclass Made(Guard):\n    pass")
    assert cell.status == "ok", cell.text
    assert "NamesNotCopiedWarning" not in cell.stderr, cell.stderr
    assert value(kernel, "reader() is guard") == "True"
    assert value(kernel, "reader.__globals__ is get_ipython().user_ns") == "True"
    assert value(kernel, "issubclass(Made, Guard)") == "True"


def test_exception_in_the_child_is_raised_in_the_cell_with_its_traceback(kernel: Kernel) -> None:
    cell = run(kernel, "%%timeout 30 --mode process\ndef inner():\n    raise ValueError('child boom')\ninner()")
    assert cell.error is not None and cell.error["ename"] == "ValueError"
    assert cell.error["evalue"] == "child boom"
    text = "\n".join(cell.error["traceback"])
    assert "inner()" in text and "raise ValueError('child boom')" in text


def test_awaiting_cell_is_cancelled_and_kernel_survives(kernel: Kernel) -> None:
    elapsed, cell = timed(kernel, "%%timeout 0.5\nimport asyncio\nawait asyncio.sleep(60)")
    assert_timed_out(cell, "0.5", "signal", "cancelled at its await")
    assert elapsed < STOPPED_WITHIN
    cell = run(kernel, "%%timeout 5\nimport asyncio\nawait asyncio.sleep(0.05)\n'awaited'")
    assert cell.results[-1]["text/plain"] == "'awaited'"


def test_awaiting_cell_that_computes_is_interrupted(kernel: Kernel) -> None:
    cell = run(kernel, "%%timeout 0.5\nimport asyncio\nawait asyncio.sleep(0)\nwhile True:\n    pass")
    assert_timed_out(cell, "0.5", "signal", "raised")
    assert value(kernel, "'alive'") == "'alive'"


def test_awaiting_cell_in_process_mode(kernel: Kernel) -> None:
    cell = run(kernel, "%%timeout 0.5 --mode process\nimport asyncio\nawait asyncio.sleep(60)")
    assert_timed_out(cell, "0.5", "process", "killed")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("%%timeout", "the following arguments are required: seconds"),
        ("%%timeout abc", "expected a positive number of seconds"),
        ("%%timeout -1", "durations must be positive, got '-1'"),
        ("%%timeout 0", "must be more than 0"),
        ("%%timeout 1 --mode banana", "invalid choice: 'banana'"),
        ("%%timeout 1 --frobnicate", "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_input_is_refused_and_the_cell_does_not_run(kernel: Kernel, line: str, message: str) -> None:
    refused(kernel, f"{line}\nran = True", message, "%timeout [--mode {signal,process,dask}] seconds")


def test_help_comes_from_the_argument_parser(kernel: Kernel) -> None:
    cell = run(kernel, "%%timeout?")
    pages = [p["data"]["text/plain"] for p in cell.reply["payload"] if p.get("source") == "page"]
    assert pages and "%timeout [--mode {signal,process,dask}] seconds" in pages[0]
    assert "kill it with its process group" in " ".join(pages[0].split())


def test_a_cell_using_sigalrm_itself_keeps_working(kernel: Kernel) -> None:
    code = (
        "%%timeout 10\nimport signal, time\nfired = []\n"
        "signal.signal(signal.SIGALRM, lambda *a: fired.append('alarm'))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.1)\ntime.sleep(0.5)\nfired"
    )
    cell = run(kernel, code)
    assert cell.status == "ok", cell.text
    assert cell.results[-1]["text/plain"] == "['alarm']"


def test_nested_deadlines_the_outer_one_wins(kernel: Kernel) -> None:
    cell = run(
        kernel,
        "%%timeout 0.5\nimport time, concur_magics\nwith concur_magics.timeout(30):\n    time.sleep(10)",
    )
    assert_timed_out(cell, "0.5", "signal", "raised")
    cell = run(
        kernel,
        "%%timeout 30\nimport time, concur_magics\ntry:\n    with concur_magics.timeout(0.2):\n"
        "        time.sleep(10)\nexcept concur_magics.CellTimeout as e:\n    print('inner', e.limit)",
    )
    assert cell.status == "ok", cell.text
    assert cell.stdout == "inner 0.2\n"


def test_combined_with_another_cell_magic(kernel: Kernel) -> None:
    cell = run(kernel, "%%timeout 10\n%%capture captured\nprint('inside capture')")
    assert cell.status == "ok", cell.text
    assert value(kernel, "captured.stdout") == "'inside capture\\n'"


def test_config_sets_the_default_mode(kernel: Kernel) -> None:
    try:
        run(kernel, "%config ConcurMagics.default_timeout_mode = 'process'")
        cell = run(kernel, "%%timeout 10\nimport os\nos.getpid() == kernel_pid_for_config")
        assert cell.error is not None and cell.error["ename"] == "NameError"
        run(kernel, "import os\nkernel_pid_for_config = os.getpid()")
        cell = run(kernel, "%%timeout 10\nimport os\nos.getpid() == kernel_pid_for_config")
        assert cell.results[-1]["text/plain"] == "False"
        cell = run(kernel, "%config ConcurMagics.timeout_grace = -3")
        assert "timeout_grace must be a positive number of seconds, got -3" in cell.text
    finally:
        run(kernel, "%config ConcurMagics.default_timeout_mode = 'signal'")


def test_interrupt_during_a_timed_cell(kernel: Kernel) -> None:
    for mode in ("signal", "process"):
        cell = kernel.execute(f"%%timeout 60 --mode {mode}\nimport time\ntime.sleep(60)", wait=False)
        time.sleep(1)
        kernel.manager.interrupt_kernel()
        kernel.wait(cell, timeout=30)
        assert cell.error is not None and cell.error["ename"] == "KeyboardInterrupt", cell.text
    assert kernel.children() == []


def test_twenty_process_timeouts_leave_no_process_or_thread(fresh_kernel: Kernel) -> None:
    before = int(value(fresh_kernel, "import threading\nthreading.active_count()"))
    for _ in range(20):
        cell = run(fresh_kernel, "%%timeout 0.1 --mode process\nimport subprocess\n"
                   "subprocess.Popen(['sleep', '60'])\nsum(range(10**13))")
        assert_timed_out(cell, "0.1", "process", "killed")
    assert fresh_kernel.children() == []
    assert int(value(fresh_kernel, "threading.active_count()")) == before


def test_signal_timeouts_leave_no_thread(fresh_kernel: Kernel) -> None:
    before = int(value(fresh_kernel, "import threading\nthreading.active_count()"))
    for _ in range(10):
        run(fresh_kernel, "%%timeout 0.05\nwhile True: pass")
    # One thread serves every deadline while any is pending, and leaves a second after the last.
    assert int(value(fresh_kernel, "threading.active_count()")) <= before + 1
    fresh_kernel.wait_until(
        lambda: int(value(fresh_kernel, "threading.active_count()")) == before, 10, "the deadline thread to leave"
    )


def test_unload_removes_the_magic_and_reload_works(fresh_kernel: Kernel) -> None:
    cell = run(fresh_kernel, "%unload_ext concur_magics")
    assert cell.status == "ok", cell.text
    cell = run(fresh_kernel, "%%timeout 1\n1")
    assert cell.reply["ename"] == "UsageError" and "Cell magic `%%timeout` not found" in cell.stderr
    assert value(fresh_kernel, "len(get_ipython().input_transformers_post)") == "0"
    run(fresh_kernel, "%load_ext concur_magics")
    cell = run(fresh_kernel, "%%timeout 1\n'back'")
    assert cell.results[-1]["text/plain"] == "'back'"


def test_kernel_shutdown_leaves_no_child_behind() -> None:
    import psutil

    from concur_magics.frontend import running_kernel

    with running_kernel() as kernel:
        run(kernel, "%load_ext concur_magics")
        kernel.execute("%%timeout 120 --mode process\nimport time\ntime.sleep(120)", wait=False)
        kernel.wait_until(lambda: bool(kernel.children()), timeout=30, what="the process-mode child")
        children = kernel.children()
        # Killed outright, so no clean-up code of ours runs in the kernel: the child must notice.
        kernel.manager.shutdown_kernel(now=True)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
