"""Seen by a real user: JupyterLab in headless Chromium (Playwright), driving real kernels.

Message logs can say output went to the right cell while the page shows it elsewhere; here we read
the page. Servers, Chromium and page helpers are shared with the other browser tests
(``tests/browser.py``); these tests are JupyterLab's own (its launcher, the demo kernel's stdin
box), the routing scenarios that run in both UIs are in ``test_e2e_routing.py``. Screenshots go to
$CONCUR_SCREENSHOTS (default: a temporary folder), and to ``docs/`` with
$CONCUR_SCREENSHOTS_TO_DOCS=1.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from .browser import TOKEN, Notebook, Server, wait_for, write_notebook
from .browser import browser, server, shots  # noqa: F401 - fixtures, used by name


def test_magics_show_where_they_belong(server: Server, browser: Any, shots: Path) -> None:
    write_notebook(server.root / "magics.ipynb", "python3", "Python 3 (ipykernel)", [
        "%load_ext concur_magics",
        "%%background -n ticker\nimport time\nfor i in range(6):\n    print('tick', i, flush=True)\n"
        "    time.sleep(0.5)\n'ticker done'",
        "import time\ntime.sleep(1)\nprint('other cell')",
        "clock = %clock --interval 0.5",
        "time.sleep(4)",
        "%jobs",
        "%%timeout 1\nwhile True:\n    pass",
        "print('after the timeout')",
    ])
    nb = Notebook.open(browser, server, "magics.ipynb", "Python 3 (ipykernel)")
    try:
        nb.run_all()
        # While cell 4 blocks the kernel's main thread, the clock in cell 3 keeps changing.
        wait_for(lambda: "*" in nb.prompt(4) and re.search(r"\d\d:\d\d:\d\d", nb.output(3)) is not None,
                 60, "the clock to show and the blocking cell to start")
        time.sleep(0.3)
        first = nb.output(3)
        time.sleep(1.6)
        second = nb.output(3)
        assert "*" in nb.prompt(4), "the blocking cell should still be running"
        assert re.search(r"\d\d:\d\d:\d\d", first) and first != second, (first, second)
        wait_for(lambda: "CellTimeout" in nb.output(6), 60, "the timed-out cell")
        assert "time limit of 1 s exceeded" in nb.output(6)
        # Run All stops at an error; the next cell, run by hand, runs as usual.
        nb.run(7)
        wait_for(lambda: "after the timeout" in nb.output(7), 60, "the cell after the timeout")
        wait_for(lambda: "ticker done" in nb.output(1), 30, "the background job's value")
        ticks = nb.output(1)
        assert [f"tick {i}" for i in range(6)] == re.findall(r"tick \d", ticks)
        assert nb.output(2).strip() == "other cell"
        assert nb.cell(5).locator(".jp-OutputArea table").count() == 1
        assert "ticker" in nb.output(5)
        nb.screenshot(shots, "jupyterlab-magics.png")
    finally:
        nb.close()


def test_kernel_demo_in_jupyterlab(server: Server, browser: Any, shots: Path) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.goto(f"{server.url}/lab/workspaces/launcher?reset&token={TOKEN}")  # a fresh workspace: the launcher
        page.wait_for_selector(".jp-LauncherCard", timeout=60_000)
        assert page.locator(".jp-LauncherCard:has-text('Python (kernel_demo)')").count() >= 1
        Notebook(page, server).screenshot(shots, "jupyterlab-launcher.png")
    finally:
        page.close()
    write_notebook(server.root / "demo.ipynb", "kernel_demo", "Python (kernel_demo)", [
        "name = input('name? ')",
        "print('hello', name)",
        "%dispatch 6",
    ])
    nb = Notebook.open(browser, server, "demo.ipynb", "Python (kernel_demo)", viewport=(1200, 900))
    try:
        nb.run_all()
        box = nb.page.wait_for_selector(".jp-Stdin-input", timeout=60_000)
        assert "name?" in nb.output(0)
        box.fill("Ada")
        box.press("Enter")
        wait_for(lambda: re.fullmatch(r"\[\d+\]:", nb.prompt(2).strip()) is not None, 60, "the %dispatch cell")
        assert nb.output(1).strip() == "hello Ada"
        assert nb.cell(2).locator(".jp-OutputArea table").count() == 1
        assert "execute_request" in nb.output(2)
        nb.screenshot(shots, "jupyterlab-kernel-demo.png")
    finally:
        nb.close()
