"""Exit with the process that launched the kernel, so no kernel outlives its frontend.

A frontend that dies without asking for ``shutdown`` (killed, crashed, its terminal closed) leaves
its kernel running with nobody to stop it. So the kernel watches who launched it:

- its **parent** at start-up: when that process exits, the kernel is handed to another one (pid 1
  or a subreaper), and that is the sign;
- ``JPY_PARENT_PID``, which jupyter_client sets to the launcher's pid, in case a wrapper (``sh -c``,
  ``conda run``) stands between the launcher and the kernel. ``JPY_PARENT_PID=0`` means, as in
  ipykernel, that there is no launcher to watch: the kernel then watches nothing at all.

On Linux each watched process is a pidfd on the control loop, readable the moment the process
exits; elsewhere the control loop looks once a second, as ipykernel's parent poller does. The
control loop keeps running while a cell computes, so the kernel notices even then.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from tornado.ioloop import IOLoop, PeriodicCallback

__all__ = ["ParentWatch", "launchers"]


def launchers() -> list[int]:
    """The pids to watch: the parent at start-up and ``JPY_PARENT_PID``; none if it is ``0``."""
    named = os.environ.get("JPY_PARENT_PID", "").strip()
    if named == "0":
        return []
    pids = [os.getppid()] + ([int(named)] if named.isdigit() else [])
    # pid 1 (init, or a container's first process) is not a launcher that can go away.
    return sorted({pid for pid in pids if pid > 1})


class ParentWatch:
    """Call ``on_gone(reason)`` once, when a launcher of this kernel has exited.

    :meth:`start` and :meth:`close` run on the loop that watches (the control loop's thread).
    """

    def __init__(self, on_gone: Callable[[str], None]) -> None:
        self.ppid = os.getppid()
        self.pids = launchers()
        self.on_gone = on_gone
        self._fds: list[int] = []
        self._poll: PeriodicCallback | None = None
        self._fired = False

    def start(self) -> None:
        loop = IOLoop.current()
        try:
            for pid in self.pids:
                fd = os.pidfd_open(pid)
                self._fds.append(fd)
                loop.add_handler(fd, functools.partial(self._exited, pid), IOLoop.READ)
        except ProcessLookupError:
            pass  # already gone: the check below says so
        except (AttributeError, OSError):  # no pidfds (not Linux 5.3+): look once a second
            self._poll = PeriodicCallback(self._check, 1000)
            self._poll.start()
        # A launcher may have exited while we started (and its pid been reused by now).
        self._check()

    def _check(self) -> None:
        for pid in self.pids:
            if not self._alive(pid):
                self._gone(pid)

    def _alive(self, pid: int) -> bool:
        if pid == self.ppid:
            return os.getppid() == pid  # our parent: alive as long as it is still our parent
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # it exists, as another user's process
        return True

    def _exited(self, pid: int, fd: int, events: int) -> None:
        self._gone(pid)  # a pidfd is readable once its process has exited

    def _gone(self, pid: int) -> None:
        if not self._fired:
            self._fired = True
            self.close()  # an exited process's pidfd stays readable: it would wake the loop forever
            which = "parent process" if pid == self.ppid else "launcher (JPY_PARENT_PID)"
            self.on_gone(f"its {which} {pid} exited")

    def close(self) -> None:
        if self._poll is not None:
            self._poll.stop()
        loop = IOLoop.current()
        for fd in self._fds:
            loop.remove_handler(fd)
            os.close(fd)
        self._fds.clear()
