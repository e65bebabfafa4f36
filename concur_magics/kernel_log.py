"""distributed's log records in the kernel go to the kernel's log, not into a cell.

distributed configures its ``distributed`` logger with a handler on ``sys.stderr`` as it was when
distributed was imported; in a kernel that is ipykernel's stream, whose text lands in whichever
cell is running. While our Dask client exists (see :class:`~concur_magics.cluster.Cluster`),
:class:`KernelLog` takes those handlers off the ``distributed`` loggers and hands each record to
the kernel's own logger instead, which writes to the kernel process's real stderr (the terminal or
the server log, never a notebook) at the level the kernel's log was given. :meth:`KernelLog.release`
of the last holder puts every handler and ``propagate`` flag back as it was.

Outside a kernel (a terminal IPython, a script) nothing is changed: stderr is already the log.
"""

from __future__ import annotations

import logging
import threading
from . import compat

__all__ = ["KernelLog"]

ROOT = "distributed"


class _ToKernelLog(logging.Handler):
    """Hands records to the kernel's logger; its handlers' levels decide what is written."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.target.handle(record)
        except Exception:  # noqa: BLE001 - logging must never fail the code that logs
            self.handleError(record)


class KernelLog:
    """While held, distributed's loggers in this process write to the kernel's log.

    Reference-counted and thread-safe: :meth:`hold` and :meth:`release` may be called from any
    thread, as long as each hold is released once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._handler: _ToKernelLog | None = None
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []

    @property
    def active(self) -> bool:
        """Whether distributed's records go to the kernel's log now."""
        return self._handler is not None

    def hold(self) -> None:
        with self._lock:
            self._holders += 1
            if self._holders == 1:
                self._install()

    def release(self) -> None:
        with self._lock:
            if self._holders == 0:
                return
            self._holders -= 1
            if self._holders == 0:
                self._restore()

    def _install(self) -> None:
        target = compat.kernel_log()
        if target is None:
            return
        import distributed  # noqa: F401 - its import configures the loggers we take over

        self._handler = _ToKernelLog(target)
        self._saved = []
        for logger in _distributed_loggers():
            self._saved.append((logger, list(logger.handlers), logger.propagate))
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            # Children hand their records up to "distributed", which hands them to the kernel.
            logger.propagate = logger.name != ROOT
        root = logging.getLogger(ROOT)
        root.addHandler(self._handler)

    def _restore(self) -> None:
        handler, saved = self._handler, self._saved
        self._handler, self._saved = None, []
        if handler is None:
            return
        logging.getLogger(ROOT).removeHandler(handler)
        for logger, handlers, propagate in saved:
            for previous in handlers:
                if previous not in logger.handlers:
                    logger.addHandler(previous)
            logger.propagate = propagate


def _distributed_loggers() -> list[logging.Logger]:
    """The ``distributed`` logger, and those below it that have handlers of their own."""
    loggers = [logging.getLogger(ROOT)]
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith(ROOT + ".") and isinstance(logger, logging.Logger) and logger.handlers:
            loggers.append(logger)
    return loggers
