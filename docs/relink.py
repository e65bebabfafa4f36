"""Move the guide's line links to where the code they name now is: ``python docs/relink.py``.

A line link is ``[`code`](../path.py#L123)`` (see tests/test_docs.py, which fails when one no longer
points at its code). After an edit shifts lines, this rewrites each such link to the line nearest
its old one that holds the code (a range ``#L120-L125`` moves as a whole), and prints what it moved
and what it could not find — those need a hand.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
PAGES = [DOCS / "how-a-kernel-works.md"]
LINK = re.compile(r"\[`(?P<code>[^`]+)`\]\((?P<path>[^)#\s]+)#L(?P<first>\d+)(?:-L(?P<last>\d+))?\)")


def relink(page: Path) -> list[str]:
    """Rewrite ``page``'s moved line links; return one line per link moved or lost."""
    notes: list[str] = []

    def move(match: re.Match[str]) -> str:
        path = (page.parent / match["path"]).resolve()
        if not path.is_file():
            return match[0]
        lines = path.read_text().splitlines()
        first, last = int(match["first"]), int(match["last"] or match["first"])
        names = re.compile(".*".join(re.escape(part) for part in match["code"].split("...")))
        if any(names.search(line) for line in lines[first - 1:last]):
            return match[0]
        found = [i for i, line in enumerate(lines, 1) if names.search(line)]
        if not found:
            notes.append(f"lost: {match[0]}")
            return match[0]
        now = min(found, key=lambda i: abs(i - first))
        shift = now - first
        span = f"#L{now}" + (f"-L{last + shift}" if match["last"] else "")
        notes.append(f"moved: `{match['code']}` {match['path']} L{first} -> L{now}")
        return f"[`{match['code']}`]({match['path']}{span})"

    text = page.read_text()
    page.write_text(LINK.sub(move, text))
    return notes


if __name__ == "__main__":
    notes = [note for page in PAGES for note in relink(page)]
    print("\n".join(notes) or "every line link points at its code")
    sys.exit(1 if any(note.startswith("lost") for note in notes) else 0)
