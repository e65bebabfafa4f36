"""Every example notebook runs clean, unattended, in a real kernel (nbclient), and is stored with
the outputs of its current code: no path of the machine that ran it, no key, and a closing cell
that says what happened on the event loop."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
from types import ModuleType
from typing import Any

import nbformat
import pytest

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
CLOSING = "## What happened on the event loop"


def _load_refresh() -> ModuleType:
    spec = importlib.util.spec_from_file_location("examples_refresh", EXAMPLES / "refresh.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


refresh = _load_refresh()


def _stored(path: pathlib.Path) -> Any:
    return nbformat.read(path, as_version=4)


def _kinds(cell: Any) -> set[str]:
    """What a code cell shows: stream names and mime types. Standard error is left out: a warning
    from a library may come in one run and not in another."""
    kinds = set()
    for out in cell.outputs:
        if out.output_type == "stream":
            kinds.add(out.name)
        elif out.output_type == "error":
            kinds.add("error")
        else:
            kinds |= set(out.get("data", {}))
    return kinds - {"stderr"}


def test_there_are_examples() -> None:
    assert NOTEBOOKS, f"no notebooks in {EXAMPLES}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: pathlib.Path) -> None:
    notebook = _stored(path)
    # Each notebook must finish within a minute on 2 cores (cells within 60 s each); a failing cell
    # raises CellExecutionError with its traceback.
    refresh.execute(notebook, timeout=60)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors
    # What the cells show when run is stored too (a plot as image/png, a printed line as stdout).
    stored = {cell.id: cell for cell in _stored(path).cells}
    missing = {cell.id: sorted(_kinds(cell) - _kinds(stored[cell.id])) for cell in code if cell.id in stored}
    missing = {cell_id: kinds for cell_id, kinds in missing.items() if kinds}
    assert not missing, (
        f"{path.name} stores less than it shows when run (by cell id: {missing}); "
        f"run {refresh.COMMAND} {path.stem}"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_outputs_come_from_the_current_code(path: pathlib.Path) -> None:
    notebook = _stored(path)
    recorded = notebook.metadata.get("concur_examples", {}).get("code_sha256")
    command = f"{refresh.COMMAND} {path.stem}"
    assert recorded == refresh.code_sha256(notebook), (
        f"{path.name}: its stored outputs were not made by its current code; run {command}"
    )
    unrun = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and c.execution_count is None]
    assert not unrun, f"{path.name}: cells {unrun} were not run; run {command}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_notebook_shows_no_local_path_or_key(path: pathlib.Path) -> None:
    notebook = _stored(path)
    assert refresh.leaks(notebook) == []
    # Metadata a reader's frontend needs, and nothing of the run (timings, widget state).
    assert set(notebook.metadata) == {"kernelspec", "language_info", "concur_examples"}
    assert notebook.metadata.kernelspec == refresh.KERNELSPEC
    assert all(not cell.metadata for cell in notebook.cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_ends_with_what_happened_on_the_event_loop(path: pathlib.Path) -> None:
    last = _stored(path).cells[-1]
    assert last.cell_type == "markdown" and last.source.startswith(CLOSING + "\n"), last.source[:80]
    body = last.source[len(CLOSING):]
    assert body.count(". ") >= 3, f"{path.name}: a few sentences, please: {body!r}"


def test_the_checks_see_stale_outputs_paths_and_keys() -> None:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    before = refresh.code_sha256(notebook)
    notebook.cells[0].source = "print(2)"
    assert refresh.code_sha256(notebook) != before
    shown = {
        "this repository": f"saved in {refresh.EXAMPLES}/data",
        "a home directory": "see /home/someone/notes.txt",
        "a temporary file": "'/tmp/tmpab12cd/x.db'",
        "a connection file": "{'key': 'a1b2c3d4-e5f6', 'signature_scheme': 'hmac-sha256'}",
        "a server's token": "http://127.0.0.1:8888/lab?token=0a1b2c3d4e5f",
        "nothing": "data/recentchange.jsonl, key: wiki",
    }
    for what, text in shown.items():
        notebook.cells[0].outputs = [nbformat.v4.new_output("display_data", data={"text/plain": text})]
        assert bool(refresh.leaks(notebook)) == (what != "nothing"), (what, refresh.leaks(notebook))


# Runnable scripts (the other .py files are modules the notebooks import). refresh.py rewrites the
# notebooks: its way of running them is what test_notebook_runs uses.
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py")
                 if '__name__ == "__main__"' in p.read_text() and p.name != "refresh.py")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_script_runs(path: pathlib.Path) -> None:
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_dispatch_trace_example_shows_a_request_answered_while_a_cell_awaits() -> None:
    script = EXAMPLES / "dispatch_trace.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "completed while the cell awaited: ['total'] | cell replied yet: False" in done.stdout
    assert "complete_request     complete_request" in done.stdout
