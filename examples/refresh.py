"""Run the example notebooks and store them with their outputs, so they read well on a code host.

    python examples/refresh.py              # every notebook
    python examples/refresh.py 03 08        # those whose names start with 03 or 08

Each notebook runs with nbclient in a new ipykernel on this interpreter — the kernel the tests use —
with ``examples/`` as its working directory, and is written back with its outputs and execution
counts. Its metadata records a hash of its code cells (``concur_examples.code_sha256``): when a code
cell changes, tests/test_examples.py sees that the stored outputs came from other code and names
this script. A notebook whose outputs show a path of this machine or a key is not written.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

import nbformat
from nbclient import NotebookClient

from concur_magics.frontend import running_kernel

__all__ = ["EXAMPLES", "NOTEBOOKS", "code_sha256", "execute", "leaks", "refresh"]

EXAMPLES = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
COMMAND = "python examples/refresh.py"

# What the stored notebooks name as their kernel: the one a reader has, not the test kernelspec
# they ran on (an ipykernel on the same interpreter, under another name).
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}

# Text that must not be stored: directories of the machine that ran the notebooks, and the ways a
# key or a token is written (a connection file's "key", a URL's ?token=, a signing key).
_ANY_MACHINE = re.compile(r"(?<![\w.~-])/(?:home|root|tmp|Users|var/folders|private/var)/")
_KEYS = re.compile(r"""(?i)["']key["']\s*:|\b(?:key|token|password|secret)\s*=\s*["']?[\w-]{8,}""")


def _local_dirs() -> list[str]:
    dirs = {str(EXAMPLES.parent), str(pathlib.Path.home()), tempfile.gettempdir(), sys.prefix}
    return sorted((d for d in dirs if len(d) > 1), key=len, reverse=True)


def code_sha256(notebook: Any) -> str:
    """The hash of a notebook's code cells, in order: what its stored outputs came from."""
    digest = hashlib.sha256()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode() + b"\0")
    return digest.hexdigest()


def output_texts(notebook: Any) -> list[tuple[int, str]]:
    """``(cell index, text)`` for every text a stored output holds (images excluded)."""
    texts = []
    for index, cell in enumerate(notebook.cells):
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append((index, out.text))
            elif out.output_type == "error":
                texts.append((index, "\n".join([out.ename, out.evalue, *out.traceback])))
            else:
                data = out.get("data", {})
                texts += [(index, str(v)) for k, v in data.items() if not k.startswith("image/")]
    return texts


def leaks(notebook: Any) -> list[str]:
    """What the stored outputs show that they must not: a local path or a key, by cell."""
    found = []
    for index, text in output_texts(notebook):
        for local in _local_dirs():
            if local in text:
                found.append(f"cell {index}: a local path, {local}")
        for pattern in (_ANY_MACHINE, _KEYS):
            found += [f"cell {index}: {match.group(0)!r}" for match in pattern.finditer(text)]
    return found


def execute(notebook: Any, *, timeout: float = 60) -> None:
    """Run ``notebook`` in place in a new kernel, from ``examples/``; raise on a cell's error.

    The kernel is started by :func:`concur_magics.frontend.running_kernel` (its own IPython
    directory, so no user's profile changes what the notebook shows; started again on new ports if
    it loses one as it starts); nbclient runs the cells through a client of its own.

    Raises
    ------
    nbclient.exceptions.CellExecutionError
        If a cell fails (its traceback is in the message).
    nbclient.exceptions.CellTimeoutError
        If a cell runs longer than ``timeout`` seconds.
    """
    os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    # The kernel's own log (ipykernel's start-up warnings) is shown only if the run fails.
    with tempfile.TemporaryFile("w+") as log, running_kernel(cwd=str(EXAMPLES), stderr=log) as kernel:
        client = NotebookClient(
            notebook, km=kernel.manager, timeout=timeout, startup_timeout=60, record_timing=False,
            store_widget_state=False, resources={"metadata": {"path": str(EXAMPLES)}},
        )
        try:
            client.execute()
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read())
            raise
        finally:
            if client.kc is not None:  # nbclient closes its client only in kernels it started
                client.kc.stop_channels()


def refresh(path: pathlib.Path) -> float:
    """Run the notebook at ``path`` and write it back with its outputs; return the seconds it took.

    Raises
    ------
    ValueError
        If an output shows a local path or a key (the notebook is left as it was).
    """
    notebook = nbformat.read(path, as_version=4)
    start = time.monotonic()
    execute(notebook)
    found = leaks(notebook)
    if found:
        raise ValueError(f"{path.name}: not written, its outputs show\n  " + "\n  ".join(found))
    language = notebook.metadata.get("language_info", {})
    made_by = {"code_sha256": code_sha256(notebook), "refresh": f"{COMMAND} {path.stem}"}
    notebook.metadata = nbformat.NotebookNode(
        {"kernelspec": KERNELSPEC, "language_info": language, "concur_examples": made_by}
    )
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return time.monotonic() - start


def select(names: list[str]) -> list[pathlib.Path]:
    """The notebooks named (by the start of their file name), or all of them."""
    if not names:
        return NOTEBOOKS
    chosen = []
    for name in names:
        stem = pathlib.Path(name).stem
        matches = [p for p in NOTEBOOKS if p.stem.startswith(stem)]
        if not matches:
            known = ", ".join(p.stem for p in NOTEBOOKS)
            raise SystemExit(f"no example notebook starts with {stem!r}; there are: {known}")
        chosen += [p for p in matches if p not in chosen]
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="notebooks to run, by the start of their name (default: all)"
    )
    args = parser.parse_args(argv)
    total = time.monotonic()
    for path in select(args.names):
        print(f"{path.name} ...", end=" ", flush=True)
        try:
            print(f"{refresh(path):.1f} s", flush=True)
        except ValueError as exc:
            raise SystemExit(f"\n{exc}") from None
    print(f"done in {time.monotonic() - total:.1f} s")


if __name__ == "__main__":
    main()
