"""Process mode at its edges: who owns the children.

Every test drives a real ipykernel with the extension loaded.
"""

from __future__ import annotations

from concur_magics.frontend import Kernel
from tests.conftest import run, value


# ----------------------------------------------------------------------------- 1. who owns children


def test_children_registry_holds_the_child_while_it_runs_and_kill_all_stops_it(fresh_kernel: Kernel) -> None:
    code = (
        "import threading, time\n"
        "import concur_magics.process as process\n"
        "children = process.Children()\n"
        "outcome = []\n"
        "def go():\n"
        "    try:\n"
        "        process.run_in_child(lambda ns: time.sleep(60), {}, 120, children=children)\n"
        "    except BaseException as exc:\n"
        "        outcome.append(f'{type(exc).__name__}: {exc}')\n"
        "thread = threading.Thread(target=go)\n"
        "thread.start()\n"
        "started = time.monotonic()\n"
        "while not len(children) and time.monotonic() - started < 30:\n"
        "    time.sleep(0.01)\n"
        "running = children.pids()\n"
        "children.kill_all()\n"
        "thread.join(30)\n"
        "(len(running), len(children), thread.is_alive())"
    )
    cell = run(fresh_kernel, code)
    assert cell.status == "ok", cell.text
    assert cell.results[-1]["text/plain"] == "(1, 0, False)"
    outcome = value(fresh_kernel, "outcome")
    assert "ChildDied" in outcome and "stopped by its owner" in outcome, outcome
    # The child and its group are gone and reaped.
    assert fresh_kernel.children() == []
    # No module-level registry is left to share between shells.
    assert value(fresh_kernel, "[hasattr(process, n) for n in ('kill_all', '_live')]") == "[False, False]"


def test_the_extension_owns_one_registry_and_unload_kills_through_it(fresh_kernel: Kernel) -> None:
    code = (
        "import threading, time\n"
        "import concur_magics.process as process\n"
        "from concur_magics.lifetime import Extension\n"
        "ext = Extension._loaded[id(get_ipython())]\n"
        "failed = []\n"
        "def go():\n"
        "    try:\n"
        "        process.run_in_child(lambda ns: time.sleep(60), {}, 120, children=ext.children)\n"
        "    except process.ChildDied as exc:\n"
        "        failed.append(exc)\n"
        "thread = threading.Thread(target=go)\n"
        "thread.start()\n"
        "started = time.monotonic()\n"
        "while not len(ext.children) and time.monotonic() - started < 30:\n"
        "    time.sleep(0.01)\n"
        "len(ext.children)"
    )
    cell = run(fresh_kernel, code)
    assert cell.results[-1]["text/plain"] == "1", cell.text
    assert fresh_kernel.children() != []
    run(fresh_kernel, "%unload_ext concur_magics")
    assert value(fresh_kernel, "thread.join(30) or (thread.is_alive(), len(failed))") == "(False, 1)"
    assert fresh_kernel.children() == []
