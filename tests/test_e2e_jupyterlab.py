"""Seen by a real user: JupyterLab in headless Chromium (Playwright), driving real kernels.

Message logs can say output went to the right cell while the page shows it elsewhere; here we read
the page. The server runs on 127.0.0.1 with a token and a temporary root; Chromium is Debian's
(`/usr/bin/chromium`, installed by .ci/run). Screenshots go to $CONCUR_SCREENSHOTS (default: a
temporary folder).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

CHROMIUM = "/usr/bin/chromium"
TOKEN = "concur-e2e-token"
# Chromium flags for a closed network and a root user in a container.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def _notebook(path: Path, kernel: str, display: str, cells: list[str]) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": display, "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A JupyterLab server on a free port of 127.0.0.1, token-protected, on a temporary root."""
    root = tmp_path_factory.mktemp("lab")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "IPYTHONDIR": str(root / ".ipython"), "JUPYTER_PLATFORM_DIRS": "1"}
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--ServerApp.shutdown_no_activity_timeout=0"],
        stdout=log, stderr=log, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (root / "server.log").read_text()
                assert time.monotonic() < deadline, "JupyterLab did not start within 60 s"
                time.sleep(0.2)
        yield {"url": url, "root": root}
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: .ci/run installs Debian's chromium"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("CONCUR_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_notebook(browser: Any, lab: dict[str, Any], name: str, kernel_display: str) -> Any:
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(f"{lab['url']}/lab/tree/{name}?token={TOKEN}")
    page.wait_for_selector(".jp-NotebookPanel:visible .jp-CodeCell", timeout=60_000)
    # JupyterLab may ask which kernel to start even when the notebook names one: answer it.
    try:
        dialog = page.wait_for_selector(".jp-Dialog select", timeout=3_000)
    except Exception:  # noqa: BLE001 - no dialog this time
        dialog = None
    if dialog is not None:
        dialog.select_option(label=kernel_display)
        page.click(".jp-Dialog button:has-text('Select')")
    page.wait_for_selector(f".jp-NotebookPanel:visible .jp-Toolbar-kernelName:has-text('{kernel_display}')", timeout=60_000)
    page.wait_for_selector(".jp-NotebookPanel:visible .jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    return page


def run_all(page: Any) -> None:
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")


def cell(page: Any, index: int) -> Any:
    # Only the notebook on screen: a restored workspace may hold others in hidden tabs.
    return page.locator(".jp-NotebookPanel:visible .jp-CodeCell").nth(index)


def output(page: Any, index: int) -> str:
    return str(cell(page, index).locator(".jp-OutputArea").inner_text())


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def prompt(page: Any, index: int) -> str:
    return str(cell(page, index).locator(".jp-InputPrompt").inner_text())


def test_magics_show_where_they_belong(lab: dict[str, Any], browser: Any, shots: Path) -> None:
    _notebook(lab["root"] / "magics.ipynb", "python3", "Python 3 (ipykernel)", [
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
    page = open_notebook(browser, lab, "magics.ipynb", "Python 3 (ipykernel)")
    try:
        run_all(page)
        # While cell 4 blocks the kernel's main thread, the clock in cell 3 keeps changing.
        wait_for(lambda: "*" in prompt(page, 4) and re.search(r"\d\d:\d\d:\d\d", output(page, 3)) is not None,
                 60, "the clock to show and the blocking cell to start")
        time.sleep(0.3)
        first = output(page, 3)
        time.sleep(1.6)
        second = output(page, 3)
        assert "*" in prompt(page, 4), "the blocking cell should still be running"
        assert re.search(r"\d\d:\d\d:\d\d", first) and first != second, (first, second)
        wait_for(lambda: "CellTimeout" in output(page, 6), 60, "the timed-out cell")
        assert "time limit of 1 s exceeded" in output(page, 6)
        # Run All stops at an error; the next cell, run by hand, runs as usual.
        cell(page, 7).locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        wait_for(lambda: "after the timeout" in output(page, 7), 60, "the cell after the timeout")
        wait_for(lambda: "ticker done" in output(page, 1), 30, "the background job's value")
        ticks = output(page, 1)
        assert [f"tick {i}" for i in range(6)] == re.findall(r"tick \d", ticks)
        assert output(page, 2).strip() == "other cell"
        assert cell(page, 5).locator(".jp-OutputArea table").count() == 1
        assert "ticker" in output(page, 5)
        page.screenshot(path=str(shots / "jupyterlab-magics.png"), full_page=True)
    finally:
        page.close()


def test_kernel_demo_in_jupyterlab(lab: dict[str, Any], browser: Any, shots: Path) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.goto(f"{lab['url']}/lab/workspaces/launcher?reset&token={TOKEN}")  # a fresh workspace: the launcher
        page.wait_for_selector(".jp-LauncherCard", timeout=60_000)
        assert page.locator(".jp-LauncherCard:has-text('Python (kernel_demo)')").count() >= 1
        page.screenshot(path=str(shots / "jupyterlab-launcher.png"))
    finally:
        page.close()
    _notebook(lab["root"] / "demo.ipynb", "kernel_demo", "Python (kernel_demo)", [
        "name = input('name? ')",
        "print('hello', name)",
        "%dispatch 6",
    ])
    page = open_notebook(browser, lab, "demo.ipynb", "Python (kernel_demo)")
    try:
        run_all(page)
        box = page.wait_for_selector(".jp-Stdin-input", timeout=60_000)
        assert "name?" in output(page, 0)
        box.fill("Ada")
        box.press("Enter")
        wait_for(lambda: re.fullmatch(r"\[\d+\]:", prompt(page, 2).strip()) is not None, 60, "the %dispatch cell")
        assert output(page, 1).strip() == "hello Ada"
        assert cell(page, 2).locator(".jp-OutputArea table").count() == 1
        assert "execute_request" in output(page, 2)
        page.screenshot(path=str(shots / "jupyterlab-kernel-demo.png"), full_page=True)
    finally:
        page.close()


def test_screenshots_were_saved(shots: Path) -> None:
    saved = {p.name for p in shots.glob("*.png")}
    assert {"jupyterlab-magics.png", "jupyterlab-launcher.png", "jupyterlab-kernel-demo.png"} <= saved
    if os.environ.get("CONCUR_SCREENSHOTS_TO_DOCS"):
        for name in saved:
            shutil.copy(shots / name, Path(__file__).parent.parent / "docs" / name)
