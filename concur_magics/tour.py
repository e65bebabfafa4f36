"""A headless tour: start a real kernel, load the extension, run each magic, print what cells show.

Run it with ``python -m concur_magics.tour``.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time

from .frontend import Cell, running_kernel

CELLS: list[tuple[str, str]] = [
    ("Load the extension", "%load_ext concur_magics"),
    ("A pure-Python loop, stopped by a signal at the deadline", "%%timeout 1\nn = 0\nwhile True:\n    n += 1"),
    ("The namespace is intact: the loop got this far", "n"),
    ("time.sleep is interrupted too", "%%timeout 0.5\nimport time\ntime.sleep(60)"),
    (
        "C code that holds the GIL can't see signals: run it in a forked child, killed at the deadline",
        "%%timeout 1 --mode process\nprint('the child starts summing')\nsum(range(10**13))",
    ),
    (
        "A process-mode cell sees the whole namespace; the names it assigns come back",
        "%%timeout 10 --mode process\nimport os\nchild_pid = os.getpid()\nsquares = [i * i for i in range(5)]\n"
        "print('computed in pid', child_pid)\nlen(squares)",
    ),
    ("They are here now", "kernel_pid = os.getpid()\nsquares, child_pid != kernel_pid"),
    ("A cell that awaits is cancelled at its await", "%%timeout 0.5\nimport asyncio\nawait asyncio.sleep(60)"),
    ("Bad arguments are refused with the usage line, and the cell does not run", "%%timeout soon\nprint('never')"),
    ("The same from plain Python", "import concur_magics\nconcur_magics.run_with_timeout(sum, 2, range(10**6), mode='process')"),
    (
        "%%background: the cell returns at once; the job prints here while other cells run",
        "%%background -n ticker -o ticker\nimport time\nfor i in range(3):\n    print('tick', i, flush=True)\n"
        "    time.sleep(0.3)\nticks = 3\n'ticked'",
    ),
    ("Meanwhile, another cell runs; its output stays here", "time.sleep(1.2)\nprint('the main thread was busy')"),
    (
        "What a job starts reports to the job's cell: its threads and its subprocesses",
        "%%background -n helpers\nimport subprocess, threading\ntime.sleep(0.5)\n"
        "t = threading.Thread(target=print, args=('from a thread the job started',))\nt.start(); t.join()\n"
        "subprocess.run(['echo', 'from a subprocess the job ran'])",
    ),
    ("Meanwhile this cell runs; none of that lands here", "time.sleep(1)\nprint('only this cell\\'s line')"),
    ("Each job keeps its output: %jobs show NAME shows it again here", "%jobs show helpers"),
    ("A job on the kernel's own loop: 10,000 coroutines, no thread each", "%%background -n sleepers\nimport asyncio\nawait asyncio.gather(*(asyncio.sleep(1) for _ in range(10_000)))\n'all slept'"),
    ("A failing job shows its traceback in its own cell", "%%background -n broken\n1 / 0"),
    ("A job you cancel", "%%background -n forever\nwhile True:\n    pass"),
    ("%jobs cancel, then %jobs wait (on the kernel's loop, so loop jobs go on)", "%jobs cancel forever\n%jobs wait"),
    ("%jobs lists them", "%jobs"),
    ("A Job is a future", "ticker.status, ticker.result(), ticks"),
    ("%clock: a live clock, updated in place on the kernel's IOPub loop", "clock = %clock --interval 1"),
    ("It keeps ticking while a cell blocks the main thread", "time.sleep(2.5)\nclock.ticks >= 2, clock.skipped"),
    ("%clock --stop stops every clock (or one: %clock --stop ID)", "%clock --stop\nclock.running"),
    (
        "%%every: a cell run on a schedule, between other cells, no while True",
        "%%every 300ms --times 3 -n counter -o counter\ncount = globals().get('count', 0) + 1\nprint('run', count)",
    ),
    ("Wait for it like any job", "%jobs wait counter\ncounter.status, count"),
    (
        "%%background --dask: the same cell on a Dask worker (a local cluster starts on first use); "
        "the names it reads go with it, the names it assigns come back",
        "%%background --dask -o remote\nimport os\nprint('hello from the worker process', os.getpid() != kernel_pid)\n"
        "total = sum(squares) * count\ntotal",
    ),
    ("The cluster waits for jobs it depends on; here they are", "%jobs wait remote\ntotal, remote.result()"),
    (
        "%%timeout --mode dask: Dask can't stop a running task; we cancel it and have its worker killed",
        "%%timeout 1 --mode dask\nwhile True:\n    pass",
    ),
    ("The cluster goes on serving", "%%timeout 30 --mode dask\n'still serving'"),
    ("%dask shows the cluster", "%dask"),
    ("Unloading removes the magics and stops everything the extension started", "%unload_ext concur_magics"),
]


def main() -> int:
    """Run the tour; return 0 if every cell showed what it should (errors included on purpose)."""
    os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    print("Starting an ipykernel with jupyter_client ...", flush=True)
    printed: list[tuple[int, str, str, Cell, float]] = []
    with running_kernel() as kernel:
        for number, (title, code) in enumerate(CELLS, start=1):
            start = time.monotonic()
            cell = kernel.execute(code, timeout=120)
            elapsed = time.monotonic() - start
            printed.append((number, title, code, cell, elapsed))
        # Background jobs go on printing into their cells after those cells return: collect a
        # moment longer, then show every cell as a frontend would show it now.
        kernel.wait_until(lambda: all(job_done(c) for *_, c, _ in printed), 60, "the tour's jobs")
        for number, title, code, cell, elapsed in printed:
            print(f"\n── [{number}] {title}  (reply: {cell.status} in {elapsed:.2f} s)")
            print(textwrap.indent(code, "  In  │ "))
            shown = _shown(cell)
            if shown:
                print(textwrap.indent(shown, "  Out │ ", lambda _: True))
    return 0


def job_done(cell: Cell) -> bool:
    """True unless the cell shows a job status line that still says pending or running."""
    return not any(
        "Job #" in text and (" running" in text or " pending" in text)
        for text in (r.get("text/plain", "") for r in cell.results)
    )


def _shown(cell: Cell) -> str:
    """The cell's output as a reader sees it, with tracebacks cut down to their last line."""
    parts: list[str] = []
    last_stream = None
    for out in cell.outputs:
        kind = out["output_type"]
        if kind == "stream" and out["name"] == last_stream:
            parts[-1] += out["text"]  # a frontend joins consecutive text of one stream
        elif kind == "stream":
            parts.append(out["text"])
        elif kind in ("execute_result", "display_data"):
            parts.append(out["data"].get("text/plain", ""))
        elif kind == "error":
            parts.append(f"{out['ename']}: {out['evalue']}")
        last_stream = out["name"] if kind == "stream" else None
    return "\n".join(p.rstrip("\n") for p in parts if p.strip())


if __name__ == "__main__":
    sys.exit(main())
