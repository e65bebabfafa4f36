"""The figures. Each runs ours and its anchor in the same process, on real kernels, and returns rows."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from queue import Empty
from typing import TYPE_CHECKING

from concur_magics.frontend import Kernel, running_kernel

from .jobs import background_launch_in_kernel, job_output, loop_deadlines
from .relay import process_print_relay

if TYPE_CHECKING:
    from .__main__ import Row


# Raw numbers kept for plots (python -m benchmarks --plot DIR).
RAW: dict[str, object] = {}


def _row(*args: object) -> Row:
    from .__main__ import Row

    return Row(*args)  # type: ignore[arg-type]


def _round_trips(kernel: Kernel, n: int, code: str = "1+1") -> list[float]:
    client = kernel.client
    for _ in range(max(5, n // 10)):  # warm up
        client.execute_interactive(code, timeout=30, output_hook=lambda msg: None)
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        client.execute_interactive(code, timeout=30, output_hook=lambda msg: None)
        samples.append(time.perf_counter() - start)
    return samples


def _pipelined(kernel: Kernel, n: int) -> tuple[float, int]:
    """Requests per second when n execute_requests are sent at once and all replies awaited, and
    how many replies never came (none for 10 s: given up)."""
    client = kernel.client
    start = last = time.perf_counter()
    ids = {client.execute("1+1") for _ in range(n)}
    while ids:
        try:
            reply = client.get_shell_msg(timeout=10)
        except Empty:
            break
        ids.discard(reply["parent_header"].get("msg_id"))
        last = time.perf_counter()
    return (n - len(ids)) / (last - start), len(ids)


def _xeus_kernelspec_dir(root: str) -> str:
    """A copy of xeus-python's installed ``xpython`` kernelspec under ``root``, run by this interpreter.

    The wheel's spec starts ``python3.11`` from ``PATH``, which need not be this environment's.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("xpython")
    except NoSuchKernel:
        raise RuntimeError("xeus-python is not installed: pip install -e '.[bench]'") from None
    spec_dir = os.path.join(root, "xpython")
    os.makedirs(spec_dir, exist_ok=True)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump({**spec.to_dict(), "argv": [sys.executable, *spec.argv[1:]]}, f)
    return root


def kernel_demo_round_trip(quick: bool) -> list[Row]:
    """``1+1`` round trips and pipelined throughput of kernel_demo, ipykernel and xeus-python."""
    from kernel_demo.__main__ import install

    from .__main__ import spread

    n = 50 if quick else 500
    n_pipelined = 200 if quick else 1000
    rounds = 5 if quick else 10
    trips: dict[str, list[float]] = {}
    rates: dict[str, list[float]] = {}
    lost: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as prefix, contextlib.ExitStack() as stack:
        specs = {
            "kernel_demo": ("kernel_demo", [os.path.dirname(install(prefix=prefix))]),
            "ipykernel": ("concur-python", None),
            "xeus-python": ("xpython", [_xeus_kernelspec_dir(prefix)]),
        }
        kernels = {name: stack.enter_context(running_kernel(kernel_name, kernel_dirs=dirs))
                   for name, (kernel_name, dirs) in specs.items()}
        # Turn about, in rounds: a busy moment of a shared machine falls on all three alike.
        for _ in range(rounds):
            for name, kernel in kernels.items():
                trips.setdefault(name, []).extend(_round_trips(kernel, n // rounds))
        for _ in range(1 if quick else 3):
            for name, kernel in kernels.items():
                per_second, missing = _pipelined(kernel, n_pipelined)
                rates.setdefault(name, []).append(per_second)
                lost[name] = lost.get(name, 0) + missing
    RAW["kernel_demo_round_trips"] = trips
    ours, ipykernel, xeus = trips["kernel_demo"], trips["ipykernel"], trips["xeus-python"]
    to_ipykernel = statistics.median(ours) / statistics.median(ipykernel)
    to_xeus = statistics.median(ours) / statistics.median(xeus)
    rate = {name: statistics.median(r) for name, r in rates.items()}
    to_xeus_rate = rate["kernel_demo"] / rate["xeus-python"]
    p99 = lambda s: sorted(s)[int(0.99 * (len(s) - 1))] * 1000  # noqa: E731
    lost_note = "".join(f"; {name} lost {count} replies" for name, count in lost.items() if count)
    return [
        _row("kernel_demo: execute `1+1` round trip, median (p10–p90)", spread(ours), "ipykernel " + spread(ipykernel),
             to_ipykernel, "≤ 0.25", _verdict(to_ipykernel <= 0.25)),
        _row("kernel_demo: `1+1` round trip against xeus-python (C++)", spread(ours), "xeus-python " + spread(xeus),
             to_xeus, "≤ 1", _verdict(to_xeus <= 1)),
        _row("kernel_demo: round trip p99", f"{p99(ours):.2f} ms",
             f"ipykernel {p99(ipykernel):.2f} ms; xeus-python {p99(xeus):.2f} ms", p99(ours) / p99(ipykernel), "—", "info"),
        _row(f"kernel_demo: pipelined throughput ({n_pipelined} requests at once)", f"{rate['kernel_demo']:.0f} req/s",
             f"xeus-python {rate['xeus-python']:.0f} req/s; ipykernel {rate['ipykernel']:.0f} req/s{lost_note}",
             to_xeus_rate, "≥ 1 (xeus-python)", _verdict(to_xeus_rate >= 1)),
    ]


ALL: list[tuple[str, Callable[[bool], list[Row]]]] = [
    ("kernel_demo", kernel_demo_round_trip),
]


# ----------------------------------------------------------------------------- helpers

def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def _spin() -> None:
    while True:
        pass


def _c_loop() -> int:
    return sum(range(10**13))  # C code that never releases the GIL


def _sleep() -> None:
    time.sleep(60)


# ----------------------------------------------------------------------------- timeout precision

def timeout_precision(quick: bool) -> list[Row]:
    """Time past the deadline until the call fails, for each kind of work and each tool."""
    import subprocess
    import sys

    from concur_magics import CellTimeout, run_with_timeout

    limit = 0.3
    repeats = 2 if quick else 7
    works = {"python loop": _spin, "time.sleep": _sleep, "C loop": _c_loop}

    def late(call: Callable[[], object], catch: tuple[type[BaseException], ...], budget: float = 5.0) -> float | None:
        start = time.monotonic()
        try:
            call()
        except catch:
            return time.monotonic() - start - limit
        return None

    rows: list[Row] = []
    for name, work in works.items():
        ours: dict[str, list[float]] = {"signal": [], "process": []}
        for mode in ours:
            if mode == "signal" and name == "C loop":
                continue  # never stopped: C code holding the GIL can't see a signal (documented)
            for _ in range(repeats):
                value = late(lambda: run_with_timeout(work, limit, mode=mode), (CellTimeout,))  # type: ignore[arg-type]
                if value is not None:
                    ours[mode].append(value)
        anchors: dict[str, list[float] | str] = {}
        anchors["subprocess.run(timeout=)"] = [
            v for v in (late(lambda: subprocess.run(
                [sys.executable, "-c", f"import benchmarks.figures as f; f.{work.__name__}()"], timeout=limit),
                (subprocess.TimeoutExpired,)) for _ in range(repeats)) if v is not None
        ]
        anchors.update(_third_party_timeouts(work, limit, repeats, name))
        goal = 0.05 if name == "C loop" else 0.02
        RAW.setdefault("timeout", {})[name] = {  # type: ignore[index]
            **{f"ours, {m} mode": v for m, v in ours.items()}, **{k: v for k, v in anchors.items() if isinstance(v, list)}
        }
        for mode, samples in ours.items():
            if not samples:
                rows.append(_row(f"timeout, {name}, {mode} mode", "never stopped (C code)", "", None, "—", "documented"))
                continue
            measured = {k: v for k, v in anchors.items() if isinstance(v, list) and v}
            best_anchor = min(((k, _median(v)) for k, v in measured.items()), key=lambda kv: kv[1], default=None)
            anchor_text = "; ".join(
                f"{k} {_ms(_median(v))}" if isinstance(v, list) and v else f"{k}: {v or 'never stopped'}"
                for k, v in anchors.items()
            )
            wanted = (mode == "signal" and name != "C loop") or (mode == "process" and name == "C loop")
            rows.append(_row(
                f"timeout, {name}, {mode} mode: past the deadline", _ms(_median(samples)), anchor_text,
                _median(samples) / best_anchor[1] if best_anchor and best_anchor[1] > 0 else None,
                f"< {goal * 1000:.0f} ms" if wanted else "—",
                _verdict(_median(samples) < goal) if wanted else "info",
            ))
    return rows


def _third_party_timeouts(work: Callable[[], object], limit: float, repeats: int, name: str) -> dict[str, list[float] | str]:
    """func_timeout (thread + async exception), stopit (thread timer), pebble (process pool).

    A tool that gives up waiting but leaves the work running gets a note instead of a time.
    """
    import func_timeout
    import pebble
    import stopit

    def func_timeout_call() -> None:
        func_timeout.func_timeout(limit, work)

    def stopit_call() -> None:
        with stopit.ThreadingTimeout(limit) as guard:
            work()
        if guard.state == guard.TIMED_OUT:
            raise TimeoutError

    out: dict[str, list[float] | str] = {}
    if name == "python loop":
        out["func_timeout"] = _samples(func_timeout_call, func_timeout.FunctionTimedOut, limit, repeats)
        out["stopit"] = _samples(stopit_call, TimeoutError, limit, repeats)
    elif name == "time.sleep":
        # Both raise in the sleeping thread, which only sees it when the sleep returns (60 s).
        out["func_timeout"] = "returns at the deadline, the sleep goes on"
        out["stopit"] = "never stopped"
    else:
        out["func_timeout"] = out["stopit"] = "never stopped (C code holds the GIL)"
    with pebble.ProcessPool(max_workers=1) as pool:
        out["pebble"] = _samples(lambda: pool.schedule(work, timeout=limit).result(), TimeoutError, limit, repeats)
    return out


def _samples(call: Callable[[], object], error: type[BaseException], limit: float, repeats: int) -> list[float]:
    """Seconds past ``limit`` at which ``call`` raised ``error``, over ``repeats`` runs."""
    out = []
    for _ in range(repeats):
        start = time.monotonic()
        try:
            call()
        except error:
            out.append(time.monotonic() - start - limit)
    return out


# ----------------------------------------------------------------------------- many waits

def many_waits(quick: bool) -> list[Row]:
    """N coroutines awaiting asyncio.sleep in one loop job, against one thread per wait."""
    import asyncio
    import concurrent.futures
    import resource

    from concur_magics import background

    sleep = 1.0 if quick else 8.0
    rows: list[Row] = []
    for n in ((1000, 10_000) if quick else (3600, 100_000)):
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        async def main() -> float:
            start = time.monotonic()
            await background(asyncio.gather(*(asyncio.sleep(sleep) for _ in range(n))), show=False)
            return time.monotonic() - start

        ours = asyncio.run(main())
        per_task = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024 / n

        async def plain() -> float:
            start = time.monotonic()
            await asyncio.gather(*(asyncio.sleep(sleep) for _ in range(n)))
            return time.monotonic() - start

        bare = asyncio.run(plain())
        anchor_text, ratio = f"plain asyncio.gather, no job {bare:.2f} s; threads not run (100,000)", None
        if n <= 3600:
            start = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
                list(pool.map(lambda _: time.sleep(sleep), range(n)))
            threads = time.monotonic() - start
            anchor_text, ratio = f"a thread each {threads:.2f} s; plain asyncio.gather {bare:.2f} s", ours / threads
        goal = 1.1 * sleep
        rows.append(_row(
            f"many waits: {n:,} × asyncio.sleep({sleep:g}) in one loop job", f"{ours:.2f} s (≤{max(per_task, 0):.0f} B/task peak RSS)",
            f"{anchor_text}; ideal {sleep:g} s", ratio, f"< {goal:.1f} s" if n >= 100_000 or quick else "≈ ideal",
            _verdict(ours < goal),
        ))
    return rows


# ----------------------------------------------------------------------------- %%background launch

def background_launch(quick: bool) -> list[Row]:
    """Reply latency of %%background minus an empty cell's; IPython's %%script --bg beside it."""
    n = 20 if quick else 100
    with running_kernel() as kernel:
        kernel.execute("%load_ext concur_magics")

        def latency(code: str) -> list[float]:
            samples = []
            for _ in range(n):
                start = time.perf_counter()
                kernel.execute(code, timeout=60)
                samples.append(time.perf_counter() - start)
            return samples

        empty = _median(latency("pass"))
        ours = _median(latency("%%background --mode thread\npass")) - empty
        loop = _median(latency("%%background --mode loop\npass")) - empty
        script = _median(latency("%%script --bg sh\ntrue")) - empty
        kernel.execute("%jobs wait", timeout=60)
    return [
        _row("%%background launch (thread) over an empty cell", _ms(ours), f"%%script --bg {_ms(script)}; empty cell {_ms(empty)}",
             ours / script if script > 0 else None, "< 2 ms", _verdict(ours < 0.002)),
        _row("%%background launch (loop) over an empty cell", _ms(loop), f"%%script --bg {_ms(script)}",
             loop / script if script > 0 else None, "< 2 ms", _verdict(loop < 0.002)),
    ]


# ----------------------------------------------------------------------------- process-mode cost

def process_mode_cost(quick: bool) -> list[Row]:
    """A trivial process-mode call with a big object alive, against a pool that must pickle it."""
    import multiprocessing

    from concur_magics import run_with_timeout

    size = 100 * 2**20 if quick else 2**30
    repeats = 3 if quick else 5
    rows: list[Row] = []
    for label, nbytes in (("empty", 0), (f"{size // 2**20} MB", size)):
        big = bytearray(nbytes)
        ours = _median([_timed(lambda: run_with_timeout(len, 30, big, mode="process")) for _ in range(repeats)])
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(len, (b"",))  # start the worker first: measure the call, not the start
            anchor = _median([_timed(lambda: pool.apply(len, (big,))) for _ in range(repeats)])
        rows.append(_row(f"process mode: trivial call, {label} in the namespace", _ms(ours),
                         f"multiprocessing (pickles the input) {_ms(anchor)}", ours / anchor if anchor else None,
                         "< 50 ms, flat", _verdict(ours < 0.05)))
    return rows


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- clock

def clock(quick: bool) -> list[Row]:
    """%clock tick offsets, idle and while a cell blocks; the naive sleep-loop clock's drift."""
    ticks = 2 if quick else 60
    import psutil

    with running_kernel() as kernel:
        kernel.execute("%load_ext concur_magics\nimport time")
        process = psutil.Process(kernel.pid)
        # CPU of the idle kernel without, then with, a clock: the difference is the clock's.
        quiet = sum(process.cpu_times()[:2])
        kernel.pump(ticks + 0.5)
        without = sum(process.cpu_times()[:2]) - quiet
        kernel.execute("clock = %clock --interval 1")
        start_cpu = sum(process.cpu_times()[:2])
        kernel.pump(ticks + 0.5)
        with_clock = sum(process.cpu_times()[:2]) - start_cpu
        cpu_per_hour = max(0.0, with_clock - without) / (ticks + 0.5) * 3600
        idle = eval(kernel.execute("list(clock.offsets)").results[-1]["text/plain"])  # noqa: S307 - our own kernel's list
        kernel.execute(f"time.sleep({ticks})", timeout=ticks + 30)
        during = eval(kernel.execute("list(clock.offsets)").results[-1]["text/plain"])[len(idle):]  # noqa: S307
        kernel.execute("clock.stop()")
    RAW["clock"] = {"idle": idle, "during": during}
    # The naive clock: sleep a second, redraw (a 5 ms "draw").
    start = time.time()
    naive_ticks = ticks if quick else 10
    for _ in range(naive_ticks):
        time.sleep(1)
        time.sleep(0.005)
    drift = (time.time() - start) - naive_ticks
    per_hour = drift / naive_ticks * 3600
    return [
        _row(f"%clock tick offset, idle ({len(idle)} ticks)", _ms(_median(idle)),
             f"naive sleep clock drifts {per_hour:.0f} s/hour", None, "< 5 ms, no drift", _verdict(_median(idle) < 0.005)),
        _row("%clock CPU per hour of ticking (1 s interval)", f"{cpu_per_hour:.1f} s",
             f"idle kernel without a clock: {without / (ticks + 0.5) * 3600:.1f} s/hour", None, "next to none", "info"),
        _row(f"%clock tick offset during a blocking cell ({len(during)} ticks)", _ms(_median(during)) if during else "no ticks",
             "naive clock: stops", None, "keeps ticking", _verdict(len(during) >= ticks - 2)),
    ]


# ----------------------------------------------------------------------------- Dask

def dask_figures(quick: bool) -> list[Row]:
    """Dask-mode timeout, per-job overhead and speed-up, on a local cluster."""
    import psutil

    from concur_magics import CellTimeout, compile_cell, run_with_timeout
    from concur_magics.dask_jobs import run_cell_on_dask
    from concur_magics.runtime import Runtime

    CLUSTER = Runtime.current().cluster

    client = CLUSTER.client()
    client.wait_for_workers(os.cpu_count() or 1, timeout=60)
    rows: list[Row] = []
    repeats = 2 if quick else 5

    # 1. Deadline to the task's process gone; anchor Client.restart_workers.
    gone_after = []
    for _ in range(repeats):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        start = time.monotonic()
        try:
            run_with_timeout(_spin, 0.5, mode="dask")
        except CellTimeout:
            pass
        deadline = start + 0.5
        killed = before - {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
        while not killed and time.monotonic() - deadline < 10:
            time.sleep(0.005)
            killed = before - {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
        gone_after.append(time.monotonic() - deadline)
        client.wait_for_workers(os.cpu_count() or 1, timeout=60)
    # What a user does without us: cancel (the task runs on) and restart the worker running it.
    spinning = client.submit(_spin, pure=False)
    time.sleep(0.5)
    worker = client.run_on_scheduler(
        lambda dask_scheduler, key=spinning.key: dask_scheduler.tasks[key].processing_on.address
    )
    start = time.monotonic()
    client.cancel([spinning], force=True)
    client.restart_workers([worker])
    restart = time.monotonic() - start
    client.wait_for_workers(os.cpu_count() or 1, timeout=60)
    ours = _median(gone_after)
    rows.append(_row("dask-mode timeout: deadline to the task's process gone", _ms(ours),
                     f"Client.restart_workers {_ms(restart)}", ours / restart, "< 1 s", _verdict(ours < 1.0)))

    # 2. Per-job overhead against a raw submit().result().
    n = 20 if quick else 100
    cell = compile_cell("x + 1")
    ns = {"x": 1}
    for _ in range(5):
        run_cell_on_dask(cell, ns, 30)
    ours_rt = _median([_timed(lambda: run_cell_on_dask(cell, ns, 30)) for _ in range(n)])
    raw = _median([_timed(lambda: client.submit(int.__add__, 1, 1, pure=False).result()) for _ in range(n)])
    rows.append(_row("Dask mode: per-job round trip", _ms(ours_rt), f"raw client.submit().result() {_ms(raw)}",
                     ours_rt / raw, "< 1.5 ×", _verdict(ours_rt / raw < 1.5)))

    # 3. Speed-up of a CPU-bound job split over the cluster.
    parts = os.cpu_count() or 1
    size = 3 * 10**6 if quick else 2 * 10**7
    serial = _timed(lambda: [_burn(size) for _ in range(parts)])
    spread_out = _timed(lambda: client.gather([client.submit(_burn, size, pure=False) for _ in range(parts)]))
    rows.append(_row(f"Dask speed-up: {parts} CPU-bound parts", f"{serial / spread_out:.2f} ×",
                     f"serial {serial:.2f} s, on the cluster {spread_out:.2f} s", serial / spread_out,
                     f"≈ {parts} (cores)", _verdict(serial / spread_out > 0.75 * parts)))
    CLUSTER.close()
    return rows


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


ALL[:] = [
    ("kernel_demo", kernel_demo_round_trip),
    ("background", background_launch),
    ("launch-in-kernel", background_launch_in_kernel),
    ("loop-deadlines", loop_deadlines),
    ("job-output", job_output),
    ("many-waits", many_waits),
    ("timeout", timeout_precision),
    ("process-mode", process_mode_cost),
    ("clock", clock),
    ("dask", dask_figures),
    ("relay", process_print_relay),
]
