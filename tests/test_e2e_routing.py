"""Where a job's output lands, as the page shows it, in JupyterLab 4 and in Notebook 7.

A message log can have every output under the right parent header while a frontend shows it
elsewhere (a frontend forgets a cell's old request when the cell runs again; a thread or a
subprocess the job starts prints with no header of its own). So the scenarios are read from the
page of a real notebook, once per UI, from the same code.

To stay within a few seconds per UI the scenarios share one notebook whose cells run
concurrently: one Run All starts every job, and a single blocking cell is the "other cell that
happens to be running" for all of them. :func:`seen` drives that notebook through one timeline and
records what the page showed; each test then checks one scenario in that record, so a scenario
that fails does not hide the others.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .browser import UI, Notebook, Server, until, write_notebook
from .browser import browser, server, shots  # noqa: F401 - fixtures, used by name

# One server per UI, each shared by all tests of this module (tests are grouped by UI).
pytestmark = pytest.mark.parametrize("server", ["lab", "notebook"], indirect=True, scope="module")

SLOW, KID, SUBPROCESS, BLOCKER, TICKS, FAILING = 1, 2, 3, 4, 5, 6
CELLS = [
    "%load_ext concur_magics",
    # SLOW: its status line must count up while the job runs, though the kernel is busy with BLOCKER.
    "%%background -n slow\nimport time; time.sleep(6)",
    # KID and SUBPROCESS print 2 s in, while BLOCKER (started right after them) runs for 4 s.
    "%%background -n kid\nimport threading, time\n\ndef child():\n    time.sleep(2)\n"
    "    print('from the child thread')\n\nt = threading.Thread(target=child)\nt.start()\nt.join()",
    "%%background\nimport os, subprocess, time\ntime.sleep(2)\nsubprocess.run(['echo', 'from a subprocess'])\n"
    "os.system('echo from os.system')",
    "import time; time.sleep(4); print('cell B')",
    # TICKS is run again while its first job runs; both jobs' ticks belong in it.
    "%%background -n r\nimport time\nfor i in range(8):\n    print('tick', i, flush=True)\n    time.sleep(0.5)",
    # Last: Run All would stop after a cell whose reply is an error.
    "%%background\nx = 1\nraise ValueError('boom')",
]
ELAPSED = re.compile(r"running\s*·\s*(\d+(?:\.\d+)?)\s*s")


@dataclass
class Seen:
    """What the page showed at the moments the scenarios ask about."""

    ui: UI
    # SLOW's output area read twice while its job runs, with the monotonic time of each read.
    slow_reads: list[tuple[float, str]] = field(default_factory=list)
    # Each cell's output area once everything has settled (or the settle wait ran out).
    outputs: list[str] = field(default_factory=list)
    settled: bool = False


def _settled(nb: Notebook) -> bool:
    """Every cell has its reply, every job has ended and shown what it shows at its end."""
    out = [nb.output(i) for i in range(len(CELLS))]
    # A job's last output can reach the page a moment before its status line turns from running.
    return (all(nb.done(i) for i in range(len(CELLS))) and not any(ELAPSED.search(o) for o in out)
            and "done" in out[SLOW]
            and "from the child thread" in out[KID] and "from os.system" in out[SUBPROCESS]
            and out[TICKS].count("tick 7") >= 2 and "ValueError" in out[FAILING])


@pytest.fixture(scope="module")
def seen(server: Server, browser: Any, shots: Path) -> Iterator[Seen]:
    """Run the routing notebook in ``server``'s UI once and record what its page shows.

    Timeline (seconds after Run All): 0 SLOW, KID, SUBPROCESS start and BLOCKER blocks the kernel
    until 4; about 0.5 and 2.5 SLOW's status is read; 2 KID's child thread and SUBPROCESS's
    processes print; 4 TICKS and FAILING start; at ``tick 1`` (about 4.5) TICKS is run again; all is
    over by about 9. Waits for things not yet built return rather than fail, so each test can
    report its own scenario from the record.
    """
    name = "routing.ipynb"
    write_notebook(server.root / name, "python3", "Python 3 (ipykernel)", CELLS)
    # Tall enough to keep every cell on screen: the UIs may stop rendering cells scrolled away.
    nb = Notebook.open(browser, server, name, "Python 3 (ipykernel)", viewport=(1200, 1600))
    record = Seen(server.ui)
    try:
        nb.run_all()
        # The status line shows within a second of Run All; 30 s covers a slow page.
        if until(lambda: ELAPSED.search(nb.output(SLOW)) is not None, 30):
            record.slow_reads.append((time.monotonic(), nb.output(SLOW)))
            time.sleep(2)
            record.slow_reads.append((time.monotonic(), nb.output(SLOW)))
        # TICKS starts when BLOCKER ends (4 s); its first job still has 3 s to go at tick 1.
        if until(lambda: "tick 1" in nb.output(TICKS), 30):
            nb.run(TICKS)
        # Everything is over about 5 s after the rerun; 20 s is for a loaded machine.
        record.settled = until(lambda: _settled(nb), 20)
        record.outputs = [nb.output(i) for i in range(len(CELLS))]
        nb.screenshot(shots, f"{server.ui.shot_name}-routing.png")
        yield record
    finally:
        nb.close()


def _cells(seen: Seen, *indices: int) -> str:
    """The output areas of some cells, for an assertion's message."""
    state = "" if seen.settled else "(read when the 20 s wait for all jobs to settle ran out)\n"
    return state + "\n".join(f"--- cell {i}: {seen.outputs[i]!r}" for i in indices)


def test_child_thread_output_reaches_the_job_cell(seen: Seen) -> None:
    """A thread the job starts prints into the job's cell, not into the cell running then."""
    where = _cells(seen, KID, BLOCKER)
    assert "from the child thread" in seen.outputs[KID], where
    assert "from the child thread" not in seen.outputs[BLOCKER], where
    assert seen.outputs[BLOCKER].strip() == "cell B", where


def test_subprocess_output_reaches_the_job_cell(seen: Seen) -> None:
    """Processes the job runs (``subprocess.run``, ``os.system``) write into the job's cell."""
    where = _cells(seen, SUBPROCESS, BLOCKER)
    for line in ("from a subprocess", "from os.system"):
        assert line in seen.outputs[SUBPROCESS], where
        assert line not in seen.outputs[BLOCKER], where
    assert seen.outputs[BLOCKER].strip() == "cell B", where


def test_rerun_keeps_showing_the_earlier_job(seen: Seen) -> None:
    """Running a cell again while its job runs says so, and the earlier job's output still shows
    in the cell (the frontend now listens to the new run only)."""
    ticks, where = seen.outputs[TICKS], _cells(seen, TICKS)
    assert "from an earlier run of this cell is still running" in ticks, where
    # The earlier job's last tick and the new job's: both in the cell once both have ended.
    assert ticks.count("tick 7") == 2, where


def test_status_line_counts_up_then_says_done(seen: Seen) -> None:
    """The job's status line shows its elapsed time growing while it runs, then ``done``."""
    assert len(seen.slow_reads) == 2, f"no 'running · N s' status line: {_cells(seen, SLOW)}"
    (t1, first), (t2, second) = seen.slow_reads
    elapsed = [float(m.group(1)) for m in (ELAPSED.search(first), ELAPSED.search(second)) if m]
    # Read about 2 s apart while a 6 s job runs: the second must be later, whatever the refresh rate.
    assert len(elapsed) == 2 and elapsed[1] > elapsed[0], (first, second, round(t2 - t1, 1))
    final = seen.outputs[SLOW]
    assert "slow" in final and "done" in final and "running" not in final, _cells(seen, SLOW)


def test_failing_job_shows_the_user_traceback(seen: Seen) -> None:
    """A job's traceback is the user's code, as a failing cell's would be, without our frames."""
    text, where = seen.outputs[FAILING], _cells(seen, FAILING)
    assert "ValueError: boom" in text, where
    assert re.search(r"Cell In\[\d+\], line 3", text) and "raise ValueError('boom')" in text, where
    for machinery in ("run_cell_magic", "skipping hidden", "concur_magics"):
        assert machinery not in text, where
