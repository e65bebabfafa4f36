"""Render the diagrams in ``docs/`` from their Graphviz sources.

Each ``docs/NAME.dot`` becomes ``docs/NAME.svg``, and the SVG carries the SHA-256 of the source it
was drawn from, as a comment (``<!-- source sha256: ... -->``). The test suite compares that hash
with the source, so a diagram can't silently fall behind its source, and the tests need no Graphviz.

After editing a ``.dot`` file, re-render and commit both files::

    apt-get install -y --no-install-recommends graphviz   # once: the ``dot`` command
    python docs/render_diagrams.py
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
MARK = "<!-- source sha256: {} -->"


def source_hash(source: Path) -> str:
    """The SHA-256 (hex) of a diagram's source file, as embedded in its SVG."""
    return hashlib.sha256(source.read_bytes()).hexdigest()


def render(source: Path) -> Path:
    """Render ``source`` (a ``.dot`` file) to the SVG beside it; return the SVG's path.

    Raises
    ------
    RuntimeError
        When Graphviz's ``dot`` command is not installed.
    """
    dot = shutil.which("dot")
    if dot is None:
        raise RuntimeError("Graphviz's `dot` is not installed (apt-get install graphviz)")
    svg = subprocess.run([dot, "-Tsvg", str(source)], check=True, capture_output=True, text=True).stdout
    # The mark goes after the XML declaration, which must stay the document's first line.
    declaration, _, rest = svg.partition("\n")
    target = source.with_suffix(".svg")
    target.write_text(f"{declaration}\n{MARK.format(source_hash(source))}\n{rest}")
    return target


def main() -> int:
    for source in sorted(DOCS.glob("*.dot")):
        print(f"rendered {render(source).relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
