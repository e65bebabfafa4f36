"""Tracebacks of the user's code only, shown the way IPython shows a failing cell.

Work we run fails inside our machinery: a ``%%timeout`` cell is called from the magic's
``get_ipython().run_cell_magic(...)`` line, through the magic and the deadline's scope; a job's
code is called from a driver in a thread or a task. Formatted as they are, those tracebacks show
our frames, IPython's ``[... skipping hidden N frame]`` lines and the magic's call line. Here the
traceback *object* is cut to the user's frames (:func:`user_frames`) and then formatted by the
shell's own formatter (``shell.InteractiveTB``), so the lines are those of a plain cell: the same
``Cell In[7], line 3`` labels, source lines and colours.

Where the frames live decides where they are cut:

* a ``%%timeout`` cell: where the magic catches the exception; the lines reach IPython through the
  exception's ``_render_traceback_`` hook (:func:`with_user_traceback`), which IPython calls
  instead of formatting the whole traceback.
* a job: when its traceback is shown in its cell (:func:`job_traceback`).
* a forked child or a Dask worker: there, where the frames are. A child formats the lines itself
  (it is a copy of the kernel, with the same shell and cell sources); a worker has no shell (nor
  this package), so it sends the frames (``concur_magics.remote.carried_frames``) and the kernel
  formats them (:func:`rebuilt_frames`), knowing every cell's label and source.
"""

from __future__ import annotations

import os
from types import CodeType, FrameType, TracebackType
from typing import Any

__all__ = [
    "Frames",
    "carried_frames",
    "format_traceback",
    "job_traceback",
    "rebuilt_frames",
    "stack_frames",
    "user_frames",
    "with_rendered_traceback",
    "with_user_traceback",
]

# A frame as it travels between processes: (file name, function's qualified name, line, the
# function's first line).
Frames = list[tuple[str, str, int, int]]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_frames(tb: TracebackType | None) -> TracebackType | None:
    """The user's part of a traceback that starts in (or passes through) our machinery.

    Frames before the first of ours (the caller of a magic: its ``run_cell_magic`` line and
    IPython's frames) and every frame of ours (this package's, or marked ``__tracebackhide__``)
    are left out, as long as a frame of the user's follows ours; a traceback without ours is
    returned whole. The original traceback is not changed: the result is a new chain over the
    same frames (so their source, locals and highlighting still show).
    """
    entries: list[TracebackType] = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    ours = [_is_ours(entry.tb_frame) for entry in entries]
    if True in ours:
        first = ours.index(True)
        after = next((i for i in range(first, len(ours)) if not ours[i]), None)
        if after is not None:  # the caller of our code is not the user's concern
            entries, ours = entries[after:], ours[after:]
    return _chain([entry for entry, mine in zip(entries, ours) if not mine])


def stack_frames(frame: FrameType | None, below: CodeType) -> TracebackType | None:
    """The running stack up to ``frame``, as a traceback of the frames called from ``below``.

    For where a computation *is* rather than where it raised (a process-mode child at its
    deadline). None if ``frame`` was not called from a frame running ``below``.
    """
    entries: list[TracebackType] = []
    while frame is not None and frame.f_code is not below:
        entries.append(TracebackType(None, frame, frame.f_lasti, frame.f_lineno))
        frame = frame.f_back
    if frame is None:
        return None
    return _chain(entries[::-1])


def _chain(entries: list[TracebackType]) -> TracebackType | None:
    tb = None
    for entry in reversed(entries):
        tb = TracebackType(tb, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return tb


def _is_ours(frame: FrameType) -> bool:
    if frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        return True
    try:
        hide = frame.f_locals.get("__tracebackhide__")
    except Exception:  # noqa: BLE001 - a frame whose locals can't be read is the user's
        return False
    return bool(hide) and hide != "__ipython_bottom__"  # IPython's own marker for where cells start


def format_traceback(error: BaseException, shell: Any = None) -> list[str]:
    """Format ``error`` with its user's frames only, as IPython shows a failing cell.

    Parameters
    ----------
    shell:
        The shell whose traceback formatter to use (it knows which file is which cell); default
        the running one, else IPython's verbose formatter with a plain file name per frame.
    """
    return _format(error, user_frames(error.__traceback__), shell)


def _format(error: BaseException, tb: TracebackType | None, shell: Any = None) -> list[str]:
    from . import compat

    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    return compat.format_traceback(shell, error, tb)


def job_traceback(shell: Any, error: BaseException) -> list[str]:
    """The lines to show for a job that failed with ``error``: its own rendering if it carries one
    (a child's, or a ``%%timeout`` inside the job), else its user's frames."""
    render = getattr(error, "_render_traceback_", None)
    if render is not None:
        return list(render())
    return format_traceback(error, shell)


class RenderedTraceback:
    """IPython's ``_render_traceback_`` hook: the lines to show for one exception.

    Formats the user's frames on first call (in the kernel, with the shell then running), or
    returns lines made elsewhere. Pickles as its lines, so the exception still travels.
    """

    def __init__(
        self, error: BaseException | None, tb: TracebackType | None, lines: list[str] | None = None
    ) -> None:
        self._error = error
        self._tb = tb
        self._lines = lines

    def __call__(self) -> list[str]:
        if self._lines is None:
            assert self._error is not None
            self._lines = _format(self._error, self._tb)
            self._error = self._tb = None  # formatted once: let the frames go
        return self._lines

    def __reduce__(self) -> tuple[Any, ...]:
        return (RenderedTraceback, (None, None, self()))


def with_user_traceback(error: BaseException) -> BaseException:
    """Make IPython show ``error`` with the user's frames of its traceback as it is now.

    Call where the exception is caught in our code, before it travels on through frames of no
    interest to the user (a magic's call line). An exception that already carries its lines (from
    a child, or an inner ``%%timeout``) keeps them. Returns ``error``.
    """
    if getattr(error, "_render_traceback_", None) is None:
        _attach(error, RenderedTraceback(error, user_frames(error.__traceback__)))
    return error


class CellSyntaxError(Exception):
    """A syntax error in a magic's body, shown exactly as IPython shows one in a plain cell: the
    cell's line and a caret, no frames (nothing ran). Not a ``SyntaxError`` subclass, because IPython
    lists every frame of those — and none of them are the user's. ``syntax_error`` is the original."""

    syntax_error: SyntaxError


def tidy_syntax_error(shell: Any, error: SyntaxError) -> BaseException:
    """What a magic raises for a syntax error in its body (see :class:`CellSyntaxError`)."""
    from . import compat

    lines = compat.format_syntax_error(shell, error)
    if lines is None:
        return error
    tidy = CellSyntaxError(str(error))
    tidy.syntax_error = error
    with_rendered_traceback(tidy, lines)
    return tidy


def with_rendered_traceback(error: BaseException, lines: list[str] | None) -> BaseException:
    """Make IPython show ``lines`` for ``error`` (``_render_traceback_``); return ``error``."""
    if lines:
        _attach(error, RenderedTraceback(None, None, list(lines)))
    return error


def _attach(error: BaseException, render: RenderedTraceback) -> None:
    try:
        error._render_traceback_ = render  # type: ignore[attr-defined]
    except AttributeError:  # an exception type without a __dict__: shown with all its frames
        pass


def carried_frames(tb: TracebackType | None) -> Frames | None:
    """The user's frames of ``tb`` as ``(file name, function, line, first line)`` tuples, which
    pickle, for another process to show (:func:`rebuilt_frames`); None if there are none."""
    frames: Frames = []
    tb = user_frames(tb)
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append((code.co_filename, _qualname(code), tb.tb_lineno, code.co_firstlineno))
        tb = tb.tb_next
    return frames or None


def rebuilt_frames(frames: Frames | None) -> TracebackType | None:
    """A traceback standing for :func:`carried_frames`, for the kernel's formatter to show.

    Each frame runs a one-line stand-in compiled under the frame's file name, function name and
    first line, raising at its line: the formatter then labels it as the cell it came from and
    lists that cell's lines around it, as for a frame of its own (only its variables are missing).
    """
    tb = None
    for filename, name, line, first in reversed(frames or []):
        filename = _cell_of(filename, name, first)
        entry = _stand_in(filename, name, line, min(first, line))
        tb = TracebackType(tb, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return tb


def _cell_of(filename: str, name: str, first: int) -> str:
    """The file name of a notebook function's code, which pickling it for a worker replaced.

    Found among the functions (and methods of classes) in the running shell's namespace by name
    and first line; if none or several match, ``filename`` stays.
    """
    from . import compat

    if not compat.pickled_away_filename(filename):
        return filename
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return filename
    found = {code.co_filename for code in _user_code(shell.user_ns)
             if _qualname(code) == name and code.co_firstlineno == first}
    return found.pop() if len(found) == 1 else filename


def _user_code(namespace: dict[str, Any]) -> list[CodeType]:
    codes = []
    for value in list(namespace.values()):
        members = list(vars(value).values()) if isinstance(value, type) else [value]
        for member in members:
            code = getattr(getattr(member, "__func__", member), "__code__", None)
            if isinstance(code, CodeType):
                codes.append(code)
    return codes


def _qualname(code: CodeType) -> str:
    return getattr(code, "co_qualname", code.co_name)


class _StandIn(Exception):
    pass


def _stand_in(filename: str, name: str, line: int, first: int) -> TracebackType:
    # Line numbers count from co_firstlineno: compile the raise at its offset from the first line.
    code = compile("\n" * (line - first) + "raise _StandIn", filename, "exec", dont_inherit=True)
    code = code.replace(co_firstlineno=first, co_name=name.rpartition(".")[2])
    if hasattr(code, "co_qualname"):  # Python 3.11+: what tracebacks show as the function's name
        code = code.replace(co_qualname=name)  # type: ignore[call-arg]
    try:
        exec(code, {"_StandIn": _StandIn, "__name__": "__main__"})  # noqa: S102 - our own one line
    except _StandIn as exc:
        assert exc.__traceback__ is not None and exc.__traceback__.tb_next is not None
        return exc.__traceback__.tb_next
    raise AssertionError("unreachable: the stand-in always raises")
