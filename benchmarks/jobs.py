"""Jobs inside the kernel: what launching costs, and what ten thousand deadlines cost.

Both figures run in one real ipykernel with the extension loaded, ours and the anchor side by side:

* launch: the mean of 200 ``%%background`` launches of ``pass`` in a tight loop, measured inside the
  kernel (what the launching cell pays), against starting a ``threading.Thread`` and submitting to a
  ``ThreadPoolExecutor`` — what a user would write by hand — in the same cell's kernel.
* deadlines: 10,000 loop jobs with ``--timeout`` over ``asyncio.sleep``, against 10,000 tasks under
  ``asyncio.wait_for``: wall time to all stopped, threads started, RSS grown.
* job output: a job printing 50,000 lines (routed to its cell and kept in its log), against the same
  loop in a plain cell: wall time until the client has every line.
"""

from __future__ import annotations

import ast
import statistics
from typing import TYPE_CHECKING

from concur_magics.frontend import Kernel, running_kernel

if TYPE_CHECKING:
    from .__main__ import Row

__all__ = ["background_launch_in_kernel", "job_output", "loop_deadlines"]

LAUNCH_GOAL = 0.0005  # seconds per %%background launch, inside the kernel


def _row(*args: object) -> Row:
    from .__main__ import Row

    return Row(*args)  # type: ignore[arg-type]


def _numbers(kernel: Kernel, code: str, timeout: float = 300) -> tuple[float, ...]:
    """The tuple of numbers the cell's last expression gives."""
    cell = kernel.execute(code, timeout=timeout)
    if cell.status != "ok" or not cell.results:
        raise RuntimeError(f"benchmark cell failed: {cell.text[-2000:]}")
    return tuple(float(x) for x in ast.literal_eval(cell.results[-1]["text/plain"]))


_LAUNCH = """
import time, threading, concurrent.futures
ip = get_ipython()
def _mean(start_one, n=200):
    start = time.perf_counter()
    for _ in range(n):
        start_one()
    return (time.perf_counter() - start) / n
_pool = concurrent.futures.ThreadPoolExecutor(8)
_pool.submit(int).result()
for _ in range(20):
    ip.run_cell_magic('background', '', 'pass')
ours = _mean(lambda: ip.run_cell_magic('background', '', 'pass'))
thread = _mean(lambda: threading.Thread(target=int).start())
pool = _mean(lambda: _pool.submit(int))
_pool.shutdown()
(ours, thread, pool)
"""


def background_launch_in_kernel(quick: bool) -> list[Row]:
    """Mean cost of one ``%%background`` launch inside the kernel, rounds of 200 in a tight loop."""
    rounds = 3 if quick else 9
    ours, thread, pool = [], [], []
    with running_kernel() as kernel:
        kernel.execute("%load_ext concur_magics", timeout=60)
        for _ in range(rounds):
            o, t, p = _numbers(kernel, _LAUNCH)
            ours.append(o)
            thread.append(t)
            pool.append(p)
            kernel.execute("%jobs wait --timeout 60\n%jobs clear", timeout=90)
    median = statistics.median(ours)
    return [_row(
        "%%background launch inside the kernel (mean of 200, median of rounds)",
        f"{median * 1e3:.3f} ms (rounds {min(ours) * 1e3:.2f}–{max(ours) * 1e3:.2f} ms)",
        f"threading.Thread().start() {statistics.median(thread) * 1e3:.3f} ms; "
        f"ThreadPoolExecutor.submit {statistics.median(pool) * 1e3:.3f} ms",
        median / statistics.median(thread), "< 0.5 ms", "ok" if median < LAUNCH_GOAL else "MISSED",
    )]


_DEADLINES = """
import asyncio, threading, time, psutil, concur_magics
_proc = psutil.Process()
async def _ours(n):
    threads, rss, start = threading.active_count(), _proc.memory_info().rss, time.perf_counter()
    jobs = [concur_magics.background(asyncio.sleep(5), mode='loop', timeout=0.5, show=False) for _ in range(n)]
    peak_threads = threading.active_count()
    await concur_magics.table.wait_for_jobs_async(jobs, 120)
    took = time.perf_counter() - start
    assert all(j.status == 'timeout' for j in jobs)
    return took, peak_threads - threads, _proc.memory_info().rss - rss
async def _anchor(n):
    threads, rss, start = threading.active_count(), _proc.memory_info().rss, time.perf_counter()
    async def one():
        try:
            await asyncio.wait_for(asyncio.sleep(5), 0.5)
        except asyncio.TimeoutError:
            pass
    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    peak_threads = threading.active_count()
    await asyncio.gather(*tasks)
    return time.perf_counter() - start, peak_threads - threads, _proc.memory_info().rss - rss
"""


def loop_deadlines(quick: bool) -> list[Row]:
    """10,000 loop jobs with a deadline each, against 10,000 ``asyncio.wait_for`` tasks."""
    n = 2_000 if quick else 10_000
    with running_kernel() as kernel:
        kernel.execute("%load_ext concur_magics", timeout=60)
        kernel.execute(_DEADLINES, timeout=60)
        took, threads, rss = _numbers(kernel, f"await _ours({n})")
        kernel.execute("%jobs clear", timeout=60)
        anchor_took, anchor_threads, anchor_rss = _numbers(kernel, f"await _anchor({n})")
    return [_row(
        f"{n:,} loop jobs with --timeout 0.5 s: all stopped",
        f"{took:.2f} s, {threads:.0f} threads, {rss / n:.0f} B/job RSS",
        f"asyncio.wait_for tasks {anchor_took:.2f} s, {anchor_threads:.0f} threads, {anchor_rss / n:.0f} B/task",
        took / anchor_took if anchor_took else None, "no thread per job", "ok" if threads <= 0 else "MISSED",
    )]


def job_output(quick: bool) -> list[Row]:
    """Lines printed by a job, until the client has them all, against a plain cell printing them."""
    import time

    n = 20_000 if quick else 50_000
    loop = f"for i in range({n}):\n    print(i)"
    ours, plain = [], []
    with running_kernel() as kernel:
        kernel.execute("%load_ext concur_magics", timeout=60)
        for _ in range(2 if quick else 3):
            start = time.perf_counter()
            cell = kernel.execute("%%background -n printer\n" + loop, timeout=120)
            kernel.wait_until(lambda: cell.stdout.count("\n") >= n, 120, "every printed line")
            ours.append(time.perf_counter() - start)
            kernel.execute("%jobs wait --timeout 60\n%jobs clear", timeout=90)
            start = time.perf_counter()
            cell = kernel.execute(loop, timeout=120)
            kernel.wait_until(lambda: cell.stdout.count("\n") >= n, 120, "every printed line")
            plain.append(time.perf_counter() - start)
    o, a = statistics.median(ours), statistics.median(plain)
    return [_row(
        f"a job printing {n:,} lines: all in its cell (median of rounds)",
        f"{o * 1e3:.0f} ms", f"the same loop in a plain cell {a * 1e3:.0f} ms",
        o / a, "< 1.5x plain", "ok" if o < 1.5 * a else "MISSED",
    )]
