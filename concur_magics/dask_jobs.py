"""Run cells on Dask, from the kernel's side: ship a cell, follow its task, settle its job.

A cell sent to Dask is compiled here (IPython's transformers run in the kernel), and shipped with
the names it reads from the namespace; a :class:`Job` or Dask future among them is passed as a Dask
dependency, so the cluster — not the notebook — waits for it. On the worker the cell runs in a fresh
namespace (:mod:`concur_magics.remote`); its last expression and the names it binds come back and
are bound in the notebook's namespace on the kernel's loop (never from another thread).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .cells import CompiledCell, compile_cell
from .cluster import _cluster
from .deadlines import CellTimeout
from .jobs import Job
from .output import CellOutput
from .remote import run_remote, run_remote_call
from .tracebacks import rebuilt_frames

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["Shipment", "background_dask", "prepare", "run_call_on_dask", "run_cell_on_dask", "submit"]

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
