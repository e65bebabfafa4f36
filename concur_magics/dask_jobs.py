"""Run cells on Dask, from the kernel's side: ship a cell, follow its task, settle its job.

A cell sent to Dask is compiled here (IPython's transformers run in the kernel) and travels as
code objects (:class:`~concur_magics.remote.CellCode`) with the names it reads from the namespace;
a :class:`Job` or Dask future among them is passed as a Dask dependency while it is pending, so the
cluster — not the notebook — waits for it. On the worker the cell runs in a fresh namespace
(:mod:`concur_magics.remote`, sent by value: workers need not have this package); its last
expression and the names it binds come back and are bound in the notebook's namespace on the
kernel's loop (never from another thread).

A finished job's value is fetched once and its Dask future let go, so a worker lost later never
runs a finished cell again. Closing the connection (``%dask close``, ``%unload_ext``, shutdown)
ends every running job and removes this kernel's plugin from the workers; losing the scheduler
ends every running job with an error.
"""

from __future__ import annotations

import functools
import itertools
import operator
import pickle
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distributed import WorkerPlugin

from . import compat, remote
from .cells import CompiledCell, compile_cell
from .cluster import STARTED, TOPIC, Cluster
from .deadlines import CellTimeout
from .jobs import Job
from .output import CellOutput
from .shipping import check_picklable
from .tracebacks import rebuilt_frames

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = [
    "DaskSession",
    "Shipment",
    "background_dask",
    "prepare",
    "run_call_on_dask",
    "run_cell_on_dask",
    "shipped",
    "submit",
]

# Seconds closing the connection waits for a job's work to be stopped before ending the job anyway.
STOP_WAIT = 5.0

# --------------------------------------------------------------------------- our code, by value

# cloudpickle's by-value registry is process-wide: one pickling of remote.py at a time.
_pickling = threading.Lock()


def by_value(obj: Any) -> bytes:
    """``obj`` pickled with the code of :mod:`concur_magics.remote` in it, not a reference to it."""
    import cloudpickle

    with _pickling:
        cloudpickle.register_pickle_by_value(remote)
        try:
            return cloudpickle.dumps(obj)
        finally:
            cloudpickle.unregister_pickle_by_value(remote)


class Shipped:
    """A function of :mod:`concur_magics.remote` as Dask sends it: it unpickles as the function
    itself, built from its code (plain ``pickle.loads`` of a by-value payload), so a worker needs
    only ``cloudpickle``, which ``distributed`` has. Called here, it is the function."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.payload = by_value(fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (pickle.loads, (self.payload,))


@functools.cache
def shipped(fn: Callable[..., Any]) -> Shipped:
    """The :class:`Shipped` form of a function of :mod:`concur_magics.remote` (made once)."""
    return Shipped(fn)


class _ShippedPlugin(WorkerPlugin):
    """A worker plugin of :mod:`concur_magics.remote`, sent by value like :class:`Shipped`."""

    def __init__(self, plugin: remote.OutputRouting) -> None:
        self.payload = by_value(plugin)

    def __reduce__(self) -> tuple[Any, ...]:
        return (pickle.loads, (self.payload,))


# --------------------------------------------------------------------------- this kernel's session

class DaskSession:
    """This kernel's use of the Dask cluster: its output plugin on the workers, its running jobs.

    One per :class:`~concur_magics.runtime.Runtime` (:meth:`Runtime.dask`). Hooked into the
    connection's :attr:`Cluster.on_close`: before the client closes, every running job ends and the
    plugin leaves the workers. Thread-safe.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.id = uuid.uuid4().hex[:12]
        self.plugin = f"concur-output-{self.id}"  # each kernel its own: it removes only its own
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._plugged: Any = None  # the client the plugin was registered through
        self._runs: dict[str, DaskRun] = {}
        cluster.on_close.append(self._closing)

    def token(self) -> str:
        """A new job token, unique among all kernels using the cluster."""
        return f"{self.id}-{next(self._tokens)}"

    def route(self, token: str) -> tuple[str, str, str]:
        """What a task needs to report (a :class:`~concur_magics.remote.Route`, as a plain tuple)."""
        return (token, self.plugin, STARTED)

    def client(self) -> Any:
        """The connected client, with this kernel's output plugin on the workers.

        Raises
        ------
        ConnectionError
            If the scheduler can't be reached (see :meth:`Cluster.client`).
        """
        client = self.cluster.client()
        with self._lock:
            if self._plugged is not client:
                plugin = _ShippedPlugin(remote.OutputRouting(TOPIC))
                client.register_plugin(plugin, name=self.plugin)
                self._plugged = client
        return client

    def track(self, run: DaskRun, out: CellOutput) -> None:
        with self._lock:
            self._runs[run.token] = run
        self.cluster.route(run.token, out)

    def forget(self, token: str) -> None:
        with self._lock:
            self._runs.pop(token, None)
        self.cluster.unroute(token)

    def _closing(self, reason: str) -> None:
        """The connection closes: end every running job, take the plugin off the workers."""
        with self._lock:
            runs = list(self._runs.values())
            client, self._plugged = self._plugged, None
        for run in runs:
            run.end(reason)
        if client is not None:
            try:
                client.unregister_worker_plugin(self.plugin)
            except Exception:  # noqa: BLE001 - the scheduler is gone; its workers go with it
                pass


def _session() -> DaskSession:
    """The Dask session of the current owner (see :mod:`concur_magics.runtime`)."""
    from .runtime import Runtime

    return Runtime.current().dask()


# --------------------------------------------------------------------------- submitting

@dataclass
class Shipment:
    """A cell ready to go to a worker."""

    cell: CompiledCell
    inputs: dict[str, Any]
    waits_for: list[Job] = field(default_factory=list)  # non-Dask jobs to finish first
    token: str = ""


def prepare(cell: CompiledCell, namespace: dict[str, Any], session: DaskSession) -> Shipment:
    """Collect the inputs a cell reads; Jobs become Dask futures (or things to wait for)."""
    from distributed import Future

    inputs = {
        name: namespace[name] for name in sorted(cell.reads)
        # modules stay: the cell's own imports bring them on the worker
        if name in namespace and (isinstance(namespace[name], Future) or not isinstance(namespace[name], type(sys)))
    }
    check_picklable(inputs)  # before anything, even a job's value task, is sent
    waits: list[Job] = []
    for name, value in inputs.items():
        if isinstance(value, Job):
            future = _value_future(value)
            if future is not None:
                inputs[name] = future
            else:
                waits.append(value)
    return Shipment(cell, inputs, waits, session.token())


def _value_future(job: Job) -> Any:
    """A Dask future of a running dask job's value (its task returns the value and the names it
    bound); None once the job has ended (its value is here) or if it is not a dask job."""
    with job._lock:
        future = job._dask_future
        if future is None:
            return None
        value = getattr(job, "_dask_value", None)
        if value is None:
            value = future.client.submit(
                operator.itemgetter(0), future, key=f"{future.key}-value", pure=False
            )
            job._dask_value = value  # type: ignore[attr-defined]
        return value


def cell_code(cell: CompiledCell) -> tuple[Any, ...]:
    """What travels of a compiled cell (a :class:`~concur_magics.remote.CellCode`, as a tuple)."""
    return (cell.body, cell.last_expr, cell.is_async, cell.filename, cell.first_line)


def submit(shipment: Shipment, session: DaskSession) -> Any:
    """Submit a prepared cell; return its Dask future.

    Raises
    ------
    TypeError
        Naming the inputs that can't be serialised.
    """
    __tracebackhide__ = True
    client = session.client()
    inputs = {
        name: (value.result() if isinstance(value, Job) else value)
        for name, value in shipment.inputs.items()
    }
    try:
        return client.submit(
            shipped(remote.run_remote), cell_code(shipment.cell), inputs, session.route(shipment.token),
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


# --------------------------------------------------------------------------- background jobs

class DaskRun:
    """The driver of one ``--dask`` job: submits its cell, collects the outcome once, stops the
    work for real, and ends the job when the connection goes. Thread-safe."""

    def __init__(self, runtime: Runtime, session: DaskSession, job: Job, shipment: Shipment,
                 namespace: dict[str, Any]) -> None:
        self.runtime = runtime
        self.session = session
        self.job = job
        self.shipment = shipment
        self.token = shipment.token
        self.namespace = namespace
        self.future: Any = None
        self._stopping = threading.Lock()  # held by whoever stops the work: once
        self._submitting = threading.Lock()  # a stop waits for a submit under way, to stop its task
        self._stopper: threading.Thread | None = None

    def after(self, jobs: list[Job]) -> None:
        """Start once ``jobs`` (not on Dask) have ended; at once if there are none."""
        remaining = [len(jobs)]
        lock = threading.Lock()

        def one_done(_: Job) -> None:
            with lock:
                remaining[0] -= 1
                ready = remaining[0] == 0
            if ready:
                self.start()

        for dependency in jobs:
            dependency.add_done_callback(one_done)
        if not jobs:
            self.start()

    def start(self) -> None:
        with self._submitting:
            if self.job.done() or self._stopping.locked():
                return
            try:
                future = submit(self.shipment, self.session)
            except Exception as exc:  # noqa: BLE001 - shown in the cell, job status error
                self.finish("error", error=exc)
                return
            with self.job._lock:
                self.future = self.job._dask_future = future
            self.shipment.inputs = {}  # the task holds them now
        future.add_done_callback(
            lambda f: threading.Thread(target=self.collect, args=(f,), name="concur-dask-result", daemon=True).start()
        )

    def collect(self, future: Any) -> None:
        """The task ended: fetch its value (once), let its future go, settle the job."""
        if self.job.done() or self._stopping.locked():
            return
        try:
            value, names = future.result()
        except Exception as exc:  # noqa: BLE001 - the remote failure, with its traceback
            self.finish("error", error=_explain(_rendered(exc)))
            return
        finally:
            self._release()
        self.finish("done", value, names=names)

    def _release(self) -> None:
        """Let go of the task: a worker lost from now on can't make the cluster run it again."""
        with self.job._lock:
            self.future = self.job._dask_future = None
            self.job._dask_value = None  # type: ignore[attr-defined]

    def finish(self, status: str, value: Any = None, error: BaseException | None = None,
               names: dict[str, Any] | None = None) -> None:
        """Settle the job (binding ``names``) on the kernel's loop when it runs."""
        def on_loop() -> None:
            if names:
                self.namespace.update(names)
            self.job.settle(status, value, error)
            self.session.forget(self.token)

        loop = self.runtime.kernel_loop()
        if loop is not None:
            loop.call_soon_threadsafe(on_loop)
        else:
            on_loop()

    def interrupt(self) -> None:
        """The job's stop (cancel, ``--timeout``): stop the work for real, in a thread of its own."""
        if self._stopping.acquire(blocking=False):  # one remote stop, however often we are asked
            self._stopper = threading.Thread(
                target=self._stop_remote, name=f"concur-dask-stop-{self.job.id}", daemon=True
            )
            self._stopper.start()

    def _stop_remote(self) -> None:
        how = self._stop_work()
        status = self.job._stopping or "cancelled"
        error = CellTimeout(self.job.limit or 0.0, "dask", "worker", f"({how})") if status == "timeout" else None
        self.finish(status, error=error)

    def _stop_work(self) -> str:
        with self._submitting:
            future = self.future
        if future is None:
            return "before it started"
        try:
            return self.session.cluster.stop(future, self.token)
        except Exception as exc:  # noqa: BLE001 - the connection is gone: nothing more to stop
            return f"the cluster could not be asked to stop it: {exc}"
        finally:
            self._release()

    def end(self, reason: str) -> None:
        """The connection closes: stop the work (waiting up to :data:`STOP_WAIT` s) and end the
        job now as ``cancelled``, its status line saying why."""
        if self.job.done():
            return
        if self._stopping.acquire(blocking=False):
            self._stop_work()
        elif self._stopper is not None:
            self._stopper.join(STOP_WAIT)
        self.job.note = f"ended: {reason}"
        self.job.settle("cancelled")
        self.session.forget(self.token)


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
    session = runtime.dask()
    ns = namespace if namespace is not None else (shell.user_ns if shell is not None else {})
    compiled = compile_cell(source, shell=shell, first_line=first_line)
    shipment = prepare(compiled, ns, session)
    session.client()  # connect (or start the local cluster) now, so errors show in this cell
    out = CellOutput(shell)
    job = runtime.jobs.add(Job(source, "dask", name, out=out, limit=timeout, cell=cell, run=run))
    driver = DaskRun(runtime, session, job, shipment, ns)
    session.track(driver, out)
    job.begin(driver.interrupt, runtime.deadlines.call_later)
    driver.after(shipment.waits_for)
    return job


def _rendered(exc: BaseException) -> BaseException:
    """``exc`` with the user's frames the worker sent (:func:`remote.carried_frames`) as its
    traceback. The kernel formats them: it knows each cell's label and source, which a worker
    does not."""
    frames = getattr(exc, "_concur_frames", None)
    return exc.with_traceback(rebuilt_frames(frames)) if frames else exc


def _explain(exc: BaseException) -> BaseException:
    if type(exc).__name__ == "KilledWorker":
        return RuntimeError(f"the Dask worker running this job died (after Dask's retries): {exc}")
    reason = compat.cancel_reason(exc)
    if reason == "scheduler-connection-lost":
        return ConnectionError("lost the connection to the Dask scheduler while this job ran; its work is lost")
    if reason is not None:
        return RuntimeError(f"Dask cancelled this job's task ({reason})")
    return exc


# --------------------------------------------------------------------------- foreground (%%timeout)

def run_cell_on_dask(cell: CompiledCell, namespace: dict[str, Any], limit: float, shell: Any = None) -> Any:
    """Run a cell on a worker in the foreground; at ``limit`` seconds stop it for real.

    Raises
    ------
    CellTimeout
        At the deadline, after the task was cancelled and its worker process killed.
    """
    __tracebackhide__ = True
    session = _session()
    shipment = prepare(cell, namespace, session)
    for dependency in shipment.waits_for:
        dependency.result()
    session.cluster.route(shipment.token, CellOutput(shell))
    try:
        future = submit(shipment, session)
        value, names = _result(future, limit, session.cluster, shipment.token)
        namespace.update(names)
        return value
    finally:
        session.cluster.unroute(shipment.token)


def run_call_on_dask(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], limit: float) -> Any:
    """Call ``fn(*args, **kwargs)`` on a worker; at ``limit`` seconds stop it for real."""
    __tracebackhide__ = True
    session = _session()
    token = session.token()
    session.cluster.route(token, CellOutput(None))
    try:
        future = session.client().submit(
            shipped(remote.run_remote_call), fn, args, kwargs, session.route(token),
            key=f"concur-call-{token}", pure=False, retries=0,
        )
        return _result(future, limit, session.cluster, token)
    finally:
        session.cluster.unroute(token)


def _result(future: Any, limit: float, cluster: Cluster, token: str) -> Any:
    """A foreground task's result within ``limit`` seconds; at the deadline, stop it for real."""
    __tracebackhide__ = True
    import distributed

    try:
        return future.result(timeout=limit)
    except distributed.TimeoutError:
        how = cluster.stop(future, token)
        raise CellTimeout(limit, "dask", "worker", f"({how})") from None
    except KeyboardInterrupt:
        cluster.stop(future, token)
        raise
    except Exception as exc:
        error = _explain(_rendered(exc))  # the remote exception itself, as the worker saw it
        if error is exc:
            raise
        raise error from None
