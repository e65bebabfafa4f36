"""compile_cell: one parse, everything a runner needs."""

from __future__ import annotations

import asyncio

import pytest

from concur_magics import compile_cell


def test_last_expression_is_the_value() -> None:
    namespace: dict[str, object] = {}
    assert compile_cell("x = 2\nx * 21").run(namespace) == 42
    assert namespace["x"] == 2


def test_no_last_expression_gives_none() -> None:
    assert compile_cell("y = 1").run({}) is None


def test_names_assigned_deleted_and_read() -> None:
    cell = compile_cell(
        "import os.path\nfrom math import tau as t\nz = a + 1\nfor i in b: pass\n"
        "def f():\n    global g\n    g = c\nclass K: pass\ndel old\nw = [v for v in d]"
    )
    assert cell.assigned == {"os", "t", "z", "i", "f", "g", "K", "w"}
    assert cell.deleted == {"old"}
    assert cell.reads == {"a", "b", "c", "d"}


def test_a_name_bound_before_it_is_read_is_not_an_input() -> None:
    assert compile_cell("n = 1\nn + m").reads == {"m"}
    assert compile_cell("n = n + 1").reads == {"n"}


def test_top_level_await_is_detected_and_runs() -> None:
    cell = compile_cell("import asyncio\nawait asyncio.sleep(0)\n'done'")
    assert cell.is_async
    with pytest.raises(TypeError, match="top-level await"):
        cell.run({})
    assert asyncio.run(cell.run_async({})) == "done"


def test_tracebacks_show_the_cell_source() -> None:
    cell = compile_cell("x = 1\n1 / 0", first_line=2)
    with pytest.raises(ZeroDivisionError, match="division by zero") as info:
        cell.run({})
    entry = info.traceback[-1]
    assert entry.lineno + 1 == 3  # pytest counts from 0; line 3 of the cell (after the magic line)
    assert str(entry.statement).strip() == "1 / 0"


def test_syntax_errors_surface() -> None:
    with pytest.raises(SyntaxError, match="invalid syntax"):
        compile_cell("def (:")
