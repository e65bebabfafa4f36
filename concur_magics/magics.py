"""The IPython layer: argument parsing, help text, and a call into the plain-Python API."""

from __future__ import annotations

import argparse
import ast
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Enum, Float, TraitError, validate

from .cells import CompiledCell, awaits_at_top_level, compile_cell
from .timeout import MODES, check_seconds, run_cell_with_timeout, run_cell_with_timeout_async

__all__ = ["ConcurMagics", "parse_args"]


def parse_args(magic: Callable[..., Any], line: str) -> argparse.Namespace:
    """Parse a magic's argument line, or raise UsageError with the message and the usage line.

    IPython's parser reports only the message; users also need to see what the magic expects.
    """
    try:
        return parse_argstring(magic, line)
    except UsageError as exc:
        usage = magic.parser.format_usage().strip()  # type: ignore[attr-defined]
        raise UsageError(f"{exc}\n{usage}") from None


def seconds(text: str) -> float:
    """An argparse type for a positive duration: ``2``, ``0.5``, ``500ms``, ``1m``."""
    from dask.utils import parse_timedelta

    try:
        value = parse_timedelta(text, default="seconds")
    except (KeyError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds (or a duration like 500ms), got {text!r}"
        ) from None
    try:
        return check_seconds(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text!r}") from None


@magics_class
class ConcurMagics(Magics):
    """Magics that run cells alongside other work: ``%%timeout``."""

    default_timeout_mode = Enum(
        list(MODES),
        default_value="signal",
        help="How %%timeout stops a cell when --mode is not given: 'signal' raises CellTimeout in "
        "the running code; 'process' runs the cell in a forked child and kills it at the deadline.",
    ).tag(config=True)

    timeout_grace = Float(
        0.5,
        help="Seconds after a signal-mode deadline before the cell is told that its code is stuck "
        "where it can't be interrupted (C code) and that --mode process would stop it.",
    ).tag(config=True)

    @validate("timeout_grace")
    def _check_grace(self, proposal: dict[str, Any]) -> float:
        value = proposal["value"]
        if not 0 < value < float("inf"):
            raise TraitError(f"timeout_grace must be a positive number of seconds, got {value!r}")
        return float(value)

    @magic_arguments()
    @argument("seconds", type=seconds, help="the time limit, e.g. 2, 0.5 or 500ms")
    @argument(
        "--mode",
        choices=MODES,
        default=None,
        help="signal: raise CellTimeout in the running code (pure Python, sleeps, socket and "
        "subprocess waits; an awaiting cell is cancelled); process: run the cell in a forked "
        "child that sees the whole namespace, copy the names it assigns back, and kill it with its "
        "process group at the deadline (also stops C code). "
        "Default: ConcurMagics.default_timeout_mode.",
    )
    @cell_magic
    def timeout(self, line: str, cell: str) -> Any:
        """Run the cell with a deadline; past it the work stops and the cell fails with CellTimeout.

        Examples
        --------
        ::

            In [1]: %%timeout 1
               ...: while True:
               ...:     pass
            CellTimeout: time limit of 1 s exceeded (mode: signal); stopped: CellTimeout was
            raised in the running Python code

            In [2]: %%timeout 5 --mode process
               ...: total = sum(range(10**7))
            In [3]: total
            Out[3]: 49999995000000
        """
        __tracebackhide__ = True
        args, compiled = self._prepare_timeout(line, cell)
        if compiled.is_async and args.mode == "signal":
            raise UsageError(
                "this cell awaits at top level, which %%timeout can run only when it is the cell's "
                "first line (it was reached through another magic); or use --mode process"
            )
        return run_cell_with_timeout(
            compiled,
            self._namespace,
            args.seconds,
            mode=args.mode,
            shell=self.shell,
            grace=self.timeout_grace,
        )

    async def timeout_async(self, line: str, cell: str) -> Any:
        """``%%timeout`` for a cell that awaits at top level; the cell runs on the kernel's loop.

        A transformer (:func:`await_timeout_cells`) routes such cells here so the kernel awaits
        them instead of calling the synchronous magic.
        """
        __tracebackhide__ = True
        args, compiled = self._prepare_timeout(line, cell)
        return await run_cell_with_timeout_async(
            compiled,
            self._namespace,
            args.seconds,
            mode=args.mode,
            shell=self.shell,
            grace=self.timeout_grace,
        )

    @property
    def _namespace(self) -> dict[str, Any]:
        if self.shell is None:
            raise RuntimeError("ConcurMagics needs a shell")
        return self.shell.user_ns  # type: ignore[no-any-return]

    def _prepare_timeout(self, line: str, cell: str) -> tuple[argparse.Namespace, CompiledCell]:
        args = parse_args(self.timeout, line)
        args.mode = args.mode or self.default_timeout_mode
        return args, compile_cell(cell, shell=self.shell, first_line=2)


def await_timeout_cells(shell: Any) -> Callable[[list[str]], list[str]]:
    """An input transformer that makes the kernel await ``%%timeout`` cells that use ``await``.

    IPython turns ``%%timeout 2`` cells into a synchronous ``run_cell_magic(...)`` call, which
    cannot await on the loop it runs on. For a body with top-level await we emit an awaited call to
    :meth:`ConcurMagics.timeout_async` instead; the kernel then runs the cell as a coroutine on its
    own loop, as it does any cell that awaits.
    """

    def transform(lines: list[str]) -> list[str]:
        source = "".join(lines)
        if "run_cell_magic('timeout'" not in source:
            return lines
        call = _single_cell_magic_call(source, "timeout")
        if call is None:
            return lines
        line, body = call
        try:
            if not awaits_at_top_level(shell.transform_cell(body)):
                return lines
        except SyntaxError:
            return lines  # the synchronous magic reports it, in the cell
        return [
            "await get_ipython().magics_manager.registry['ConcurMagics']"
            f".timeout_async({line!r}, {body!r})\n"
        ]

    return transform


def _single_cell_magic_call(source: str, name: str) -> tuple[str, str] | None:
    """``(line, body)`` if ``source`` is exactly ``get_ipython().run_cell_magic(name, line, body)``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return None
    call = tree.body[0].value
    if not (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "run_cell_magic"
        and len(call.args) == 3
        and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in call.args)
    ):
        return None
    magic, line, body = (a.value for a in call.args)  # type: ignore[attr-defined]
    return (line, body) if magic == name else None
