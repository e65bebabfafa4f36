"""The plain-Python API under %%timeout, without IPython."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from concur_magics import (
    CellTimeout,
    compile_cell,
    run_cell_with_timeout,
    run_with_timeout,
    timeout,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

# Generous: proves the work stopped instead of running its full minute (precision: benchmarks/).
STOPPED_WITHIN = 10.0


def test_sleep_is_interrupted_in_the_main_thread() -> None:
    start = time.monotonic()
    with pytest.raises(CellTimeout, match=r"time limit of 0.2 s exceeded \(mode: signal\)"):
        with timeout(0.2):
            time.sleep(60)
    assert time.monotonic() - start < STOPPED_WITHIN


def test_code_that_swallows_the_first_timeout_is_stopped_again(capsys: pytest.CaptureFixture[str]) -> None:
    caught = 0
    with pytest.raises(CellTimeout, match="0.2 s"), timeout(0.2, grace=0.2):
        while True:
            try:
                while True:
                    pass
            except Exception:
                caught += 1
                if caught > 1:
                    raise
    assert caught == 2


def test_no_timeout_when_the_work_is_quick() -> None:
    with timeout(5) as scope:
        total = sum(range(1000))
    assert total == 499500
    assert not scope.expired


def test_a_worker_thread_is_stopped_at_its_next_bytecode() -> None:
    outcome: list[BaseException] = []

    def work() -> None:
        try:
            with timeout(0.2):
                while True:
                    pass
        except CellTimeout as exc:
            outcome.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(STOPPED_WITHIN)
    assert not thread.is_alive()
    assert len(outcome) == 1 and outcome[0].limit == 0.2


def test_run_with_timeout_signal_returns_the_value() -> None:
    assert run_with_timeout(lambda a, b: a + b, 5, 2, b=3) == 5


def test_run_with_timeout_process_kills_a_c_loop() -> None:
    start = time.monotonic()
    with pytest.raises(CellTimeout, match=r"mode: process\); stopped: its process and process group"):
        run_with_timeout(sum, 0.3, range(10**13), mode="process")
    assert time.monotonic() - start < STOPPED_WITHIN


def test_run_with_timeout_process_returns_value_and_relays_output(capsys: pytest.CaptureFixture[str]) -> None:
    def work() -> int:
        print("from the child")
        return 6 * 7

    assert run_with_timeout(work, 10, mode="process") == 42
    assert capsys.readouterr().out == "from the child\n"


def test_run_with_timeout_process_raises_the_childs_exception() -> None:
    def work() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing") as info:
        run_with_timeout(work, 10, mode="process")
    assert any(entry.name == "work" for entry in info.traceback)


def test_cell_in_process_mode_copies_names_back() -> None:
    namespace: dict[str, object] = {"seed": 3}
    cell = compile_cell("squares = [seed * i for i in range(4)]\ndel seed\nlen(squares)")
    assert run_cell_with_timeout(cell, namespace, 10, mode="process") == 4
    assert namespace["squares"] == [0, 3, 6, 9]
    assert "seed" not in namespace


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "soon"])
def test_bad_seconds_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="time limit must be"):
        with timeout(bad):  # type: ignore[arg-type]
            pass


def test_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode must be one of signal, process, dask, got 'thread'"):
        run_with_timeout(print, 1, mode="thread")  # type: ignore[arg-type]


def test_cell_timeout_is_a_timeout_error_and_pickles() -> None:
    error = CellTimeout(2, "process", "killed")
    assert isinstance(error, TimeoutError)
    again = pickle.loads(pickle.dumps(error))
    assert (again.limit, again.mode, again.step) == (2, "process", "killed")
    assert str(again) == str(error)
