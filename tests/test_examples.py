"""Every example notebook runs clean, unattended, in a real kernel (nbclient)."""

from __future__ import annotations

import pathlib
import tempfile

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from concur_magics.frontend import python_kernelspec_dir

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def test_there_are_examples() -> None:
    assert NOTEBOOKS, f"no notebooks in {EXAMPLES}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: pathlib.Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        specs = KernelSpecManager(kernel_dirs=[python_kernelspec_dir(tmp)], ensure_native_kernel=False)
        manager = KernelManager(kernel_name="concur-python", kernel_spec_manager=specs)
        # Each notebook must finish within a minute on 2 cores (cells within 60 s each).
        client = NotebookClient(notebook, km=manager, timeout=60, startup_timeout=60,
                                resources={"metadata": {"path": str(EXAMPLES)}})
        client.execute(cleanup_kc=True)  # we made the manager, so tell nbclient to clean up
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors


# Runnable scripts (the other .py files are modules the notebooks import).
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if '__name__ == "__main__"' in p.read_text())


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_script_runs(path: pathlib.Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_dispatch_trace_example_shows_a_request_answered_while_a_cell_awaits() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(EXAMPLES / "dispatch_trace.py")], capture_output=True, text=True, timeout=120)
    assert "completed while the cell awaited: ['total'] | cell replied yet: False" in done.stdout
    assert "complete_request     complete_request" in done.stdout
