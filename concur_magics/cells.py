"""Compile a cell once, into what every runner needs.

A cell body goes through IPython's own input transformers (so ``%magics`` and ``!shell`` lines keep
working inside it), is parsed once, and comes out as a :class:`CompiledCell`: code for the body, code
for its last expression (whose value a runner returns), whether it awaits at top level, and which
names it reads and assigns. Runners never look at source text again.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import inspect
import linecache
from dataclasses import dataclass, field
from types import CodeType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

__all__ = ["CompiledCell", "awaits_at_top_level", "compile_cell"]

_AWAIT_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


@dataclass(frozen=True)
class CompiledCell:
    """A cell body, compiled once and ready to run in a namespace.

    Attributes
    ----------
    source:
        The Python source after IPython's transformers.
    filename:
        The name its code objects and tracebacks use (registered with ``linecache``).
    first_line:
        The line of the cell on which ``source`` starts.
    body:
        Code for every statement but a trailing expression; ``None`` if there are none.
    last_expr:
        Code (``eval`` mode) for the trailing expression whose value the cell shows, or ``None``.
    is_async:
        True when the cell uses ``await``, ``async for`` or ``async with`` at top level; its code
        objects then return coroutines when evaluated.
    assigned:
        Names the cell binds at module level (assignments, imports, ``def``, ``class``, ``for``
        targets, ``with ... as``, ``global`` declarations inside functions).
    deleted:
        Names the cell removes with ``del`` at module level.
    reads:
        Names the cell reads that it does not bind first and that are not builtins.
    """

    source: str
    filename: str
    first_line: int
    body: CodeType | None
    last_expr: CodeType | None
    is_async: bool
    assigned: frozenset[str] = field(default_factory=frozenset)
    deleted: frozenset[str] = field(default_factory=frozenset)
    reads: frozenset[str] = field(default_factory=frozenset)

    def run(self, namespace: dict[str, Any]) -> Any:
        """Run a synchronous cell in ``namespace`` and return its last expression's value.

        Raises
        ------
        TypeError
            If the cell awaits at top level: use :meth:`run_async`.
        """
        __tracebackhide__ = True
        if self.is_async:
            raise TypeError("this cell uses top-level await; run it with run_async()")
        if self.body is not None:
            exec(self.body, namespace)
        if self.last_expr is not None:
            return eval(self.last_expr, namespace)
        return None

    async def run_async(self, namespace: dict[str, Any]) -> Any:
        """Run the cell (awaiting it if it awaits) in ``namespace``; return its last value."""
        __tracebackhide__ = True
        value: Any = None
        for code, is_expr in ((self.body, False), (self.last_expr, True)):
            if code is None:
                continue
            result = eval(code, namespace)
            if inspect.iscoroutine(result) and code.co_flags & inspect.CO_COROUTINE:
                result = await result
            if is_expr:
                value = result
        return value


def compile_cell(
    raw: str,
    *,
    shell: InteractiveShell | None = None,
    first_line: int = 1,
    filename: str | None = None,
) -> CompiledCell:
    """Transform and compile a cell body.

    Parameters
    ----------
    raw:
        The cell body as the user typed it (for a cell magic: the lines after the ``%%`` line).
    shell:
        The IPython shell whose transformers and traceback file naming to use; without one the body
        must be plain Python.
    first_line:
        The line number of the body's first line in the cell, so tracebacks point at the line the
        user sees (2 for the body of a cell magic). When the kernel's running cell ends with the
        body, its place there wins (a magic under ``%%capture`` starts a line later), and its
        lines above the body (the magic's own line) show in tracebacks.
    filename:
        Use this name for the code (a cell compiled again elsewhere, e.g. on a Dask worker, keeps
        the name under which the kernel shows its source).

    Raises
    ------
    SyntaxError
        If the transformed body is not valid Python.
    """
    source = shell.transform_cell(raw) if shell is not None else raw
    first_line, above = _place_in_cell(raw, shell, first_line)
    padded = "\n" * (first_line - 1) + source
    filename = filename or _register_source(above + source, raw, shell)
    tree = ast.parse(padded, filename=filename)
    last: ast.expr | None = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1].value
        del tree.body[-1]
    body = compile(tree, filename, "exec", flags=_AWAIT_FLAGS, dont_inherit=True) if tree.body else None
    last_code = None
    if last is not None:
        last_code = compile(
            ast.Expression(last), filename, "eval", flags=_AWAIT_FLAGS, dont_inherit=True
        )
    is_async = any(
        code is not None and bool(code.co_flags & inspect.CO_COROUTINE) for code in (body, last_code)
    )
    assigned, deleted, reads = _scan_names(ast.parse(padded))
    return CompiledCell(
        source=source,
        filename=filename,
        first_line=first_line,
        body=body,
        last_expr=last_code,
        is_async=is_async,
        assigned=frozenset(assigned),
        deleted=frozenset(deleted),
        reads=frozenset(reads),
    )


def awaits_at_top_level(source: str) -> bool:
    """Whether Python ``source`` uses ``await`` (or ``async for`` / ``async with``) at top level.

    Raises
    ------
    SyntaxError
        If ``source`` is not valid Python.
    """
    code = compile(source, "<cell>", "exec", flags=_AWAIT_FLAGS, dont_inherit=True)
    return bool(code.co_flags & inspect.CO_COROUTINE)


def _place_in_cell(raw: str, shell: InteractiveShell | None, first_line: int) -> tuple[int, str]:
    """Where a magic's body sits in the cell the user ran: its first line, and the text above it.

    Without a kernel, or when the body is not the tail of the running cell: ``first_line`` and
    blank lines.
    """
    blank = (first_line, "\n" * (first_line - 1))
    if shell is None or first_line == 1 or not raw.strip():
        return blank
    from . import compat

    cell = (compat.running_cell(shell) or "").rstrip()
    body = raw.rstrip()
    if not cell.endswith(body):
        return blank
    above = cell[: len(cell) - len(body)]
    if not above.endswith("\n"):
        return blank
    return above.count("\n") + 1, above


def _register_source(padded: str, raw: str, shell: InteractiveShell | None) -> str:
    """Make the source visible to tracebacks; return the filename code objects should carry.

    ``padded`` is the source as tracebacks list it: the lines above it in its cell, then itself.
    """
    if shell is not None:
        from . import compat

        filename = compat.cell_filename(shell, padded, compat.cell_number(shell), raw)
        if filename is not None:
            return filename
    digest = hashlib.sha1(padded.encode()).hexdigest()[:12]
    filename = f"<concur-cell-{digest}>"
    lines = padded.splitlines(keepends=True)
    # mtime None: linecache.checkcache leaves entries without a real file alone.
    linecache.cache[filename] = (len(padded), None, lines, filename)
    return filename


def _scan_names(tree: ast.Module) -> tuple[set[str], set[str], set[str]]:
    """Names a module binds, deletes and reads at its top level (approximately, never executing)."""
    assigned: set[str] = set()
    deleted: set[str] = set()
    reads: set[str] = set()
    for stmt in tree.body:
        for node in _module_scope_nodes(stmt):
            if isinstance(node, ast.Name):
                if isinstance(node.ctx, ast.Store):
                    assigned.add(node.id)
                elif isinstance(node.ctx, ast.Del):
                    deleted.add(node.id)
                elif node.id not in assigned:
                    reads.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                assigned.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if alias.name != "*":
                        assigned.add(alias.asname or alias.name.split(".")[0])
    # `global x` inside a function binds x in the namespace when the function runs.
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            assigned.update(node.names)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            reads.update(_free_reads(node) - assigned)
    reads -= set(dir(builtins))
    return assigned, deleted, reads


def _module_scope_nodes(stmt: ast.stmt) -> list[ast.AST]:
    """Nodes of one statement that live in module scope (not inside functions or comprehensions)."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = [stmt]
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # Decorators, defaults and annotations run in module scope; the body does not.
            stack.extend(node.decorator_list)
            stack.extend(d for d in (*node.args.defaults, *node.args.kw_defaults) if d is not None)
            continue
        if isinstance(node, ast.ClassDef):
            stack.extend(node.decorator_list)
            stack.extend(node.bases)
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            # Only the first iterable is evaluated in the enclosing scope.
            stack.append(node.generators[0].iter)
            continue
        # Children in source order so a read after an assignment is not counted as an input.
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    # Assignments bind after their value is computed: visit `x = x + 1` value first.
    return _value_before_target(out)


def _value_before_target(nodes: list[ast.AST]) -> list[ast.AST]:
    """Reorder so loads in an assignment's value come before its stored names."""
    stores = [n for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
    others = [n for n in nodes if not (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))]
    return others + stores


def _free_reads(fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> set[str]:
    """Names a function loads that it does not bind locally (candidates for globals)."""
    local: set[str] = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    loads: set[str] = set()
    body = fn.body if isinstance(fn.body, list) else [fn.body]
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name):
                if isinstance(node.ctx, ast.Load):
                    loads.add(node.id)
                else:
                    local.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                local.add(node.name)
            elif isinstance(node, ast.Global):
                local.difference_update(node.names)
    return loads - local
