"""What a cell sends to Dask must pickle: each input is checked before anything is sent.

A Dask task's arguments are pickled when it is submitted; a value that can't be (a lock, an open
socket or file, a generator) would fail there, seconds later and deep in distributed's
serialisation. :func:`check_picklable` finds such inputs first and names each one, its type and
why it doesn't pickle.
"""

from __future__ import annotations

from typing import Any

__all__ = ["UnpicklableInputs", "check_picklable"]


class UnpicklableInputs(TypeError):
    """Inputs of a cell that can't be sent to Dask.

    Attributes
    ----------
    problems:
        ``{name: "type: why"}`` for each input that failed to pickle, in the cell's order.
    """

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = dict(problems)
        listed = "; ".join(f"{name} ({why})" for name, why in problems.items())
        super().__init__(
            f"can't send to Dask, these inputs can't be serialised: {listed}. Nothing was sent; "
            "make them inside the cell, or pass what they hold instead"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (UnpicklableInputs, (self.problems,))


class _Discard:
    """A file that forgets what is written: pickling is tried without keeping the bytes."""

    def write(self, data: Any) -> int:
        return len(memoryview(data))


def check_picklable(inputs: dict[str, Any]) -> None:
    """Check that every input of a cell pickles, as Dask will need it to.

    Each value is pickled (with cloudpickle, as distributed does for what the standard pickle
    refuses) into a sink that keeps nothing; large buffers (NumPy arrays and the like) are passed
    out of band and not copied. Jobs and Dask futures are skipped: they travel as Dask
    dependencies, not as values.

    Parameters
    ----------
    inputs:
        The names a cell reads and their values.

    Raises
    ------
    UnpicklableInputs
        A ``TypeError`` naming each input that can't be pickled, its type, and the pickling error.
    """
    import cloudpickle
    from distributed import Future

    from .jobs import Job

    problems: dict[str, str] = {}
    for name, value in inputs.items():
        if isinstance(value, (Job, Future)):
            continue
        try:
            cloudpickle.CloudPickler(_Discard(), protocol=5, buffer_callback=_ignore).dump(value)
        except Exception as exc:  # noqa: BLE001 - any failure means it can't go; we say which and why
            problems[name] = f"a {_type_name(value)}: {type(exc).__name__}: {exc}"
    if problems:
        raise UnpicklableInputs(problems)


def _ignore(buffer: Any) -> None:
    return None


def _type_name(value: Any) -> str:
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"
