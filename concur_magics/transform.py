"""Let the kernel *await* the magics that must wait on its own event loop.

IPython turns ``%%timeout 2`` cells and ``%jobs wait`` lines into synchronous calls
(``get_ipython().run_cell_magic(...)``). A synchronous call can't wait for work that needs the very
loop it blocks: a cell that awaits, or a loop job. This input transformer rewrites those calls into
``await``-ed calls of the magics' async twins; the kernel then sees a cell with top-level ``await``
and runs it as a coroutine on its loop, as it does any such cell. Calls inside functions are left
alone (``await`` is not allowed there).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

from . import compat
from .cells import awaits_at_top_level

__all__ = ["await_loop_magics"]

_REGISTRY = compat.magics_instance("ConcurMagics")


def await_loop_magics(shell: Any) -> Callable[[list[str]], list[str]]:
    """An ``input_transformers_post`` entry for ``shell``."""

    def transform(lines: list[str]) -> list[str]:
        source = "".join(lines)
        if "timeout" not in source and "jobs" not in source:
            return lines  # neither magic: no need to parse
        try:
            tree = ast.parse(source)
        except SyntaxError:
            return lines  # IPython reports it
        edits: list[tuple[ast.Call, str]] = []
        for call in _module_level_calls(tree):
            replacement = _replacement(call, shell)
            if replacement is not None:
                edits.append((call, replacement))
        if not edits:
            return lines
        return _apply(source, edits).splitlines(keepends=True)

    return transform


def _replacement(call: ast.Call, shell: Any) -> str | None:
    magic = compat.magic_call(call)
    if magic is None:
        return None
    kind, name, args = magic
    if kind == "run_cell_magic" and name == "timeout":
        line, body = args
        try:
            if not awaits_at_top_level(shell.transform_cell(body)):
                return None
        except SyntaxError:
            return None  # the synchronous magic reports it, in the cell
        return f"(await {_REGISTRY}.timeout_async({line!r}, {body!r}))"
    if kind == "run_line_magic" and name == "jobs" and args[0].split()[:1] == ["wait"]:
        return f"(await {_REGISTRY}.jobs_async({args[0]!r}))"
    return None


def _module_level_calls(tree: ast.Module) -> list[ast.Call]:
    calls: list[ast.Call] = []
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Call):
            calls.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return calls


def _apply(source: str, edits: list[tuple[ast.Call, str]]) -> str:
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(lineno: int, col: int) -> int:
        # ast columns count UTF-8 bytes.
        line = lines[lineno - 1]
        return starts[lineno - 1] + len(line.encode()[:col].decode(errors="ignore"))

    spans = [
        (offset(c.lineno, c.col_offset), offset(c.end_lineno or c.lineno, c.end_col_offset or 0), text)
        for c, text in edits
    ]
    for start, end, text in sorted(spans, reverse=True):
        source = source[:start] + text + source[end:]
    return source
