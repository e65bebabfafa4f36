"""The demo kernel as notebooks use it: IPython's display, %dispatch in one output, tracebacks of
interrupted cells, the logo in its kernelspec, and ``jupyter run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from concur_magics.frontend import Cell, Kernel, running_kernel
from kernel_demo.logo import FILES
from kernel_demo.trace import MIME_TYPE
from tests import browser
from tests.browser import TOKEN, Server

server = browser.server  # the fixture: a real JupyterLab on 127.0.0.1


@pytest.fixture(scope="module")
def demo(kernel_demo_spec: str) -> Iterator[Kernel]:
    with running_kernel("kernel_demo", kernel_dirs=[kernel_demo_spec]) as kernel:
        yield kernel


def messages(kernel: Kernel, cell: Cell, msg_type: str) -> list[dict[str, Any]]:
    """The content of every ``msg_type`` message the cell published."""
    kernel.pump(0.2)
    return [m["content"] for m in kernel.messages
            if m["msg_type"] == msg_type and m["parent_header"].get("msg_id") == cell.msg_id]


def ok(kernel: Kernel, code: str) -> Cell:
    cell = kernel.execute(code, timeout=60)
    assert cell.status == "ok", cell.text
    return cell


# ------------------------------------------------------------------ IPython's display


def test_ipython_display_publishes_rich_data(demo: Kernel) -> None:
    cell = ok(demo, "from IPython.display import display as ipy_display, HTML, Markdown\n"
                    "ipy_display(HTML('<b>x</b>'), Markdown('*y*'))")
    shown = messages(demo, cell, "display_data")
    assert [d["data"].get("text/html") for d in shown] == ["<b>x</b>", None]
    assert shown[1]["data"]["text/markdown"] == "*y*"
    assert "IPython.core.display.HTML object" not in cell.stdout


def test_display_handle_and_update_display(demo: Kernel) -> None:
    first = ok(demo, "from IPython.display import display as ipy_display, update_display\n"
                     "h = ipy_display('a', display_id=True)\nh")
    display_id = messages(demo, first, "display_data")[0]["transient"]["display_id"]
    assert first.results[-1]["text/plain"] == f"<DisplayHandle display_id={display_id}>"
    second = ok(demo, "h.update('b')\nupdate_display('c', display_id=h.display_id)")
    updates = messages(demo, second, "update_display_data")
    assert [(u["data"]["text/plain"], u["transient"]["display_id"]) for u in updates] == [
        ("'b'", display_id), ("'c'", display_id)]


def test_ipython_clear_output_waits(demo: Kernel) -> None:
    cell = ok(demo, "from IPython.display import clear_output as ipy_clear\nprint('soon gone')\nipy_clear(wait=True)")
    assert messages(demo, cell, "clear_output") == [{"wait": True}]
    assert "\x1b" not in "".join(s["text"] for s in messages(demo, cell, "stream"))


def test_our_display_and_clear_output_stay(demo: Kernel) -> None:
    cell = ok(demo, "display(42, display_id='mine')\nclear_output()")
    assert messages(demo, cell, "display_data")[0]["transient"] == {"display_id": "mine"}
    assert messages(demo, cell, "clear_output") == [{"wait": False}]


def test_a_cell_value_is_formatted_by_ipython(demo: Kernel) -> None:
    cell = ok(demo, "from IPython.display import HTML\nHTML('<i>v</i>')")
    assert cell.results[-1]["text/html"] == "<i>v</i>"


def test_matplotlib_shows_inline(demo: Kernel) -> None:
    cell = ok(demo, "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()")
    assert [d["data"]["image/png"][:8] for d in messages(demo, cell, "display_data")] == ["iVBORw0K"]  # a PNG
    cell = ok(demo, "plt.plot([2, 1]);")  # no show(): the figure is shown when the cell ends
    assert len(messages(demo, cell, "display_data")) == 1
    assert cell.stderr == ""


# ------------------------------------------------------------------ %dispatch


def test_dispatch_is_one_output_with_the_table_and_the_records(demo: Kernel) -> None:
    demo.client.kernel_info(reply=True, timeout=5)
    cell = ok(demo, "%dispatch 5")
    assert [o["output_type"] for o in cell.outputs] == ["execute_result"]
    data = cell.outputs[0]["data"]
    assert set(data) == {"text/plain", "text/html", MIME_TYPE}
    assert "kernel_info_request" in data["text/plain"] and "<table>" in data["text/html"]
    assert [r["msg_type"] for r in data[MIME_TYPE]][-2:] == ["kernel_info_request", "execute_request"]


# ------------------------------------------------------------------ the kernelspec's logo


def test_the_installed_kernelspec_has_the_logo(kernel_demo_spec: str) -> None:
    spec = Path(kernel_demo_spec) / "kernel_demo"
    assert sorted(p.name for p in spec.iterdir()) == sorted(["kernel.json", *FILES])
    assert (spec / "logo-64x64.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jupyterlab_lists_the_logo(server: Server) -> None:
    with urllib.request.urlopen(f"{server.url}/api/kernelspecs?token={TOKEN}", timeout=30) as response:
        specs = json.load(response)["kernelspecs"]
    resources = specs["kernel_demo"]["resources"]
    assert {"logo-32x32", "logo-64x64", "logo-svg"} <= set(resources)
    with urllib.request.urlopen(f"{server.url}{resources['logo-64x64']}?token={TOKEN}", timeout=30) as response:
        assert response.read()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ jupyter run


def test_jupyter_run_runs_a_file(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text("print('hello from a file')\nprint(6 * 7)\n")
    jupyter = os.path.join(os.path.dirname(sys.executable), "jupyter")
    # 60 s: a cold kernel start on a busy machine; the run itself takes well under a second.
    done = subprocess.run([jupyter, "run", "--kernel", "kernel_demo", str(script)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "JUPYTER_PLATFORM_DIRS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello from a file\n42\n"
