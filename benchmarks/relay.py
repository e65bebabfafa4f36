"""Printing from a process-mode cell, against the same loop printing in the kernel itself.

A process-mode cell runs in a forked child whose output travels to the kernel over a pipe and is
written to the cell from there. The anchor is what a user would otherwise run: the same loop in a
plain (foreground) cell of the same kernel. Both are timed as a frontend feels them — from the
request to the kernel's idle status, with every line received — alternately, in one kernel.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from concur_magics.frontend import Cell, Kernel, running_kernel

if TYPE_CHECKING:
    from .__main__ import Row

__all__ = ["process_print_relay"]

GOAL = 3.0  # process mode may cost at most this many times the foreground loop


def process_print_relay(quick: bool) -> list[Row]:
    """Time ``for i in range(n): print(i)`` in a process-mode cell and in a foreground cell.

    Parameters
    ----------
    quick:
        Print 10,000 lines three times each instead of 100,000 lines five times each.

    Returns
    -------
    list of Row
        The median times side by side, their ratio against the goal, and how many stream messages
        the frontend received for each.

    Raises
    ------
    AssertionError
        If a cell fails or its output is not every line in order.
    """
    from .__main__ import spread
    from .figures import _row, _verdict

    lines = 10_000 if quick else 100_000
    repeats = 3 if quick else 5
    loop = f"for i in range({lines}):\n    print(i)"
    expected = "".join(f"{i}\n" for i in range(lines))
    foreground: list[float] = []
    process: list[float] = []
    messages = {"foreground": 0, "process": 0}
    with running_kernel(startup_timeout=60) as kernel:
        cell = kernel.execute("%load_ext concur_magics", timeout=60)
        assert cell.status == "ok", cell.text
        _timed(kernel, loop, expected)  # warm up both paths: imports, first fork
        _timed(kernel, "%%timeout 600 --mode process\n" + loop, expected)
        # Alternate, so that a burst of load on a shared machine hits both sides alike.
        for _ in range(repeats):
            seconds, cell = _timed(kernel, loop, expected)
            foreground.append(seconds)
            messages["foreground"] = _streams(cell)
            seconds, cell = _timed(kernel, "%%timeout 600 --mode process\n" + loop, expected)
            process.append(seconds)
            messages["process"] = _streams(cell)
    ratio = statistics.median(process) / statistics.median(foreground)
    return [
        _row(f"process mode: print {lines:,} lines, median (p10–p90)", spread(process),
             f"foreground cell {spread(foreground)}", ratio, f"< {GOAL:g}x", _verdict(ratio < GOAL)),
        _row(f"process mode: stream messages for {lines:,} lines", f"{messages['process']}",
             f"foreground cell {messages['foreground']}", None, "—", "info"),
    ]


def _timed(kernel: Kernel, code: str, expected: str) -> tuple[float, Cell]:
    start = time.perf_counter()
    cell = kernel.execute(code, timeout=600)
    seconds = time.perf_counter() - start
    assert cell.status == "ok", cell.text[-2000:]
    assert cell.stdout == expected, "the lines did not all arrive, in order"
    return seconds, cell


def _streams(cell: Cell) -> int:
    return sum(1 for output in cell.outputs if output["output_type"] == "stream")
