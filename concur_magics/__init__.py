"""Run notebook cells alongside other work: ``%load_ext concur_magics``.

The magics are thin wrappers over a plain-Python API that works without IPython too::

    from concur_magics import CellTimeout, background, run_with_timeout, timeout

    job = background(fetch_all)        # a Job: result(), cancel(), status, await job

    with timeout(2):
        slow_call()
    run_with_timeout(slow_call, 2, mode="process")
"""

from __future__ import annotations

from typing import Any

from .cells import CompiledCell, compile_cell
from .jobs import Job
from .process import NamesNotCopiedWarning
from .runners import background
from .timeout import CellTimeout, run_cell_with_timeout, run_with_timeout, timeout

__all__ = [
    "CellTimeout",
    "CompiledCell",
    "Job",
    "NamesNotCopiedWarning",
    "background",
    "compile_cell",
    "load_ipython_extension",
    "run_cell_with_timeout",
    "run_with_timeout",
    "timeout",
    "unload_ipython_extension",
]

__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics and what they need (``%load_ext concur_magics``)."""
    from .lifetime import Extension

    Extension.load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Remove the magics and close everything the extension started (``%unload_ext``)."""
    from .lifetime import Extension

    Extension.unload(ipython)
