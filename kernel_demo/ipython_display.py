"""IPython's display functions in the demo kernel, which has no IPython shell.

``IPython.display.display``, ``update_display``, ``DisplayHandle`` and ``clear_output`` look for
``InteractiveShell.instance()``: they format with its ``display_formatter`` and publish with its
``display_pub``; without a shell they print. So we register the smallest honest shell: an
``InteractiveShell`` that skips ``InteractiveShell.__init__`` (no history, no magics, no display hook,
no ``sys.excepthook``) and holds only what display needs and what libraries that find it through
``get_ipython()`` read first — ``user_ns``, ``events``, ``config``. Formatting is IPython's own;
publishing goes through ``Kernel.publish`` with the running cell as parent.

Imported only when IPython is installed (see :func:`kernel_demo.execution.Executor.__init__`).
"""

from __future__ import annotations

import importlib.util
import os
import traceback
from typing import TYPE_CHECKING, Any

from IPython.core.displaypub import DisplayPublisher
from IPython.core.events import EventManager, available_events
from IPython.core.formatters import DisplayFormatter
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import SingletonConfigurable

if TYPE_CHECKING:
    from .execution import Executor

__all__ = ["DisplayShell", "install"]


class KernelPublisher(DisplayPublisher):
    """IPython's display publisher, publishing as the demo kernel's own ``display`` does."""

    def __init__(self, shell: DisplayShell, executor: Executor) -> None:
        super().__init__(shell=shell)
        self.executor = executor

    def publish(self, data: dict[str, Any], metadata: dict[str, Any] | None = None, *args: Any,
                transient: dict[str, Any] | None = None, update: bool = False, **kwargs: Any) -> None:
        self.executor.publish_display(data, metadata or {}, transient or {}, update=update)

    def clear_output(self, wait: bool = False) -> None:
        self.executor.clear_output(wait)


class DisplayShell(InteractiveShell):
    """What ``InteractiveShell.instance()`` returns in the demo kernel: a formatter and a publisher.

    ``events`` are triggered around each cell (``pre_execute``, ``post_execute``), so libraries that
    register there (matplotlib's interactive redraw) run as in IPython.
    """

    def __init__(self, executor: Executor) -> None:
        SingletonConfigurable.__init__(self)  # on purpose not InteractiveShell.__init__: no shell
        self.user_ns = executor.namespace
        self.configurables = [self]  # matplotlib's inline backend adds its options here
        self.events = EventManager(self, available_events)
        self.display_formatter = DisplayFormatter(parent=self)
        self.display_pub = KernelPublisher(self, executor)

    def showtraceback(self, *args: Any, **kwargs: Any) -> None:
        """What IPython calls when an event callback fails: the traceback goes to the cell's stderr."""
        traceback.print_exc()


def install(executor: Executor) -> DisplayShell:
    """Create the shell and register it as ``InteractiveShell.instance()`` (and ``get_ipython()``).

    Like ipykernel, make matplotlib's inline backend the default (unless ``MPLBACKEND`` says
    otherwise), so ``plt.show()`` and a cell's figures show as images in the cell.
    """
    if importlib.util.find_spec("matplotlib_inline") is not None:
        os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return DisplayShell.instance(executor)  # sets _instance on every singleton class above it too
