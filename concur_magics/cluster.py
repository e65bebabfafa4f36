"""Run cells on Dask: a local cluster by default, an existing cluster by address.

A cell sent to Dask is compiled here (IPython's transformers run in the kernel), and shipped as
Python source with the names it reads from the namespace; a :class:`Job` or Dask future among them
is passed as a Dask dependency, so the cluster — not the notebook — waits for it. On the worker the
cell runs in a fresh namespace; its last expression and the names it binds come back and are bound
in the notebook's namespace on the kernel's loop (never from another thread).

Output: on the worker, ``sys.stdout``/``sys.stderr`` and ``distributed.print`` are routed, for code
running one of our cells, to a Dask event topic tagged with the job; the kernel's client subscribes to
that topic and writes each piece into the cell that started the job.

Stopping: Dask's ``cancel`` forgets a task but leaves it running in its worker thread. To really stop
it we cancel the future and then ask the Nanny of the worker that runs it to SIGKILL its worker
process; the Nanny starts a fresh worker, and the cluster keeps serving.
"""

from __future__ import annotations

import contextvars
import html
import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .cells import CompiledCell, compile_cell
from .deadlines import CellTimeout
from .jobs import Job
from .output import CellOutput
from .tracebacks import carried_frames, rebuilt_frames

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["ENV_SCHEDULER", "Cluster", "background_dask", "run_cell_on_dask"]

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

    def close(self) -> None:
        """Disconnect; close the local cluster if we started it. Idempotent."""
        with self._lock:
            client, local = self._client, self._local
            self._client = self._local = None
            if local is None:
                pass  # keep the address: the next use reconnects to the same cluster
            else:
                self.address = None
        # Closing never fails the caller (unload, shutdown, %dask close): distributed can raise from
        # its own bookkeeping here, e.g. a KeyError (2026.8) for a worker that was killed meanwhile.
        for closeable in (client, local):
            if closeable is None:
                continue
            try:
                closeable.close(timeout=10)
            except Exception as exc:  # noqa: BLE001 - reported in the kernel's log, not raised
                logging.getLogger("concur_magics").warning("closing %r failed: %r", closeable, exc)

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
        client = self.client()
        client.cancel([future], force=True)
        place = self.where(token, wait=0.3)
        if place is None:
            return "cancelled before it started"
        worker, pid = place["worker"], place["pid"]
        try:
            client.run(_kill_worker_process, pid, workers=[worker], nanny=True)
            how = f"worker pid {pid} at {worker}, killed by its nanny"
        except Exception:  # noqa: BLE001 - no nanny: ask the worker to end itself
            client.run(_exit_worker_process, workers=[worker], on_error="ignore")
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


# --------------------------------------------------------------------------- submitting

_tokens = itertools.count(1)


@dataclass
class Shipment:
    """A cell ready to go to a worker."""

    cell: CompiledCell
    inputs: dict[str, Any]
    waits_for: list[Job] = field(default_factory=list)  # non-Dask jobs to finish first
    token: str = ""


def prepare(cell: CompiledCell, namespace: dict[str, Any], shell: Any = None) -> Shipment:
    """Collect the inputs a cell reads; Jobs become Dask futures (or things to wait for)."""
    from distributed import Future

    inputs: dict[str, Any] = {}
    waits: list[Job] = []
    for name in sorted(cell.reads):
        if name not in namespace:
            continue
        value = namespace[name]
        if isinstance(value, Job):
            future = _value_future(value)
            if future is not None:
                value = future
            else:
                waits.append(value)
        elif not isinstance(value, Future) and isinstance(value, type(sys)):
            continue  # modules: the cell's own imports bring them on the worker
        inputs[name] = value
    return Shipment(cell, inputs, waits, f"{os.getpid()}-{next(_tokens)}")


def _value_future(job: Job) -> Any:
    """A Dask future of a dask job's value (its task returns the value and the names it bound)."""
    future = job._dask_future
    if future is None:
        return None
    value = getattr(job, "_dask_value", None)
    if value is None:
        value = future.client.submit(_first, future, key=f"{future.key}-value", pure=False)
        job._dask_value = value  # type: ignore[attr-defined]
    return value


def _first(outcome: tuple[Any, Any]) -> Any:
    return outcome[0]


def submit(shipment: Shipment) -> Any:
    """Submit a prepared cell; return its Dask future.

    Raises
    ------
    TypeError
        Naming the inputs that can't be serialised.
    """
    __tracebackhide__ = True
    client = _cluster().client()
    inputs = {
        name: (value.result() if isinstance(value, Job) else value)
        for name, value in shipment.inputs.items()
    }
    try:
        cell = shipment.cell
        return client.submit(
            run_remote, cell.source, cell.filename, cell.first_line, inputs, shipment.token,
            key=f"concur-cell-{shipment.token}", pure=False, retries=0,
        )
    except Exception:
        bad = _unpicklable(inputs)
        if bad:
            raise TypeError(f"can't send to Dask, these inputs can't be serialised: {', '.join(bad)}") from None
        raise


def _unpicklable(inputs: dict[str, Any]) -> list[str]:
    import cloudpickle
    from distributed import Future

    bad = []
    for name, value in inputs.items():
        if isinstance(value, Future):
            continue
        try:
            cloudpickle.dumps(value)
        except Exception as exc:  # noqa: BLE001 - we report which one, and why
            bad.append(f"{name} ({type(value).__name__}: {exc})")
    return bad


def background_dask(
    runtime: Runtime,
    source: str,
    *,
    name: str | None = None,
    timeout: float | None = None,
    shell: Any = None,
    namespace: dict[str, Any] | None = None,
    first_line: int = 1,
    cell: str | None = None,
    run: str | None = None,
) -> Job:
    """Run cell ``source`` on a Dask worker as a background Job of ``runtime``.

    The names the cell binds come back into the namespace on the kernel's loop (when there is one).
    """
    cluster = runtime.cluster
    ns = namespace if namespace is not None else (shell.user_ns if shell is not None else {})
    compiled = compile_cell(source, shell=shell, first_line=first_line)
    shipment = prepare(compiled, ns, shell)
    cluster.client()  # connect (or start the local cluster) now, so errors show in this cell
    out = CellOutput(shell)
    job = runtime.jobs.add(Job(source, "dask", name, out=out, limit=timeout, cell=cell, run=run))
    cluster.route(shipment.token, out)
    stopping = threading.Lock()

    def finish(status: str, value: Any = None, error: BaseException | None = None,
               names: dict[str, Any] | None = None) -> None:
        def on_loop() -> None:
            if names:
                ns.update(names)
            job.settle(status, value, error)
            cluster.unroute(shipment.token)

        loop = runtime.kernel_loop()
        if loop is not None:
            loop.call_soon_threadsafe(on_loop)
        else:
            on_loop()

    def stop_remote() -> None:
        future = getattr(job, "_dask_future", None)
        how = cluster.stop(future, shipment.token) if future is not None else "before it started"
        status = job._stopping or "cancelled"
        error = CellTimeout(job.limit or 0.0, "dask", "worker", f"({how})") if status == "timeout" else None
        finish(status, error=error)

    def interrupt() -> None:
        if stopping.acquire(blocking=False):  # one remote stop, however often we are asked
            threading.Thread(target=stop_remote, name=f"concur-dask-stop-{job.id}", daemon=True).start()

    def start() -> None:
        if job.done():
            return
        try:
            future = submit(shipment)
        except Exception as exc:  # noqa: BLE001 - shown in the cell, job status error
            finish("error", error=exc)
            return
        job._dask_future = future  # type: ignore[attr-defined]
        future.add_done_callback(
            lambda f: threading.Thread(target=collect, args=(f,), name="concur-dask-result", daemon=True).start()
        )

    def collect(future: Any) -> None:
        if job.done() or future.cancelled() or future.status == "cancelled":
            return
        try:
            value, names = future.result()
        except Exception as exc:  # noqa: BLE001 - the remote failure, with its traceback
            finish("error", error=_explain(_rendered(exc)))
            return
        finish("done", value, names=names)

    job.begin(interrupt, runtime.deadlines.call_later)
    if shipment.waits_for:
        pending = list(shipment.waits_for)
        remaining = [len(pending)]
        lock = threading.Lock()

        def one_done(_: Job) -> None:
            with lock:
                remaining[0] -= 1
                ready = remaining[0] == 0
            if ready:
                start()

        for dependency in pending:
            dependency.add_done_callback(one_done)
    else:
        start()
    return job


def _rendered(exc: BaseException) -> BaseException:
    """``exc`` with the user's frames the worker sent (:func:`run_remote`) as its traceback.

    The kernel formats them: it knows each cell's label and source, which a worker does not.
    """
    frames = getattr(exc, "_concur_frames", None)
    return exc.with_traceback(rebuilt_frames(frames)) if frames else exc


def _explain(exc: BaseException) -> BaseException:
    if type(exc).__name__ == "KilledWorker":
        return RuntimeError(f"the Dask worker running this job died (after Dask's retries): {exc}")
    return exc


def run_cell_on_dask(cell: CompiledCell, namespace: dict[str, Any], limit: float, shell: Any = None) -> Any:
    """Run a cell on a worker in the foreground; at ``limit`` seconds stop it for real.

    Raises
    ------
    CellTimeout
        At the deadline, after the task was cancelled and its worker process killed.
    """
    __tracebackhide__ = True
    import distributed

    shipment = prepare(cell, namespace, shell)
    for dependency in shipment.waits_for:
        dependency.result()
    cluster = _cluster()
    cluster.route(shipment.token, CellOutput(shell))
    try:
        future = submit(shipment)
        try:
            value, names = future.result(timeout=limit)
        except distributed.TimeoutError:
            how = cluster.stop(future, shipment.token)
            raise CellTimeout(limit, "dask", "worker", f"({how})") from None
        except KeyboardInterrupt:
            cluster.stop(future, shipment.token)
            raise
        except Exception as exc:
            raise _rendered(exc)  # noqa: B904 - the remote exception itself, shown as the worker saw it
        namespace.update(names)
        return value
    finally:
        cluster.unroute(shipment.token)


def run_call_on_dask(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], limit: float) -> Any:
    """Call ``fn(*args, **kwargs)`` on a worker; at ``limit`` seconds stop it for real."""
    import distributed

    token = f"{os.getpid()}-{next(_tokens)}"
    cluster = _cluster()
    cluster.route(token, CellOutput(None))
    try:
        future = cluster.client().submit(
            run_remote_call, fn, args, kwargs, token, key=f"concur-call-{token}", pure=False, retries=0
        )
        try:
            return future.result(timeout=limit)
        except distributed.TimeoutError:
            how = cluster.stop(future, token)
            raise CellTimeout(limit, "dask", "worker", f"({how})") from None
    finally:
        cluster.unroute(token)


# --------------------------------------------------------------------------- on the worker

_JOB: contextvars.ContextVar[str | None] = contextvars.ContextVar("concur_job", default=None)
_patched = threading.Lock()


class _RoutedStream:
    """A worker's sys.stdout/err: writes made by our cells go to the kernel, the rest pass through."""

    def __init__(self, original: Any, name: str) -> None:
        self._original = original
        self._name = name

    def write(self, text: str) -> int:
        token = _JOB.get()
        if token is None:
            return int(self._original.write(text) or 0)
        if text:
            from distributed import get_worker

            get_worker().log_event(TOPIC, {"job": token, "name": self._name, "text": text})
        return len(text)

    def flush(self) -> None:
        self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


def _install_routing() -> None:
    import distributed

    with _patched:
        if isinstance(sys.stdout, _RoutedStream):
            return
        sys.stdout = _RoutedStream(sys.stdout, "stdout")  # type: ignore[assignment]
        sys.stderr = _RoutedStream(sys.stderr, "stderr")  # type: ignore[assignment]
        original_print = distributed.print

        def routed_print(*args: Any, **kwargs: Any) -> None:
            # In our cells, print locally: the routed stream sends it to the right cell once.
            if _JOB.get() is not None:
                file = kwargs.pop("file", None)
                print(*args, file=file if file is not None else sys.stdout, **kwargs)
            else:
                original_print(*args, **kwargs)

        distributed.print = routed_print
        distributed.worker.print = routed_print  # type: ignore[attr-defined]


def run_remote(
    source: str, filename: str, first_line: int, inputs: dict[str, Any], token: str
) -> tuple[Any, dict[str, Any]]:
    """Run a cell on a worker; return its last value and the names it bound."""
    __tracebackhide__ = True
    from distributed import get_worker

    _install_routing()
    worker = get_worker()
    worker.log_event(STARTED, {"job": token, "worker": worker.address, "pid": os.getpid()})
    # The same file name and line numbers as in the kernel, so the kernel shows the cell's lines.
    cell = compile_cell(source, first_line=first_line, filename=filename)
    _remember_source(filename, "\n" * (first_line - 1) + source)
    namespace: dict[str, Any] = {"__name__": "__main__", **inputs}
    before = dict(namespace)
    reset = _JOB.set(token)
    try:
        if cell.is_async:
            import asyncio

            value = asyncio.run(cell.run_async(namespace))
        else:
            value = cell.run(namespace)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and friends must not reach the worker
        # Cut to the user's frames here, where they are; they travel in the exception's __dict__
        # and the kernel formats them with the cells' labels and sources.
        carried = exc if isinstance(exc, Exception) else RemoteExit(exc)
        try:
            carried._concur_frames = carried_frames(exc.__traceback__)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - the exception itself still goes back
            pass
        if carried is exc:
            raise
        raise carried from None
    finally:
        sys.stdout.flush()
        _JOB.reset(reset)
    names = {
        name: v for name, v in namespace.items()
        if name not in ("__builtins__", "__name__") and before.get(name, _MISSING) is not v
    }
    return value, names


_MISSING = object()


class RemoteExit(Exception):
    """``SystemExit``, ``KeyboardInterrupt`` or ``GeneratorExit`` raised by a cell on a Dask worker,
    carried back as an ordinary exception so it ends the job and never the worker."""

    def __init__(self, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}".rstrip(": ")
        super().__init__(f"{text} (raised by the cell on the Dask worker)")

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteExit, (self.args[0].rsplit(" (raised by", 1)[0],))


def _remember_source(filename: str, source: str) -> None:
    import linecache

    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)


def run_remote_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], token: str) -> Any:
    """Call a function on a worker, reporting where it runs and routing its output."""
    from distributed import get_worker

    _install_routing()
    worker = get_worker()
    worker.log_event(STARTED, {"job": token, "worker": worker.address, "pid": os.getpid()})
    reset = _JOB.set(token)
    try:
        return fn(*args, **kwargs)
    finally:
        _JOB.reset(reset)


def _kill_worker_process(pid: int, dask_worker: Any = None) -> None:
    """Run in a Nanny: SIGKILL its worker process if it is the one running our task.

    The Nanny sees its worker die and starts a fresh one.
    """
    if getattr(dask_worker, "pid", None) == pid:
        os.kill(pid, signal.SIGKILL)


def _exit_worker_process() -> None:
    os._exit(1)
