"""Failed and timed-out cells and jobs show the user's frames, as a plain cell does."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator

import pytest

from concur_magics.frontend import Cell, Kernel, running_kernel
from tests.conftest import run

# Generous for a loaded 2-core machine: a job's traceback arrives well within a second.
SHOWN_WITHIN = 30.0

HELPER = "import asyncio\n\ndef helper(x):\n    raise ValueError(f'bad {x}')"
HELPER_FRAME = ("Cell In[{helper}], line 4, in helper(x)", "raise ValueError(f'bad {x}')")
LOOP_FRAME = ("Cell In[{this}], line 3", "while True:")

Frame = tuple[str, str]


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    """One kernel for the module, with the extension and a helper cell; Dask, when a test asks
    for it, is a local cluster the kernel starts on first use."""
    env = {k: v for k, v in os.environ.items() if k != "CONCUR_DASK_SCHEDULER"}
    with running_kernel(env={**env, "CONCUR_DASK_SCHEDULER": ""}) as kernel:
        assert run(kernel, "%load_ext concur_magics").status == "ok"
        helper = run(kernel, HELPER)
        assert helper.status == "ok", helper.text
        kernel.helper = helper.reply["execution_count"]  # type: ignore[attr-defined, index]
        yield kernel


def frames(cell: Cell) -> list[Frame]:
    """``(where, the line marked ---->)`` for each frame of the cell's traceback; the cell's own
    number reads ``In[this]``."""
    assert cell.error is not None, cell.text
    text = "\n".join(cell.error["traceback"])
    assert "run_cell_magic" not in text, text
    assert "skipping hidden" not in text, text
    assert "concur_magics/" not in text, text
    this = cell.reply["execution_count"] if cell.reply else None
    found: list[Frame] = []
    for line in text.splitlines():
        if re.match(r"(Cell In\[\d+\], line \d+|File \S)", line):
            found.append((line.strip().replace(f"In[{this}]", "In[this]"), ""))
        arrow = re.match(r"----> +\d+ (.*)$", line)
        if arrow and found:
            found[-1] = (found[-1][0], arrow.group(1).strip())
    return found


def expected(kernel: Kernel, *template: Frame) -> list[Frame]:
    helper = kernel.helper  # type: ignore[attr-defined]
    return [(where.format(helper=helper, this="this"), line) for where, line in template]


def job_cell(kernel: Kernel, code: str) -> Cell:
    """Run a cell that starts a job and return it once the job's traceback is in it."""
    cell = run(kernel, code)
    assert cell.status == "ok", cell.text
    kernel.wait_until(lambda: cell.error is not None, SHOWN_WITHIN, f"the traceback of {code!r}")
    return cell


def plain(kernel: Kernel) -> list[Frame]:
    """The frames IPython shows when a plain cell fails the same way, at the same line."""
    cell = run(kernel, "pass\nx = 1\nhelper(3)")
    assert cell.status == "error"
    return frames(cell)


def test_a_plain_cell_shows_two_frames(kernel: Kernel) -> None:
    assert plain(kernel) == expected(kernel, ("Cell In[this], line 3", "helper(3)"), HELPER_FRAME)


@pytest.mark.parametrize("mode", ["", " --mode process"])
def test_a_timed_out_cell_shows_the_line_it_was_stopped_on(kernel: Kernel, mode: str) -> None:
    # 2 s: a forked child on a loaded machine can take over half a second to reach the loop, and
    # stopped before it, it has no line of the cell to show.
    cell = run(kernel, f"%%timeout 2{mode}\nx = 1\nwhile True:\n    pass")
    assert cell.error is not None and cell.error["ename"] == "CellTimeout", cell.text
    assert frames(cell) == expected(kernel, LOOP_FRAME)
    # The magic's own line is listed above the body, where it is in the cell.
    lines = "\n".join(cell.error["traceback"]).splitlines()
    assert f"      1 %%timeout 2{mode}" in lines


def test_a_process_deadline_that_passes_as_the_child_starts_shows_none_of_its_set_up(kernel: Kernel) -> None:
    # The child may not have reached the cell's code at a deadline of a microsecond: its traceback
    # then has no frame at all, never one of the child's own set-up (it once showed signal.py).
    for _ in range(20):
        cell = run(kernel, "%%timeout 1e-6 --mode process\nx = 1\nwhile True:\n    pass")
        assert cell.error is not None and cell.error["ename"] == "CellTimeout", cell.text
        assert frames(cell) in ([], expected(kernel, LOOP_FRAME)), cell.text


@pytest.mark.parametrize("mode", ["", " --mode process"])
def test_an_error_under_timeout_shows_what_a_plain_cell_shows(kernel: Kernel, mode: str) -> None:
    cell = run(kernel, f"%%timeout 5{mode}\nx = 1\nhelper(3)")
    assert cell.error is not None and cell.error["ename"] == "ValueError", cell.text
    assert frames(cell) == plain(kernel)


@pytest.mark.parametrize(
    "code",
    [
        "%%background\nx = 1\nhelper(3)",
        "%%background --mode loop\nawait asyncio.sleep(0)\nhelper(3)",
        "%%every 0.05 --times 1\nx = 1\nhelper(3)",
    ],
    ids=["thread", "loop", "every"],
)
def test_a_failed_job_shows_the_frames_a_plain_cell_shows(kernel: Kernel, code: str) -> None:
    cell = job_cell(kernel, code)
    assert cell.error is not None and cell.error["ename"] == "ValueError"
    assert frames(cell) == plain(kernel)


@pytest.mark.parametrize(
    "code, frame",
    [
        ("%%background --timeout 0.5\nx = 1\nwhile True:\n    pass", LOOP_FRAME),
        ("%%background --timeout 0.5\nawait asyncio.sleep(0)\nawait asyncio.sleep(60)",
         ("Cell In[this], line 3", "await asyncio.sleep(60)")),
    ],
    ids=["thread", "loop"],
)
def test_a_timed_out_job_shows_the_line_it_was_stopped_on(
    kernel: Kernel, code: str, frame: Frame
) -> None:
    cell = job_cell(kernel, code)
    assert cell.error is not None and cell.error["ename"] == "CellTimeout"
    assert frames(cell)[0] == expected(kernel, frame)[0]


def test_the_timeout_api_in_a_plain_cell(kernel: Kernel) -> None:
    code = "import concur_magics\nwith concur_magics.timeout(0.5):\n    while True:\n        pass"
    cell = run(kernel, code)
    assert cell.error is not None and cell.error["ename"] == "CellTimeout", cell.text
    assert frames(cell) == expected(kernel, LOOP_FRAME)


def test_timeout_under_capture_shows_one_traceback_at_the_cells_line(kernel: Kernel) -> None:
    cell = run(kernel, "%%capture\n%%timeout 0.5\nwhile True:\n    pass")
    assert [o["output_type"] for o in cell.outputs].count("error") == 1, cell.text
    assert frames(cell) == [("Cell In[this], line 3", "while True:")]


@pytest.mark.parametrize(
    "code", ["%%background --dask\nx = 1\nhelper(3)", "%%timeout 60 --mode dask\nx = 1\nhelper(3)"]
)
def test_a_cell_failing_on_a_worker_shows_what_a_plain_cell_shows(kernel: Kernel, code: str) -> None:
    if "--dask" in code:
        cell = job_cell(kernel, code)
    else:
        cell = run(kernel, code, timeout=120)  # the first use starts a local cluster
    assert cell.error is not None and cell.error["ename"] == "ValueError", cell.text
    assert "<dynamic-code>" not in "\n".join(cell.error["traceback"])
    # The worker's frames carry no variables: the helper's arguments are not listed.
    without_arguments = [(re.sub(r"\(.*\)$", "()", where), line) for where, line in plain(kernel)]
    assert frames(cell) == without_arguments


def test_an_exception_carrying_its_lines_still_pickles() -> None:
    from concur_magics.tracebacks import with_rendered_traceback, with_user_traceback

    try:
        raise ValueError("boom")
    except ValueError as exc:
        error = with_user_traceback(exc)
    copy = pickle.loads(pickle.dumps(error))
    assert any("ValueError" in line for line in copy._render_traceback_())
    copied = pickle.loads(pickle.dumps(with_rendered_traceback(KeyError(1), ["a line"])))
    assert copied._render_traceback_() == ["a line"]


def test_a_deadline_shorter_than_the_childs_start_is_still_a_timeout(kernel: Kernel) -> None:
    # The kernel asks the child where it is just before killing it; a child that has not yet
    # set up its answer must not die of the question.
    code = (
        "import time, concur_magics\ncaught = 0\nfor _ in range(20):\n    try:\n"
        "        concur_magics.run_with_timeout(time.sleep, 0.001, 5, mode='process')\n"
        "    except concur_magics.CellTimeout:\n        caught += 1\ncaught"
    )
    cell = run(kernel, code)
    assert cell.status == "ok", cell.text
    assert cell.results[-1]["text/plain"] == "20"
