"""Load and unload the extension: register the magics, and create and close the one owner."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from . import compat
from .magics import ConcurMagics
from .runtime import Runtime
from .transform import await_loop_magics

__all__ = ["Extension"]


class Extension:
    """The extension loaded into one shell: its magics, its transformer and its :class:`Runtime`.

    :meth:`close` (unload, kernel shutdown) closes the runtime, which stops everything the magics
    started. It is idempotent and may be called from any thread.
    """

    _loaded: ClassVar[dict[int, Extension]] = {}

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.runtime = Runtime.activate(shell)
        self.magics = ConcurMagics(shell=shell)
        self.transformer = await_loop_magics(shell)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, shell: Any) -> Extension:
        """Register the magics with ``shell`` (again, if already loaded, it is a no-op)."""
        existing = cls._loaded.get(id(shell))
        if existing is not None:
            return existing
        ext = cls(shell)
        shell.register_magics(ext.magics)
        shell.input_transformers_post.append(ext.transformer)
        shell.events.register("pre_execute", ext.runtime.activity.started)
        shell.events.register("post_execute", ext.runtime.activity.finished)
        cls._loaded[id(shell)] = ext
        return ext

    @classmethod
    def unload(cls, shell: Any) -> None:
        """Undo :meth:`load` and close everything the extension started."""
        ext = cls._loaded.pop(id(shell), None)
        if ext is None:
            return
        compat.unregister_magics(shell, ext.magics)
        if ext.transformer in shell.input_transformers_post:
            shell.input_transformers_post.remove(ext.transformer)
        shell.events.unregister("pre_execute", ext.runtime.activity.started)
        shell.events.unregister("post_execute", ext.runtime.activity.finished)
        ext.close()

    def close(self) -> None:
        """Stop everything the extension started. Idempotent; thread-safe."""
        Runtime.deactivate(self.runtime)
