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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import compat
from .kernel_log import KernelLog
from .probe import SchedulerUnreachable, check_address, probe

if TYPE_CHECKING:
    from .jobs import Job
    from .output import CellOutput

__all__ = [
    "ENV_SCHEDULER", "Cluster", "ClusterInfo", "JobOnCluster", "SchedulerUnreachable", "WorkerInfo",
    "check_address",
]

ENV_SCHEDULER = "CONCUR_DASK_SCHEDULER"
TOPIC = "concur-output"
STARTED = "concur-started"
LOGS = "concur-worker-logs"


class Cluster:
    """The Dask client this process uses: lazily connected, closed on unload and shutdown.

    Thread-safe. With no address it starts a :class:`distributed.LocalCluster` (worker processes, one
    per core, on 127.0.0.1) on first use, and closes it on :meth:`close`. With an address it attaches
    to that scheduler, and :meth:`close` only disconnects.

    Attributes
    ----------
    address:
        The scheduler to use. ``None``: the ``CONCUR_DASK_SCHEDULER`` environment variable, or a
        local cluster when that is empty; ``""``: a local cluster. A change takes effect at the next
        use, which connects to the new scheduler before letting go of the one in use.
    security:
        A :class:`distributed.Security` for ``tls://`` schedulers, or None: distributed's own
        configuration (``distributed.comm.tls.*``) applies.
    connect_timeout:
        Seconds a connection attempt may take, whatever the other end does.
    failed:
        ``(address, why)`` of the last attempt that failed, until :meth:`close` forgets it.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._client: Any = None
        self._local: Any = None
        self._key: tuple[str, Any] | None = None  # (address, security) the client was made for
        self.address: str | None = None
        self.security: Any = None
        self.connect_timeout = 5.0
        self.failed: tuple[str, str] | None = None
        self._log = KernelLog()
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

    def target(self) -> str:
        """The scheduler the next use connects to (a full address), or ``""`` for a local cluster.

        Raises
        ------
        SchedulerUnreachable
            If the address (say, from ``CONCUR_DASK_SCHEDULER``) is not a scheduler address.
        """
        address = self._wanted()
        if not address.strip():
            return ""
        try:
            return check_address(address)
        except ValueError as exc:
            raise SchedulerUnreachable(str(exc)) from None

    def _wanted(self) -> str:
        return self.address if self.address is not None else os.environ.get(ENV_SCHEDULER, "")

    def client(self) -> Any:
        """The client, connecting (or starting a local cluster) on first use, or when the address
        or security changed since; the client in use is let go only once the new one works.

        Raises
        ------
        SchedulerUnreachable
            If no Dask scheduler answers at the address within ``connect_timeout`` seconds (the
            message names the address and why), or if jobs of ours still run on the cluster in use.
            A client connected earlier stays connected, and later uses go on with it.
        """
        with self._lock:
            try:
                target = self.target()
            except SchedulerUnreachable as exc:
                self.failed = (self._wanted(), str(exc))
                raise SchedulerUnreachable(f"{exc} (%dask close forgets this address)") from None
            key = (target, self.security)
            if self._client is not None and self._key == key:
                return self._client
            if self._client is not None and self._routes and self._key is not None:
                self.address, self.security = self._key  # later uses go on with the cluster in use
                raise SchedulerUnreachable(
                    f"not switching to {target or 'a local cluster'}: {len(self._routes)} job(s) of "
                    f"this kernel still run on {compat.scheduler_address(self._client)}; wait for them or "
                    "cancel them (%jobs cancel) first"
                )
            self._log.hold()  # what distributed logs while connecting stays out of the cell too
            try:
                client, local = self._start(target)
            except BaseException as exc:
                self._log.release()
                if not isinstance(exc, SchedulerUnreachable):
                    raise
                self.failed = (target, str(exc))
                if self._client is not None and self._key is not None:
                    self.address, self.security = self._key  # later uses go on with what works
                    raise SchedulerUnreachable(
                        f"{exc}; still connected to {compat.scheduler_address(self._client)}"
                    ) from None
                raise SchedulerUnreachable(f"{exc} (%dask close forgets this address)") from None
            previous = self._client is not None
            if previous:
                self._run_close_hooks(f"switched to the Dask scheduler at {compat.scheduler_address(client)}")
            old = (self._client, self._local)
            self._client, self._local, self._key = client, local, key
            self.failed = None
        if previous:
            self._let_go(*old)
        return client

    def _start(self, target: str) -> tuple[Any, Any]:
        """A new client of ``target``, and the LocalCluster it talks to if ``target`` is ``""``."""
        from distributed import Client, LocalCluster

        local = None
        if target:
            probe(target, self.connect_timeout, self.security)
            try:
                client = Client(target, timeout=f"{self.connect_timeout}s", set_as_default=False,
                                security=self.security)
            except Exception as exc:  # noqa: BLE001 - it answered the probe a moment ago
                raise SchedulerUnreachable(
                    f"could not connect to the Dask scheduler at {target}: {type(exc).__name__}: {exc}"
                ) from None
        else:
            local = LocalCluster(
                n_workers=os.cpu_count() or 1,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                silence_logs=logging.CRITICAL,  # failures are shown in the cells they belong to
            )
            client = Client(local, set_as_default=False)
            # Its workers' log records go to the kernel's log, not to the stderr they inherited.
            from .remote import LogForwarding

            client.subscribe_topic(LOGS, _on_worker_log)
            client.register_plugin(LogForwarding(LOGS), name=LogForwarding.name)
        # Output of our cells arrives tagged with its job; other prints keep Dask's handler.
        client.subscribe_topic(TOPIC, self._on_output)
        client.subscribe_topic(STARTED, self._on_started)
        return client, local

    def _run_close_hooks(self, reason: str) -> None:
        for hook in list(self.on_close):
            try:
                hook(reason)
            except Exception as exc:  # noqa: BLE001 - one failing hook must not keep the client open
                print(f"concur_magics: closing the Dask connection: {exc!r}", file=sys.stderr)

    def _let_go(self, client: Any, local: Any) -> None:
        """Close a client (and the local cluster behind it), then give distributed's log back."""
        # Closing never fails the caller (unload, shutdown, %dask close): distributed can raise from
        # its own bookkeeping here, e.g. a KeyError (2026.8) for a worker that was killed meanwhile.
        try:
            for closeable in (client, local):
                if closeable is None:
                    continue
                try:
                    closeable.close(timeout=10)
                except Exception as exc:  # noqa: BLE001 - reported in the kernel's log, not raised
                    logging.getLogger("concur_magics").warning("closing %r failed: %r", closeable, exc)
        finally:
            if client is not None:
                self._log.release()

    def close(self, reason: str = "the Dask connection was closed") -> str:
        """Disconnect; close the local cluster if we started it; forget an address whose last
        connection attempt failed, so the next use doesn't wait on it again. Idempotent.

        The :attr:`on_close` hooks run first (when connected), each given ``reason``.

        Returns
        -------
        str
            What was done, in a line for the user.
        """
        if self._client is not None:
            self._run_close_hooks(reason)
        with self._lock:
            client, local = self._client, self._local
            self._client = self._local = self._key = None
            failed, self.failed = self.failed, None
            if local is not None:
                self.address = None  # the next use reads CONCUR_DASK_SCHEDULER again
            # else keep the address: the next use reconnects to the same cluster
            forgot = ""
            if failed is not None and failed[0] and failed[0] in (self._wanted(), self._target_or_none()):
                self.address = ""
                forgot = (f"forgot {failed[0]}, which could not be used; the next --dask cell "
                          "starts a local cluster (or %dask connect ADDRESS)")
        if client is None:
            done = "not connected"
        elif local is not None:
            done = "closed the local cluster"
        else:
            done = f"disconnected from {compat.scheduler_address(client)}"
        self._let_go(client, local)
        return f"{done}\n{forgot}" if forgot else done

    def _target_or_none(self) -> str | None:
        try:
            return self.target()
        except SchedulerUnreachable:
            return None

    def info(self, jobs: Iterable[Job] = ()) -> ClusterInfo:
        """What ``%dask`` shows: scheduler, dashboard, workers, and ``jobs`` (this kernel's
        ``--dask`` jobs) that are running on the cluster."""
        client = self.client()
        workers = compat.scheduler_workers(client)
        return ClusterInfo(
            address=compat.scheduler_address(client),
            ours=self.ours,
            workers=len(workers),
            threads=sum(w.get("nthreads", 0) for w in workers.values()),
            memory=sum(w.get("memory_limit", 0) or 0 for w in workers.values()),
            dashboard=client.dashboard_link if _has_dashboard(client) else None,
            worker_list=[
                WorkerInfo(address, w.get("nthreads", 0), w.get("memory_limit", 0) or 0)
                for address, w in sorted(workers.items())
            ],
            jobs=[JobOnCluster(job.id, job.name or "", job.status, job.elapsed) for job in jobs],
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

        # The client the task was sent with: stopping never connects, nor switches clusters.
        client = self._client if self._client is not None else self.client()
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
class WorkerInfo:
    """One worker of the cluster, as ``%dask`` lists it."""

    address: str
    threads: int
    memory: int  # bytes; 0 when the worker has no limit


@dataclass
class JobOnCluster:
    """One of this kernel's ``--dask`` jobs that is running on the cluster."""

    id: int
    name: str
    status: str
    elapsed: float


@dataclass
class ClusterInfo:
    """A summary of the cluster, as text and HTML: scheduler, dashboard, workers, our jobs."""

    address: str
    ours: bool
    workers: int
    threads: int
    memory: int
    dashboard: str | None
    worker_list: list[WorkerInfo] = field(default_factory=list)
    jobs: list[JobOnCluster] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "local cluster started by concur_magics" if self.ours else "existing cluster"

    def __repr__(self) -> str:
        lines = [
            f"Dask scheduler {self.address} ({self.kind})",
            f"workers: {self.workers}, threads: {self.threads}, memory: {_gib(self.memory)}",
        ]
        if self.dashboard:
            lines.append(f"dashboard: {self.dashboard}")
        if self.worker_list:
            width = max(len(w.address) for w in self.worker_list)
            lines.append("")
            lines.append(f"{'worker':<{width}}  threads  memory")
            lines += [f"{w.address:<{width}}  {w.threads:<7}  {_gib(w.memory)}" for w in self.worker_list]
        lines.append("")
        if self.jobs:
            lines.append("jobs of this kernel on the cluster:")
            lines += [f"  #{j.id}{' ' + j.name if j.name else ''}  {j.status}  {j.elapsed:.1f} s"
                      for j in self.jobs]
        else:
            lines.append("no jobs of this kernel on the cluster")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        e = html.escape
        # JupyterLab's and Notebook's table style aligns cells right: these are words, not numbers.
        left = "style='text-align:left'"
        link = (
            f"<a href='{e(self.dashboard)}' target='_blank'>{e(self.dashboard)}</a>"
            if self.dashboard else "not available (install bokeh)"
        )
        parts = [
            f"<p><b>Dask scheduler</b> <code>{e(self.address)}</code> ({self.kind})<br>"
            f"workers: {self.workers}, threads: {self.threads}, memory: {_gib(self.memory)}<br>"
            f"dashboard: {link}</p>"
        ]
        if self.worker_list:
            rows = "".join(
                f"<tr><td {left}><code>{e(w.address)}</code></td><td {left}>{w.threads}</td>"
                f"<td {left}>{_gib(w.memory)}</td></tr>" for w in self.worker_list
            )
            parts.append(f"<table><thead><tr><th {left}>worker</th><th {left}>threads</th>"
                         f"<th {left}>memory</th></tr></thead><tbody>{rows}</tbody></table>")
        if self.jobs:
            rows = "".join(
                f"<tr><td {left}>{j.id}</td><td {left}>{e(j.name)}</td><td {left}>{e(j.status)}</td>"
                f"<td {left}>{j.elapsed:.1f} s</td></tr>" for j in self.jobs
            )
            parts.append(f"<p>jobs of this kernel on the cluster:</p><table><thead><tr>"
                         f"<th {left}>id</th><th {left}>name</th><th {left}>status</th>"
                         f"<th {left}>elapsed</th></tr></thead><tbody>{rows}</tbody></table>")
        else:
            parts.append("<p>no jobs of this kernel on the cluster</p>")
        return "".join(parts)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "no limit"


def _has_dashboard(client: Any) -> bool:
    try:
        return "dashboard" in client.scheduler_info().get("services", {})
    except Exception:  # noqa: BLE001 - an informational field only
        return False



def _on_worker_log(event: tuple[float, dict[str, Any]]) -> None:
    """A log record from a worker of our local cluster: into the kernel's own log (the kernel
    process's real stderr), never into a cell; outside a kernel, distributed's logger."""
    _, msg = event
    target = compat.kernel_log() or logging.getLogger("distributed")
    target.log(int(msg.get("level", logging.WARNING)), "[Dask worker pid %s] %s", msg.get("pid"), msg.get("message"))
