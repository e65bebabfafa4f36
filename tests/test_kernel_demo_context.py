"""kernel_demo keeps the running cell's request per context: output from work a cell started — a
thread, a thread pool's task, an asyncio task — lands under that cell, even while a later cell runs.

One demo kernel for the module. Each test starts work in cell 1 that prints after a delay, and runs
cell 2 meanwhile (blocking the main thread, or awaiting); the text must carry cell 1's parent
msg_id. With the request kept in one attribute, it would carry cell 2's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from concur_magics.frontend import Cell, Kernel, running_kernel

# The work prints 0.3 s after cell 1 returns; cell 2 runs for 1 s, so it is still running then.
# 10 s for the text to arrive is far beyond the 0.3 s it needs, also on a loaded machine.
DELAY = 0.3
ARRIVAL = 10


@pytest.fixture(scope="module")
def demo(kernel_demo_spec: str) -> Iterator[Kernel]:
    with running_kernel("kernel_demo", kernel_dirs=[kernel_demo_spec]) as kernel:
        cell = kernel.execute("import asyncio, threading, time\nfrom concurrent.futures import ThreadPoolExecutor")
        assert cell.status == "ok", cell.text
        yield kernel


def printed_in(kernel: Kernel, text: str, timeout: float = ARRIVAL) -> list[Cell]:
    """The cells under which ``text`` was printed, once it has arrived."""
    kernel.wait_until(lambda: any(text in c.stdout for c in kernel.cells.values()), timeout, repr(text))
    return [c for c in kernel.cells.values() if text in c.stdout]


def check(kernel: Kernel, start: str, meanwhile: str, text: str) -> None:
    first = kernel.execute(start)
    assert first.status == "ok", first.text
    second = kernel.execute(meanwhile, wait=False)
    cells = printed_in(kernel, text)
    assert second.reply is None, "cell 2 was meant to be running when the text arrived"
    assert [c.msg_id for c in cells] == [first.msg_id], [c.code for c in cells]
    kernel.wait(second, timeout=30)
    assert text not in second.stdout


def test_a_thread_prints_in_the_cell_that_started_it(demo: Kernel) -> None:
    check(demo, f"threading.Thread(target=lambda: (time.sleep({DELAY}), print('thread says hi'))).start()",
          "time.sleep(1)", "thread says hi")


def test_a_pool_task_prints_in_the_cell_that_submitted_it(demo: Kernel) -> None:
    # The pool's thread is started by an earlier cell: the task carries its submitter's context.
    started = demo.execute("pool = ThreadPoolExecutor(1)\npool.submit(print, 'warm').result()")
    assert started.status == "ok" and "warm" in started.stdout, started.text
    check(demo, f"pool.submit(lambda: (time.sleep({DELAY}), print('pool says hi')))",
          "time.sleep(1)", "pool says hi")


def test_a_task_prints_in_the_cell_that_created_it(demo: Kernel) -> None:
    check(demo, f"async def later():\n    await asyncio.sleep({DELAY})\n    print('task says hi')\n"
                "task = asyncio.get_running_loop().create_task(later())",
          "await asyncio.sleep(1)", "task says hi")
