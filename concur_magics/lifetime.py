"""The one owner of everything the extension starts, and its load / unload."""

from __future__ import annotations

import asyncio
import atexit
import threading
from typing import Any, ClassVar

from . import cluster, process, runners, schedule
from .jobs import JOBS, CellActivity
from .magics import ConcurMagics
from .timeout import install_handler, uninstall_handler
from .transform import await_loop_magics

__all__ = ["Extension"]


class Extension:
    """The extension loaded into one shell: its magics, its transformer, and what they started.

    :meth:`close` (unload, kernel shutdown) stops everything the magics start — clocks, jobs and
    their threads, schedules, process-mode children, the Dask client and a local cluster — each
    through the registry that owns it. It is idempotent and may be called from any thread.
    """

    _loaded: ClassVar[dict[int, Extension]] = {}

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.magics = ConcurMagics(shell=shell)
        self.transformer = await_loop_magics(shell)
        self.children = process.Children()
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def load(cls, shell: Any) -> Extension:
        """Register the magics with ``shell`` (again, if already loaded, it is a no-op)."""
        existing = cls._loaded.get(id(shell))
        if existing is not None:
            return existing
        ext = cls(shell)
        shell.register_magics(ext.magics)
        shell.input_transformers_post.append(ext.transformer)
        shell.events.register("pre_execute", CellActivity.started)
        shell.events.register("post_execute", CellActivity.finished)
        if threading.current_thread() is threading.main_thread():
            install_handler()
        try:
            runners.kernel_loop = asyncio.get_running_loop()
        except RuntimeError:
            pass  # a terminal IPython: loop jobs use whatever loop runs when they start
        atexit.register(ext.close)
        cls._loaded[id(shell)] = ext
        return ext

    @classmethod
    def unload(cls, shell: Any) -> None:
        """Undo :meth:`load` and close everything the extension started."""
        ext = cls._loaded.pop(id(shell), None)
        if ext is None:
            return
        manager = shell.magics_manager
        for kind, table in ext.magics.magics.items():
            for name in table:
                registered = manager.magics[kind].get(name)
                if getattr(registered, "__self__", None) is ext.magics:
                    del manager.magics[kind][name]
        manager.registry.pop(type(ext.magics).__name__, None)
        if ext.transformer in shell.input_transformers_post:
            shell.input_transformers_post.remove(ext.transformer)
        shell.events.unregister("pre_execute", CellActivity.started)
        shell.events.unregister("post_execute", CellActivity.finished)
        atexit.unregister(ext.close)
        ext.close()

    def close(self) -> None:
        """Stop everything the extension started. Idempotent; thread-safe."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        schedule.stop_clocks()
        stuck = JOBS.cancel_all(join=2.0)
        if stuck:
            names = ", ".join(job.label for job in stuck)
            print(f"concur_magics: jobs still running after cancel (stuck in C code?): {names}")
        runners.kernel_loop = None
        self.children.kill_all()
        cluster.CLUSTER.close()
        if threading.current_thread() is threading.main_thread():
            uninstall_handler()
