"""The README's first command: the headless tour runs and shows every magic working."""

from __future__ import annotations

import subprocess
import sys


def test_tour_shows_every_magic() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "concur_magics.tour"], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for shown in [
        "CellTimeout: time limit of 1 s exceeded (mode: signal); stopped: CellTimeout was raised",
        "CellTimeout: time limit of 1 s exceeded (mode: process); stopped: its process and process group",
        "stopped: the cell's task was cancelled at its await",
        "UsageError: argument seconds: expected a positive number of seconds",
        "Out │ ([0, 1, 4, 9, 16], True)",
        "Out │ tick 0\n  Out │ tick 1\n  Out │ tick 2\n  Out │ 'ticked'",
        "Out │ from a thread the job started\n  Out │ from a subprocess the job ran",
        "Out │ only this cell's line\n\n",
        "Out │ ── <Job #2 helpers [thread] done",
        "Out │ 'all slept'",
        "Out │ ZeroDivisionError: division by zero",
        "Out │ ('done', 'ticked', 3)",
        "Out │ (True, 0)",
        "Out │ run 1\n  Out │ run 2\n  Out │ run 3",
        "Out │ ('done', 3)",
        "Out │ hello from the worker process True",
        "Out │ (90, 90)",
        "(mode: dask); stopped: the Dask task was cancelled and the worker process running it was killed",
        "Out │ 'still serving'",
        "(local cluster started by concur_magics)",
    ]:
        assert shown in out, f"{shown!r} missing from the tour:\n{out}"
