"""The Dask connection: a local cluster by default, an existing cluster by address.

:class:`Cluster` is the connection only: the client (lazily connected), what ``%dask`` shows, where
a job's task started, and how to stop a task for real. Sending cells to Dask is
:mod:`concur_magics.dask_jobs`; what runs on a worker is :mod:`concur_magics.remote`. Code that
keeps state tied to the connection (running jobs, what it installed on the workers) registers a
hook in :attr:`Cluster.on_close`, called before the client closes.

Stopping: Dask's ``cancel`` forgets a task but leaves it running in its worker thread. To really stop
it we cancel the future and then ask the Nanny of the worker that runs it to SIGKILL its worker
process; the Nanny starts a fresh worker, and the cluster keeps serving.
"""

from __future__ import annotations

import html
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .output import CellOutput

__all__ = ["ENV_SCHEDULER", "Cluster", "ClusterInfo"]

ENV_SCHEDULER = "CONCUR_DASK_SCHEDULER"
TOPIC = "concur-output"
STARTED = "concur-started"


class Cluster:
    """The Dask client this process uses: lazily connected, closed on unload and shutdown.

    Thread-safe. With no address it starts a :class:`distributed.LocalCluster` (worker processes, one
    per core, on 127.0.0.1) on first use, and closes it on :meth:`close`. With an address it attaches
    to that scheduler, and :meth:`close` only disconnects.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._client: Any = None
        self._local: Any = None
        self.address: str | None = None
        self.connect_timeout = 5.0
        self._routes: dict[str, CellOutput] = {}
        self._started: dict[str, dict[str, Any]] = {}
        self._started_cond = threading.Condition(self._lock)
        # Called with a reason at the start of close(), while the client still works: job code
        # ends its jobs and removes what it installed on the workers.
        self.on_close: list[Callable[[str], None]] = []

    # ------------------------------------------------------------------ connection
    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def ours(self) -> bool:
        """Whether the scheduler is a LocalCluster we started (and will close)."""
        return self._local is not None

    def client(self, address: str | None = None) -> Any:
        """The client, connecting (or starting a local cluster) on first use.

        Raises
        ------
        ConnectionError
            If the scheduler at ``address`` can't be reached within ``connect_timeout`` seconds.
        """
        with self._lock:
            if self._client is not None:
                return self._client
            from distributed import Client, LocalCluster

            address = address or self.address or os.environ.get(ENV_SCHEDULER) or None
            if address:
                try:
                    client = Client(address, timeout=f"{self.connect_timeout}s", set_as_default=False)
                except OSError as exc:
                    raise ConnectionError(
                        f"could not reach the Dask scheduler at {address} within "
                        f"{self.connect_timeout:g} s: {exc}"
                    ) from None
            else:
                self._local = LocalCluster(
                    n_workers=os.cpu_count() or 1,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address="127.0.0.1:0",
                    silence_logs=logging.CRITICAL,  # failures are shown in the cells they belong to
                )
                client = Client(self._local, set_as_default=False)
            # Output of our cells arrives tagged with its job; other prints keep Dask's handler.
            client.subscribe_topic(TOPIC, self._on_output)
            client.subscribe_topic(STARTED, self._on_started)
            self._client = client
            self.address = client.scheduler.address
            return client

    def close(self, reason: str = "the Dask connection was closed") -> None:
        """Disconnect; close the local cluster if we started it. Idempotent.

        The :attr:`on_close` hooks run first (when connected), each given ``reason``.
        """
        if self._client is not None:
            for hook in list(self.on_close):
                try:
                    hook(reason)
                except Exception as exc:  # noqa: BLE001 - one failing hook must not keep the client open
                    print(f"concur_magics: closing the Dask connection: {exc!r}", file=sys.stderr)
        with self._lock:
            client, local = self._client, self._local
            self._client = self._local = None
            if local is None:
                pass  # keep the address: the next use reconnects to the same cluster
            else:
                self.address = None
        if client is not None:
            client.close(timeout=10)
        if local is not None:
            local.close(timeout=10)

    def info(self) -> ClusterInfo:
        """What ``%dask`` shows: scheduler, workers, threads, memory, dashboard."""
        client = self.client()
        workers = client.scheduler_info(n_workers=-1)["workers"]
        return ClusterInfo(
            address=client.scheduler.address,
            ours=self.ours,
            workers=len(workers),
            threads=sum(w.get("nthreads", 0) for w in workers.values()),
            memory=sum(w.get("memory_limit", 0) for w in workers.values()),
            dashboard=client.dashboard_link if _has_dashboard(client) else None,
        )

    # ------------------------------------------------------------------ events
    def _on_output(self, event: tuple[float, dict[str, str]]) -> None:
        _, msg = event
        out = self._routes.get(msg.get("job", ""))
        if out is not None:
            out.write(msg.get("name", "stdout"), msg.get("text", ""))

    def _on_started(self, event: tuple[float, dict[str, Any]]) -> None:
        _, msg = event
        if msg.get("job") not in self._routes:
            return  # another kernel's job on the same cluster
        with self._started_cond:
            self._started[msg["job"]] = msg
            self._started_cond.notify_all()

    def route(self, token: str, out: CellOutput) -> None:
        self._routes[token] = out

    def unroute(self, token: str) -> None:
        self._routes.pop(token, None)
        with self._lock:
            self._started.pop(token, None)

    def where(self, token: str, wait: float = 0.0) -> dict[str, Any] | None:
        """Where a job's task started (worker address, pid), waiting up to ``wait`` seconds."""
        deadline = time.monotonic() + wait
        with self._started_cond:
            while token not in self._started:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._started_cond.wait(remaining)
            return self._started[token]

    def stop(self, future: Any, token: str) -> str:
        """Really stop a task: cancel it, then have its worker process killed. Returns what was done."""
        from .dask_jobs import shipped
        from .remote import _exit_worker_process, _kill_worker_process

        client = self.client()
        client.cancel([future], force=True)
        place = self.where(token, wait=0.3)
        if place is None:
            return "cancelled before it started"
        worker, pid = place["worker"], place["pid"]
        try:
            client.run(shipped(_kill_worker_process), pid, workers=[worker], nanny=True)
            how = f"worker pid {pid} at {worker}, killed by its nanny"
        except Exception:  # noqa: BLE001 - no nanny: ask the worker to end itself
            client.run(shipped(_exit_worker_process), workers=[worker], on_error="ignore")
            how = f"worker pid {pid} at {worker}, ended (it has no nanny)"
        return how


def _cluster() -> Cluster:
    """The Dask connection of the current owner (see :mod:`concur_magics.runtime`)."""
    from .runtime import Runtime

    return Runtime.current().cluster


@dataclass
class ClusterInfo:
    """A summary of the cluster, as text and HTML."""

    address: str
    ours: bool
    workers: int
    threads: int
    memory: int
    dashboard: str | None

    def __repr__(self) -> str:
        kind = "local cluster started by concur_magics" if self.ours else "existing cluster"
        lines = [
            f"Dask scheduler {self.address} ({kind})",
            f"workers: {self.workers}, threads: {self.threads}, memory: {self.memory / 2**30:.1f} GiB",
        ]
        if self.dashboard:
            lines.append(f"dashboard: {self.dashboard}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        link = (
            f"<a href='{html.escape(self.dashboard)}' target='_blank'>{html.escape(self.dashboard)}</a>"
            if self.dashboard else "not available (install bokeh)"
        )
        kind = "local cluster started by concur_magics" if self.ours else "existing cluster"
        return (
            f"<table><tr><th>scheduler</th><td><code>{html.escape(self.address)}</code> ({kind})</td></tr>"
            f"<tr><th>workers</th><td>{self.workers}</td></tr><tr><th>threads</th><td>{self.threads}</td></tr>"
            f"<tr><th>memory</th><td>{self.memory / 2**30:.1f} GiB</td></tr>"
            f"<tr><th>dashboard</th><td>{link}</td></tr></table>"
        )


def _has_dashboard(client: Any) -> bool:
    try:
        return "dashboard" in client.scheduler_info().get("services", {})
    except Exception:  # noqa: BLE001 - an informational field only
        return False

