"""The README can't drift: every fenced block in it is run here, or says why it can't be.

What a block holds decides how it is checked:

- **An IPython transcript** (``In [N]: ...``, ``   ...: ...``, then what the cell shows, a value
  after ``Out[N]:``). Each input runs as a cell in a real ipykernel, in order. A transcript that
  starts at ``In [1]`` gets a fresh kernel, with the extension loaded without counting as a cell;
  any other continues the kernel of the block before it. So ``In [N]`` and ``Out[N]`` are the
  kernel's own numbers. A cell passes when what it shows — its streams, its values and displays as
  text/plain, an error as its traceback's last line — reads as the README says at some moment
  between its run and the end of its kernel (a job fills its cell after the reply; a clock's
  display changes), once :func:`normalise` has masked what differs from run to run.
- **A ``python`` block** shows code only: it runs as one cell in the current kernel and must not fail.
- **A shell session** (``$ command``, then what it prints): each command runs from the
  repository's root, ``.venv/bin/`` standing for this interpreter's directory, with a Jupyter data
  directory of its own (so ``--user`` installs there).
- **The layout** (marked ``<!-- readme-test: layout -->``): every module it lists exists, and every
  module is listed.
- Anything else must be marked ``<!-- readme-test: skip (why) -->`` on the line before its fence.

In what is shown, ``...`` at the end of a line (or alone on one) stands for any text, and
``← a note`` is a note to the reader.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from concur_magics.frontend import Cell, Kernel, running_kernel, strip_ansi

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->\s*\Z")
IN = re.compile(r"^In \[(\d+)\]: ?(.*)$")
MORE = re.compile(r"^   \.\.\.: ?(.*)$")
NOTE = re.compile(r"\s*←.*$")

# What varies from run to run, masked on both sides, in this order (a time of day before its
# digits are read as decimals, an address before its port).
VARIES = [
    (re.compile(r"\b\d{2}:\d{2}:\d{2}(\.\d+)?\b"), "<TIME>"),
    (re.compile(r"\b\d{2}-\d{2}-\d{4}\b"), "<DATE>"),
    (re.compile(r"\b\d{1,3}(\.\d{1,3}){3}(:\d+)?\b"), "<ADDRESS>"),
    (re.compile(r"\bpid \d+"), "pid <PID>"),
    (re.compile(r"\b0x[0-9a-f]+\b"), "<HEX>"),
    (re.compile(r"(?<![\w.:/>])/[\w.\-/]+"), "<PATH>"),
    # A decimal is a measurement: seconds, milliseconds, GiB.
    (re.compile(r"\b\d+\.\d+\b"), "<DECIMAL>"),
    # Six digits or more: a count of loop rounds, a kernel's memory in bytes.
    (re.compile(r"\b\d{6,}\b"), "<COUNT>"),
]

CELL_TIMEOUT = 60  # s: the slowest README cell takes a few seconds; a hung one fails, not hangs.
SETTLE = 15  # s: after a kernel's last cell, for its jobs to fill their cells (the longest runs ~2 s).


def normalise(text: str) -> str:
    """``text`` with what varies from run to run masked and every run of white space one space."""
    for pattern, mask in VARIES:
        text = pattern.sub(mask, text)
    return " ".join(text.split())


def shows(expected: str, actual: str) -> bool:
    """Does ``actual`` read as ``expected``, once normalised, ``...`` at a line's end matching anything?"""
    parts = re.split(r"\.\.\.$", expected, flags=re.M)
    pattern = r"\s*.*?\s*".join(re.escape(normalise(part)) for part in parts)
    return re.fullmatch(pattern, normalise(actual), flags=re.S) is not None


@dataclass
class Block:
    line: int  # of the opening fence
    lang: str
    text: str
    marker: str | None  # what the <!-- readme-test: ... --> before the fence says

    @property
    def kind(self) -> str:
        if self.marker is not None:
            return self.marker.split()[0]
        if IN.match(self.text.partition("\n")[0]):
            return "transcript"
        if self.text.startswith("$ "):
            return "shell"
        return self.lang or "unknown"


def blocks() -> list[Block]:
    """Every fenced block of the README, in order, with the marker on the line before it."""
    text = README.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(line, match[1], match[2], marker[1] if marker else None))
    return found


@dataclass
class Example:
    """One input of a transcript and what the README shows under it."""

    number: int
    code: str
    shown: str
    line: int
    cell: Cell | None = None
    seen: list[str] = field(default_factory=list)  # distinct texts the cell showed, for the failure

    def matches(self) -> bool:
        assert self.cell is not None
        now = rendered(self.cell)
        if now not in self.seen:
            self.seen.append(now)
        return shows(self.shown, now)


def transcript(block: Block) -> list[Example]:
    """The inputs of a transcript, each with what the README shows under it (notes removed)."""
    examples: list[Example] = []
    for offset, raw in enumerate(block.text.splitlines(), 1):
        line = NOTE.sub("", raw)
        start, more = IN.match(line), MORE.match(line)
        if start:
            examples.append(Example(int(start[1]), start[2], "", block.line + offset))
        elif more and examples and not examples[-1].shown:
            examples[-1].code += "\n" + more[1]
        else:
            examples[-1].shown += line + "\n"
    return examples


def rendered(cell: Cell) -> str:
    """What a terminal frontend shows under ``cell``: ``Out[N]:`` before a value, an error as the
    last line of its traceback."""
    parts = []
    for out in cell.outputs:
        kind = out["output_type"]
        if kind == "stream":
            parts.append(out["text"])
        elif kind == "error":
            lines = [line for line in strip_ansi("\n".join(out["traceback"])).splitlines() if line.strip()]
            parts.append((lines[-1] if lines else f"{out['ename']}: {out['evalue']}") + "\n")
        else:
            plain = out["data"].get("text/plain", "")
            if kind == "execute_result":
                plain = f"Out[{out['execution_count']}]:" + ("\n" if "\n" in plain else " ") + plain
            parts.append(plain + "\n")
    return "".join(parts)


def test_the_normaliser_masks_what_varies_and_nothing_else() -> None:
    assert shows("<Job #1 ticker [thread] done 0.9 s: for i in range(3):>",
                 "<Job #1 ticker [thread] done 12.3 s: for i in range(3):>")
    assert not shows("<Job #1 ticker [thread] done 0.9 s: x>", "<Job #2 ticker [thread] done 0.9 s: x>")
    assert not shows("<Job #1 ticker [thread] done 0.9 s: x>", "<Job #1 ticker [thread] running 0.9 s: x>")
    assert shows("killed (pid 3563 at tcp://127.0.0.1:46575)", "killed (pid 77 at tcp://10.1.2.3:1)")
    assert not shows("Out[3]: (90, 90)", "Out[3]: (90, 91)")
    assert not shows("Out[3]: 5", "Out[4]: 5")
    assert shows("Out[3]: 32152349", "Out[3]: 44907264")
    assert shows("a\n...\nz", "a\nb\nc\nz") and not shows("a\n...\nz", "a\nb")
    assert shows("stopped: ...", "stopped: it ran 0.8 s past") and shows("f(..., 1)", "f(..., 1)")
    assert not shows("f(..., 1)", "f(x, 1)")


def test_every_block_is_run_or_says_why_not(capsys: pytest.CaptureFixture[str]) -> None:
    found = blocks()
    unknown = [f"README.md:{b.line}: a {b.kind} block" for b in found
               if b.kind not in ("transcript", "python", "shell", "layout", "skip")]
    assert not unknown, ("no test runs these; mark each with <!-- readme-test: skip (why) --> "
                         "before its fence, or make it runnable:\n" + "\n".join(unknown))
    skipped = Counter(b.marker.partition(" ")[2] for b in found if b.kind == "skip" and b.marker)
    assert all(skipped), "a skipped block must say why: <!-- readme-test: skip (why) -->"
    kinds = Counter(b.kind for b in found)
    with capsys.disabled():
        print(f"\nREADME: {len(found)} fenced blocks: {dict(kinds)}; skipped:")
        for reason, count in sorted(skipped.items()):
            print(f"  {count} {reason}")
    # The parser must keep finding the examples: a broken pattern would pass with none.
    assert kinds["transcript"] >= 10 and kinds["python"] >= 2, kinds


def kernel_runs() -> list[tuple[bool, list[tuple[Block, list[Example]]]]]:
    """The transcripts and python blocks, grouped by the kernel they run in: whether that kernel
    loads the extension first (without counting it as a cell), and its blocks with their inputs."""
    runs: list[tuple[bool, list[tuple[Block, list[Example]]]]] = []
    for block in blocks():
        if block.kind == "transcript":
            examples = transcript(block)
        elif block.kind == "python":
            examples = [Example(0, block.text, "", block.line)]
        else:
            continue
        if not runs or examples[0].number == 1:
            runs.append((examples[0].number == 1, []))
        runs[-1][1].append((block, examples))
    return runs


def test_transcripts_and_python_blocks_show_what_runs() -> None:
    runs = kernel_runs()
    assert len(runs) >= 3, runs  # a fresh kernel per section that starts at In [1]
    problems: list[str] = []
    for load, run in runs:
        pending: list[Example] = []
        with running_kernel(startup_timeout=60) as kernel:
            if load:
                loaded = kernel.execute("%load_ext concur_magics", store_history=False, timeout=CELL_TIMEOUT)
                assert loaded.status == "ok", loaded.text
            for block, examples in run:
                for example in examples:
                    problems += run_example(kernel, block, example, pending)
            problems += settle(kernel, pending)
    assert not problems, "\n\n".join(problems)


def run_example(kernel: Kernel, block: Block, example: Example, pending: list[Example]) -> list[str]:
    """Run one input; while it runs, check the examples still waiting for their output."""
    cell = example.cell = kernel.execute(example.code, wait=False)
    kernel.wait_until(lambda: _check(pending) and cell.idle and cell.reply is not None, CELL_TIMEOUT,
                      f"README.md:{example.line}")
    assert cell.reply is not None
    if block.kind == "python":
        if cell.reply["status"] != "ok" or cell.error is not None:
            return [f"README.md:{example.line}: the python block failed:\n{rendered(cell)}"]
        return []
    pending.append(example)
    if cell.reply["execution_count"] != example.number:
        return [f"README.md:{example.line}: In [{example.number}] ran as In [{cell.reply['execution_count']}]"]
    return []


def _check(pending: list[Example]) -> bool:
    """Drop the examples that now show what the README shows; always True (for ``wait_until``)."""
    pending[:] = [example for example in pending if not example.matches()]
    return True


def settle(kernel: Kernel, pending: list[Example]) -> list[str]:
    """Give the kernel's jobs time to fill their cells; the examples that never matched, explained."""
    try:
        kernel.wait_until(lambda: not _check(pending) or not pending, SETTLE, "the README's outputs")
    except TimeoutError:
        pass
    problems = [
        f"README.md:{example.line}: In [{example.number}]: {example.code.splitlines()[0]}\n"
        f"the README shows:\n{example.shown}"
        + "".join(f"the kernel showed:\n{seen}" for seen in example.seen[-2:])
        for example in pending
    ]
    pending.clear()
    return problems


def test_shell_sessions_print_what_they_show(tmp_path: Path) -> None:
    sessions = [b for b in blocks() if b.kind == "shell"]
    assert sessions
    # Jupyter finds kernelspecs in this data directory (``--user``), this interpreter's prefix and
    # the system's; not in the ones the other tests add.
    env = {**os.environ, "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_PLATFORM_DIRS": "1"}
    for name in ("JUPYTER_PATH", "PYTEST_CURRENT_TEST"):
        env.pop(name, None)
    problems = []
    for block in sessions:
        for command, shown in re.findall(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", block.text, flags=re.M):
            line = command.replace(".venv/bin/", os.path.dirname(sys.executable) + "/")
            done = subprocess.run(line, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            if done.returncode != 0 or not shows(shown, done.stdout):
                problems.append(f"README.md:{block.line}: $ {command}\nthe README shows:\n{shown}"
                                f"it printed (exit status {done.returncode}):\n{done.stdout}{done.stderr}")
    assert not problems, "\n\n".join(problems)


def test_the_layout_lists_every_module() -> None:
    (layout,) = [b for b in blocks() if b.kind == "layout"]
    listed, package = set(), ""
    for line in layout.text.splitlines():
        if re.match(r"\w+/$", line):
            package = line
        elif line.startswith("  ") and package:
            listed.add(package + line.split()[0])
        else:
            package = ""
            for directory in line.split():
                assert (ROOT / directory).is_dir(), f"the layout lists {directory}, which is not there"
    modules = {f"{path.parent.name}/{path.name}" for package in ("concur_magics", "kernel_demo")
               for path in (ROOT / package).glob("*.py")}
    assert listed == modules, f"not in the layout: {sorted(modules - listed)}; gone: {sorted(listed - modules)}"
