"""The version matrix: the core suite on every Python we support, newest and oldest releases.

    .venv/bin/nox                  # every session below, one after the other
    .venv/bin/nox -s tests-3.12    # one Python, newest releases
    .venv/bin/nox -s oldest        # the oldest Python with the lowest releases pyproject.toml allows
    .venv/bin/nox -s oldest -- -x tests/test_compat.py    # pytest's arguments after --

The core suite is the whole suite but the browser tests and the soak/benchmark tests (markers
``browser`` and ``slow``); ``.venv/bin/python -m pytest`` still runs everything. Interpreters are
looked up on PATH and in ``~/.pyenv/versions``. A session whose Python is missing is an error,
never a pass. ``bash .ci/run`` runs ``tests-3.12``, ``tests-3.13`` and ``oldest`` side by
side after the whole suite (``tests-3.11`` would repeat that suite's core), and skips, loudly, a
session whose Python the machine lacks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nox

PYTHONS = ["3.11", "3.12", "3.13"]  # as pyproject.toml's requires-python (README: Tested versions)
CORE = "not browser and not slow"

nox.options.sessions = [f"tests-{python}" for python in PYTHONS] + ["oldest"]
nox.options.error_on_missing_interpreters = True
nox.options.default_venv_backend = "uv|virtualenv"  # uv when installed (nox[uv]): much faster installs
# uv must not fetch an interpreter of its own: a missing Python fails the session instead.
os.environ["UV_PYTHON_DOWNLOADS"] = "never"


def _expose_pyenv() -> None:
    """Make pyenv's interpreters findable as ``python3.X`` without putting their ``python3``,
    ``pip`` and scripts on PATH: one link per interpreter in ``.nox/pythons``."""
    links = Path(__file__).parent / ".nox" / "pythons"
    found = False
    for python in sorted(Path.home().glob(".pyenv/versions/3.*/bin/python3.*")):
        if not re.fullmatch(r"python3\.\d+", python.name):
            continue
        links.mkdir(parents=True, exist_ok=True)
        link = links / python.name
        if link.is_symlink() and link.resolve() != python.resolve():
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(python)
        found = True
    if found:
        os.environ["PATH"] = f"{links}{os.pathsep}{os.environ.get('PATH', '')}"


_expose_pyenv()


# What a session reports before its tests: the releases it really got.
VERSIONS = """
import sys
from importlib.metadata import version
names = "ipykernel ipython jupyter-client tornado pyzmq distributed dask cloudpickle tblib traitlets"
print(f"Python {sys.version.split()[0]}", *(f"{name} {version(name)}" for name in names.split()), sep=", ")
"""


def _core_suite(session: nox.Session) -> None:
    session.run("python", "-c", VERSIONS)
    session.run("python", "-m", "pytest", "-m", CORE, "-p", "no:cacheprovider", "-q", *session.posargs)


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The core suite with the newest releases of everything."""
    session.install("-e", ".[test]")
    _core_suite(session)


@nox.session(python=PYTHONS[0])
def oldest(session: nox.Session) -> None:
    """The core suite with the lowest release of each dependency that pyproject.toml allows (its
    floors, as ``==``; the test tools stay at their newest), on the oldest Python."""
    project = nox.project.load_toml("pyproject.toml")["project"]
    floors = [*project["dependencies"], *project["optional-dependencies"]["examples"]]
    pins = []
    for requirement in floors:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()  # type: ignore[union-attr]
        pins.append(f"{name}=={floor}")
    constraints = Path(session.create_tmp()) / "oldest.txt"
    constraints.write_text("\n".join(pins) + "\n")
    session.log("pinned to the floors: " + ", ".join(pins))
    session.install("-c", str(constraints), "-e", ".[test]")
    _core_suite(session)
