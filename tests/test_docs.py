"""The guide (docs/how-a-kernel-works.md) can't rot: its links to lines of our code still point at
what they name, its anchors exist, its diagram was rendered from the current source, and its
frontend script still prints what the guide shows.

Line links follow one convention: ``[`code`](../path.py#L123)`` — the link text is a code span, and
that code appears on line 123 (or within ``#L120-L125``); ``...`` in it stands for anything, so
``LoopThread("iopub", ...)`` matches a call with more arguments. A link whose line moved fails with
the lines where the code is now.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "how-a-kernel-works.md"
PAGES = [GUIDE, ROOT / "README.md", ROOT / "docs" / "architecture.md", ROOT / "examples" / "README.md",
         *sorted((ROOT / "examples").glob("*.ipynb"))]

LINK = re.compile(r"(?<!!)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")
LINE_LINK = re.compile(r"^(?P<path>[^#]+)#L(?P<first>\d+)(?:-L(?P<last>\d+))?$")


def markdown(page: Path) -> str:
    """The Markdown of a page: the file, or a notebook's Markdown cells."""
    if page.suffix != ".ipynb":
        return page.read_text()
    cells = json.loads(page.read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def links(page: Path) -> list[tuple[int, str, str]]:
    """(line number, text, target) of every Markdown link on ``page``, outside code blocks."""
    found = []
    fenced = False
    for number, line in enumerate(markdown(page).splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            found += [(number, m.group(1), m.group(2)) for m in LINK.finditer(line)]
    return found


def slug(heading: str) -> str:
    """The anchor a code host gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    kept = (c for c in text if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc")
    return "".join(kept).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", markdown(page), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_line_links_point_at_what_they_name() -> None:
    problems = []
    count = 0
    for page in PAGES:
        for number, text, target in links(page):
            match = LINE_LINK.match(target)
            if match is None:
                continue
            count += 1
            where = f"{page.relative_to(ROOT)}:{number}: [{text}]({target})"
            code = re.fullmatch(r"`([^`]+)`", text)
            if code is None:
                problems.append(f"{where}: the text of a line link must be one code span")
                continue
            path = (page.parent / match["path"]).resolve()
            if not path.is_file():
                problems.append(f"{where}: no file {path}")
                continue
            lines = path.read_text().splitlines()
            first = int(match["first"])
            last = int(match["last"] or first)
            names = re.compile(".*".join(re.escape(part) for part in code[1].split("...")))
            if not any(names.search(line) for line in lines[first - 1:last]):
                now = [str(i) for i, line in enumerate(lines, 1) if names.search(line)]
                problems.append(f"{where}: not on that line; found on line(s) {', '.join(now) or 'none'}")
    assert count >= 40, f"only {count} line links found: is the pattern still right?"
    assert not problems, "\n".join(problems) + "\n(python docs/relink.py moves links whose code moved)"


def test_relative_links_and_anchors_exist() -> None:
    problems = []
    for page in PAGES:
        for number, text, target in links(page):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                problems.append(f"{page.name}:{number}: no file {path}")
            elif anchor and not anchor.startswith("L") and file.suffix == ".md" and anchor not in anchors(file):
                problems.append(f"{page.name}:{number}: no heading for #{anchor} in {file.name}")
    assert not problems, "\n".join(problems)


def test_readme_links_the_guide_and_the_guide_shows_its_diagram() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docs/how-a-kernel-works.md" in readme
    assert "![" in GUIDE.read_text() and "](kernel-sockets.svg)" in GUIDE.read_text()


def _renderer() -> object:
    spec = importlib.util.spec_from_file_location("render_diagrams", ROOT / "docs" / "render_diagrams.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagrams_were_rendered_from_their_current_source() -> None:
    render = _renderer()
    sources = sorted((ROOT / "docs").glob("*.dot"))
    assert sources
    for source in sources:
        svg = source.with_suffix(".svg")
        assert svg.is_file(), f"{svg.name} is missing: run python docs/render_diagrams.py"
        mark = render.MARK.format(render.source_hash(source))  # type: ignore[attr-defined]
        assert mark in svg.read_text(), (
            f"{svg.name} was not rendered from the current {source.name}: run python docs/render_diagrams.py"
        )


def _blocks_after(text: str, marker: str) -> tuple[str, str]:
    """The first two fenced blocks after ``marker``: the script and what it prints."""
    blocks = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M).findall(text, text.index(marker))
    assert len(blocks) >= 2, f"no script and output after {marker!r}"
    return blocks[0], blocks[1]


def test_the_guides_frontend_script_prints_what_the_guide_shows(kernel_demo_spec: str) -> None:
    text = GUIDE.read_text()
    script, output = _blocks_after(text, "Watch it from the frontend")
    shown = output.splitlines()
    env = {**os.environ, "JUPYTER_PLATFORM_DIRS": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()

    def ids_out(lines: list[str]) -> list[str]:
        return [re.sub(r"\b[0-9a-f]{8}\b", "ID", line).rstrip() for line in lines if line.strip()]

    assert ids_out(printed) == ids_out(shown)
