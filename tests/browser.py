"""What the browser tests share: Jupyter servers, headless Chromium, and reading a notebook page.

JupyterLab 4 and Notebook 7 are built from the same components, so a notebook page has the same
DOM in both (``.jp-NotebookPanel``, ``.jp-CodeCell``, ``.jp-OutputArea``, the Run menu); what
differs is the server's module and the URL that opens a notebook. :class:`UI` holds exactly
those differences, so a scenario is written once and run in both.

The fixtures here are imported by the ``test_e2e_*`` modules. ``server`` is module-scoped and
parametrised indirectly (``"lab"`` unless a module asks for others), so each module starts one
server per UI and one Chromium, whatever the number of tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest

__all__ = ["CHROMIUM", "UI", "UIS", "Notebook", "Server", "browser", "server", "shots", "until",
           "wait_for", "write_notebook"]

CHROMIUM = "/usr/bin/chromium"
TOKEN = "concur-e2e-token"
# Chromium flags for a closed network and a root user in a container.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
DOCS = Path(__file__).parent.parent / "docs"


@dataclass(frozen=True)
class UI:
    """A Jupyter frontend: how to start its server and where it opens a notebook."""

    key: str
    title: str
    shot_name: str  # screenshots are named after it: "<shot_name>-<what>.png"
    module: str
    notebook_path: str  # URL path prefix that opens a notebook by its name
    extra_args: tuple[str, ...] = ()


UIS = {
    "lab": UI("lab", "JupyterLab", "jupyterlab", "jupyterlab", "/lab/tree/", ("--LabApp.news_url=",)),
    "notebook": UI("notebook", "Notebook 7", "notebook7", "notebook", "/notebooks/"),
}


@dataclass(frozen=True)
class Server:
    """A running Jupyter server of one UI."""

    ui: UI
    url: str
    root: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_environment(root: Path) -> dict[str, str]:
    """The environment for a server on ``root`` (its kernels inherit it).

    Settings and workspaces live under ``root``, so a user's own JupyterLab settings or a workspace
    restored from an earlier run can't change the page; the settings turn off the news prompt, a
    toast that would sit over the screenshots.

    ``PYTEST_CURRENT_TEST`` is left out: ipykernel does not capture file descriptors 1 and 2 when
    it is set, so a subprocess's output would reach the server's log instead of the notebook,
    unlike in real use.
    """
    settings = root / ".lab-settings"
    notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {**os.environ, "IPYTHONDIR": str(root / ".ipython"), "JUPYTER_PLATFORM_DIRS": "1",
           "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(root / ".lab-workspaces")}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A Jupyter server (JupyterLab unless parametrised with a key of :data:`UIS`) on a free port
    of 127.0.0.1, token-protected, on a temporary root."""
    ui = UIS[getattr(request, "param", "lab")]
    root = tmp_path_factory.mktemp(ui.key)
    port = _free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", ui.module, "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
         "--ServerApp.shutdown_no_activity_timeout=0", *ui.extra_args],
        stdout=log, stderr=log, env=server_environment(root),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # A cold start imports a lot and builds the page list: 60 s leaves room on a busy machine.
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                assert process.poll() is None, (root / "server.log").read_text()
                assert time.monotonic() < deadline, f"{ui.title} did not start within 60 s"
                time.sleep(0.2)
        yield Server(ui, url, root)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's: a test tool's own browser download cannot work here)."""
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: .ci/run installs Debian's chromium"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $CONCUR_SCREENSHOTS, or a temporary folder."""
    folder = Path(os.environ.get("CONCUR_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_notebook(path: Path, kernel: str, display: str, cells: list[str]) -> None:
    """Write a notebook of code cells that names its kernel."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": display, "language": "python"}
    nbformat.write(nb, path)


def until(condition: Callable[[], object], timeout: float) -> bool:
    """Poll ``condition`` every 0.1 s until it is true (True) or ``timeout`` s have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout`` s."""
    assert until(condition, timeout), f"timed out after {timeout} s waiting for {what}"


class Notebook:
    """A notebook opened in a page of either UI, read through its DOM.

    Cells are counted among code cells of the notebook on screen only: JupyterLab reopens, in
    hidden tabs, the notebooks that earlier pages of the same server had open.
    """

    PANEL = ".jp-NotebookPanel:visible"

    def __init__(self, page: Any, server: Server) -> None:
        self.page = page
        self.server = server

    @classmethod
    def open(cls, browser: Any, server: Server, name: str, kernel_display: str,
             viewport: tuple[int, int] = (1200, 1000)) -> Notebook:
        """Open notebook ``name`` (under the server's root) and wait until its kernel is idle."""
        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        try:
            page.goto(f"{server.url}{server.ui.notebook_path}{name}?token={TOKEN}")
            # 60 s: the first page load of a server builds its assets; kernels start in seconds.
            page.wait_for_selector(f"{cls.PANEL} .jp-CodeCell", timeout=60_000)
            # The UI may ask which kernel to start even when the notebook names one: answer it.
            try:
                dialog = page.wait_for_selector(".jp-Dialog select", timeout=3_000)
            except Exception:  # noqa: BLE001 - no dialog this time
                dialog = None
            if dialog is not None:
                dialog.select_option(label=kernel_display)
                page.click(".jp-Dialog button:has-text('Select')")
            page.wait_for_selector(f"{cls.PANEL} .jp-Toolbar-kernelName:has-text('{kernel_display}')",
                                   timeout=60_000)
            page.wait_for_selector(f"{cls.PANEL} .jp-Notebook-ExecutionIndicator[data-status='idle']",
                                   timeout=60_000)
        except BaseException:
            page.close()
            raise
        return cls(page, server)

    def close(self) -> None:
        self.page.close()

    def cell(self, index: int) -> Any:
        return self.page.locator(f"{self.PANEL} .jp-CodeCell").nth(index)

    def output(self, index: int) -> str:
        """The text the page shows in the output area of code cell ``index``."""
        return str(self.cell(index).locator(".jp-OutputArea").inner_text())

    def prompt(self, index: int) -> str:
        """The input prompt of cell ``index``: ``[*]:`` while it runs or waits, ``[n]:`` after."""
        return str(self.cell(index).locator(".jp-InputPrompt").inner_text())

    def done(self, index: int) -> bool:
        """Whether cell ``index`` has an execution count (it ran and its reply came)."""
        text = self.prompt(index).strip()
        return text.startswith("[") and text[1:-2].isdigit()

    def run_all(self) -> None:
        """Run All Cells from the Run menu (both UIs have it). It stops at a cell whose reply is an
        error, as a user would see."""
        self.page.click(".lm-MenuBar-itemLabel:text-is('Run')")
        self.page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")

    def run(self, index: int) -> None:
        """Run cell ``index`` as a user does: into its editor, then Ctrl+Enter (run, stay)."""
        self.cell(index).locator(".jp-InputArea-editor").click()
        self.page.keyboard.press("Control+Enter")

    def screenshot(self, shots: Path, name: str) -> None:
        """Save the page as ``shots/name``, and into ``docs/`` when $CONCUR_SCREENSHOTS_TO_DOCS is set
        (each test saves its own, so no test depends on another module having run)."""
        self.page.screenshot(path=str(shots / name), full_page=True)
        if os.environ.get("CONCUR_SCREENSHOTS_TO_DOCS"):
            shutil.copy(shots / name, DOCS / name)
