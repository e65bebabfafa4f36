"""Output that never strays and is never lost: what a job starts reports to its cell, reruns keep a
job's output, each job keeps a log, status lines are live, and headless runs keep job output.

Real kernels (ipykernel, with its file-descriptor capture on, as users have it) through
jupyter_client; a notebook executed by nbclient.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import nbformat
import pytest

from concur_magics.frontend import Cell, Kernel

from .conftest import run, value

# Generous bounds: they prove something happened, not how fast (benchmarks/ measures that).
SOON = 30


def job_cell(kernel: Kernel, code: str, **options: object) -> Cell:
    return kernel.execute(code, wait=True, timeout=SOON, **options)  # type: ignore[arg-type]


def finished(kernel: Kernel, name: str) -> None:
    run(kernel, f"%jobs wait {name}", timeout=SOON)


def status_lines(cell: Cell) -> list[str]:
    return [str(out["data"]["text/plain"]) for out in cell.outputs
            if out.get("output_type") == "display_data" and "concur-job" in str(out.get("transient"))]


def test_threads_executors_and_subprocesses_of_a_job_report_to_its_cell(kernel: Kernel) -> None:
    job = job_cell(kernel, (
        "%%background -n kids -o kids\n"
        "import threading, time, subprocess, os, sys\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "time.sleep(0.5)\n"
        "def child():\n"
        "    print('from the child thread')\n"
        "t = threading.Thread(target=child); t.start(); t.join()\n"
        "with ThreadPoolExecutor(2) as pool:\n"
        "    pool.submit(print, 'from an executor worker').result()\n"
        "subprocess.run(['echo', 'from a subprocess'])\n"
        "subprocess.run('echo from a subprocess on stderr >&2', shell=True)\n"
        "subprocess.run(['echo', 'given sys.stdout'], stdout=sys.stdout)\n"
        "subprocess.Popen(['echo', 'positional arguments'], -1, None, None, None).wait()\n"
        "rc = os.system('echo from os.system; exit 3')\n"
        "print('exit status', rc >> 8)\n"
        "captured = subprocess.run(['echo', 'captured'], capture_output=True, text=True).stdout\n"
        "captured"
    ))
    # Meanwhile another cell runs: none of the job's lines may land there.
    other = run(kernel, "import time\ntime.sleep(2.5)\nprint('the other cell')")
    finished(kernel, "kids")
    kernel.pump(0.5)
    assert other.stdout == "the other cell\n", other.text
    expected = ["from the child thread", "from an executor worker", "from a subprocess", "given sys.stdout",
                "positional arguments", "from os.system", "exit status 3"]
    lines = job.stdout.splitlines()
    assert lines == expected, job.text
    assert job.stderr == "from a subprocess on stderr\n"
    assert "'captured\\n'" in job.text  # capture_output still captures: only inherited fds are relayed
    # The job's log has it all, in order, with its value.
    log = run(kernel, "print(kids.output)").stdout
    assert [line for line in log.splitlines() if line in expected] == expected, log
    assert log.rstrip().endswith("'captured\\n'"), log


def test_a_rerun_cell_keeps_showing_the_output_of_its_earlier_run(kernel: Kernel) -> None:
    first = job_cell(kernel, "%%background -n rerun\nimport time\nfor i in range(8):\n    print('tick', i, flush=True)\n"
                             "    time.sleep(0.25)", cell_id="rerun-cell")
    kernel.wait_until(lambda: "tick 1" in first.stdout, SOON, "the first ticks")
    # The frontend clears the cell and listens to the new run only: the earlier job goes on there.
    again = job_cell(kernel, "print('run again')", cell_id="rerun-cell")
    finished(kernel, "rerun")
    kernel.pump(0.3)
    assert "tick 7" in again.stdout and "tick 7" not in first.stdout, (first.text, again.text)
    ticks = re.findall(r"tick (\d)", first.stdout + again.stdout)
    assert ticks == [str(i) for i in range(8)], (first.text, again.text)  # none lost, none twice
    assert any("rerun" in line and "done" in line for line in status_lines(again)), again.text


def status_history(kernel: Kernel, cell: Cell) -> list[str]:
    """Every text the cell's job status lines showed, in order (first display and its updates)."""
    ids = {out["transient"]["display_id"] for out in cell.outputs if "concur-job" in str(out.get("transient"))}
    return [str(msg["content"]["data"]["text/plain"]) for msg in kernel.messages
            if msg["msg_type"] in ("display_data", "update_display_data")
            and msg["content"].get("transient", {}).get("display_id") in ids]


def test_the_status_line_counts_while_the_job_runs(kernel: Kernel) -> None:
    cell = job_cell(kernel, "%%background -n counting\nimport time\ntime.sleep(3.5)")
    seen: set[str] = set()
    deadline = time.monotonic() + SOON
    while time.monotonic() < deadline and not any("done" in line for line in seen):
        kernel.pump(0.1)
        seen.update(status_lines(cell))
    times = sorted({float(m) for line in seen for m in re.findall(r"running ([\d.]+) s", line)})
    assert len(times) >= 3 and times[-1] >= 2.0, seen  # about one refresh a second
    assert any("done" in line for line in seen), seen


def test_a_loop_job_held_up_by_a_blocking_cell_says_so(kernel: Kernel) -> None:
    cell = job_cell(kernel, "%%background -n held\nimport asyncio\nawait asyncio.sleep(3)")
    run(kernel, "import time\ntime.sleep(3)")
    finished(kernel, "held")
    history = status_history(kernel, cell)
    assert any("held up: a cell is blocking the kernel's loop" in line for line in history), history
    assert "held up" not in history[-1] and "done" in history[-1], history


def test_fd_output_while_jobs_run_is_never_passed_off_as_the_running_cells(kernel: Kernel) -> None:
    job_cell(kernel, "%%background -n rawfd\nimport os, time\ntime.sleep(0.5)\nos.write(1, b'raw fd write\\n')\n"
                     "time.sleep(1)")
    other = run(kernel, "import time\ntime.sleep(2)")
    finished(kernel, "rawfd")
    assert "raw fd write" in other.stdout, other.text
    assert re.search(r"\[stdout of no known cell, written while jobs .*rawfd.* ran; it may be theirs:\]\nraw fd write",
                     other.stdout), other.text
    # With no job running, a cell's own fd writes are its own, as ipykernel shows them.
    plain = run(kernel, "import os\nos.write(1, b'plain fd write\\n')\ntime.sleep(0.3)")
    assert plain.stdout == "plain fd write\n", plain.text


def test_jobs_show_replays_a_log_that_is_bounded(kernel: Kernel) -> None:
    job_cell(kernel, "%%background -n chatty\nfor i in range(50_000):\n    print(i)\n'the end'")
    finished(kernel, "chatty")
    shown = run(kernel, "%jobs show chatty", timeout=SOON)
    numbers = [line for line in shown.stdout.splitlines() if line.isdigit()]
    assert numbers == [str(i) for i in range(50_000)], len(numbers)
    assert "'the end'" in shown.text
    big = job_cell(kernel, "%%background -n huge -o huge\nfor i in range(2000):\n    print('y' * 999)\n"
                           "print('last line')")
    finished(kernel, "huge")
    assert big.status == "ok"
    text = run(kernel, "out = huge.output\nprint(len(out), out[:60], out.splitlines()[-1])").stdout
    size, rest = text.split(" ", 1)
    assert 1_000_000 <= int(size) <= 1_000_100, text  # LOG_LIMIT characters, plus the note
    assert rest.startswith("[... ") and "characters of earlier output dropped" in rest and rest.rstrip().endswith("last line")


def test_jobs_show_and_show_flag_refuse_bad_use(kernel: Kernel) -> None:
    from .conftest import refused

    refused(kernel, "%jobs show\nran = True", "%jobs show needs job ids or names", "%jobs [")
    refused(kernel, "%jobs list --show\nran = True", "--show goes with %jobs wait", "%jobs [")


def test_jobs_show_shows_a_display_as_last_updated(kernel: Kernel) -> None:
    job_cell(kernel, "%%background -n board\nh = display('waiting', display_id=True)\nh.update('final count: 7')")
    finished(kernel, "board")
    shown = run(kernel, "%jobs show board")
    texts = [str(r.get("text/plain")) for r in shown.results]
    assert "'final count: 7'" in texts and "'waiting'" not in texts, texts


def test_options_may_come_before_or_after_the_jobs_named(kernel: Kernel) -> None:
    job_cell(kernel, "%%background -n either\nprint('either way')")
    finished(kernel, "either")
    for line in ("%jobs wait --show either", "%jobs wait either --show", "%jobs wait --timeout 5 either --show"):
        shown = run(kernel, line)
        assert shown.status == "ok" and "either way" in shown.stdout, (line, shown.text)


def test_the_jobs_table_tells_jobs_apart_and_reads_left_to_right(kernel: Kernel) -> None:
    job_cell(kernel, "%%background -n tidy\n# a comment\nimport time\n\nresult = sum(range(10))")
    finished(kernel, "tidy")
    table = run(kernel, "%jobs")
    html = table.results[-1]["text/html"]
    assert "text-align:left" in html
    assert "result = sum(range(10))" in table.results[-1]["text/plain"]


def test_a_notebook_run_headless_keeps_its_jobs_output(tmp_path: Path) -> None:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    from concur_magics.frontend import python_kernelspec_dir

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in (
        "%load_ext concur_magics",
        "%%background -n quick\n'quick value'",
        "%%background -n late\nimport time\nprint('early line')\ntime.sleep(1)\nprint('late line')\n6 * 7",
        "%%background -n broken\nimport time\ntime.sleep(0.5)\nraise ValueError('broken job')",
        "%jobs wait --show",
    )])
    specs = KernelSpecManager(kernel_dirs=[python_kernelspec_dir(str(tmp_path))], ensure_native_kernel=False)
    manager = KernelManager(kernel_name="concur-python", kernel_spec_manager=specs)
    client = NotebookClient(nb, km=manager, timeout=60, startup_timeout=60)
    client.execute(cleanup_kc=True)
    # nbclient keeps only what arrives before each cell's reply: the late line is not in its cell...
    assert "late line" not in str(nb.cells[2].outputs)
    # ...its status lines are refreshed from the waiting cell (nbclient applies a display update
    # to every output with that display id)...
    for index in (1, 2, 3):
        status = [str(o["data"]["text/plain"]) for o in nb.cells[index].outputs if o["output_type"] == "display_data"]
        assert status and " running " not in status[0] and ("done" in status[0] or "error" in status[0]), status
    # ...but the waiting cell shows each job's whole log, so the saved notebook has it.
    last = nb.cells[-1].outputs
    text = "".join(o.get("text", "") for o in last if o["output_type"] == "stream")
    data = "".join(str(o.get("data", {}).get("text/plain", "")) for o in last)
    tracebacks = "\n".join("\n".join(o.get("traceback", [])) for o in last if o["output_type"] == "error")
    assert "early line" in text and "late line" in text, last
    assert "42" in data and "'quick value'" in data, last  # a job that ended before the wait too
    assert "ValueError" in tracebacks and "broken job" in tracebacks, last


def test_unloading_takes_every_patch_and_the_relay_away(fresh_kernel: Kernel) -> None:
    # Our wrappers carry __wrapped__ (functools.wraps); the display publisher's is on the instance.
    probe = ("import threading, subprocess, os, concurrent.futures\n"
             "[hasattr(f, '__wrapped__') for f in (threading.Thread.start, subprocess.Popen.__init__,"
             " subprocess.Popen.wait, os.system, concurrent.futures.ThreadPoolExecutor.submit)]"
             " + ['publish' in vars(get_ipython().display_pub)]")
    loaded = value(fresh_kernel, probe)
    assert loaded == "[True, True, True, True, True, True]", loaded
    job_cell(fresh_kernel, "%%background -n relayed\nimport subprocess\nfor _ in range(300):\n"
                           "    subprocess.run(['echo', 'x'])")
    finished(fresh_kernel, "relayed")
    fds = value(fresh_kernel, "len(os.listdir('/proc/self/fd'))")
    # A grandchild that keeps the pipe open (a shell's background job) keeps the relay reading...
    held = job_cell(fresh_kernel, "%%background -n held\nimport subprocess\n"
                                  "subprocess.run('(sleep 4; echo late) & echo started', shell=True)")
    finished(fresh_kernel, "held")
    relay = value(fresh_kernel, "[t.name for t in threading.enumerate() if t.name == 'concur-relay']")
    assert relay == "['concur-relay']" and "started" in held.stdout, (relay, held.text)
    run(fresh_kernel, "%unload_ext concur_magics")
    unloaded = value(fresh_kernel, probe)
    assert unloaded == "[False, False, False, False, False, False]", unloaded
    # ...until unload, which stops it and closes what it held.
    threads = value(fresh_kernel, "sorted(t.name for t in threading.enumerate() if t.name.startswith('concur'))")
    assert threads == "[]", threads
    # 300 relayed subprocesses left no pipe behind (a few fds either way: ipykernel's own).
    assert int(value(fresh_kernel, "len(os.listdir('/proc/self/fd'))")) <= int(fds) + 2


@pytest.mark.parametrize("magic", ["%%background", "%%timeout 5", "%%every 1s --times 1"])
def test_a_syntax_error_in_a_magic_cell_shows_as_in_a_plain_cell(kernel: Kernel, magic: str) -> None:
    cell = run(kernel, f"{magic}\nx = (1,\nprint(x)")
    assert cell.error is not None and cell.error["ename"] == "CellSyntaxError", cell.text
    text = "\n".join(cell.error["traceback"])
    assert "SyntaxError: '(' was never closed" in text, text
    assert "was never closed" in text and "x = (1," in text, text
    for machinery in ("run_cell_magic", "concur_magics", "ast.py", "Traceback"):
        assert machinery not in text, text


def test_a_crash_in_a_thread_a_job_started_is_shown_in_the_jobs_cell(kernel: Kernel) -> None:
    job = job_cell(kernel, "%%background -n crashing -o crashing\nimport threading\ndef bad():\n"
                           "    raise KeyError('in a thread')\nt = threading.Thread(target=bad)\nt.start(); t.join()")
    other = run(kernel, "import time\ntime.sleep(1)")
    finished(kernel, "crashing")
    kernel.pump(0.3)
    # Python 3.13+ colours the traceback threading prints (ANSI codes, which notebooks show).
    stderr = re.sub(r"\x1b\[[0-9;]*m", "", job.stderr)
    assert "KeyError: 'in a thread'" in stderr and "KeyError" not in other.text, (job.text, other.text)
    output = run(kernel, "print(crashing.output)").stdout
    assert "KeyError: 'in a thread'" in re.sub(r"\x1b\[[0-9;]*m", "", output)


def test_clear_output_in_a_job_keeps_its_status_line(kernel: Kernel) -> None:
    cell = job_cell(kernel, "%%background -n clearing\nfrom IPython.display import clear_output\n"
                            "print('before clear')\nclear_output()\nprint('after clear')")
    finished(kernel, "clearing")
    kernel.pump(0.3)
    assert "before clear" not in cell.stdout and "after clear" in cell.stdout, cell.text
    assert any("clearing" in line and "done" in line for line in status_lines(cell)), cell.text
