"""Hardening: a mixed soak, restart and shutdown with everything running, fuzzed arguments and
messages. Bounded: each test has its own time limit and reports its figures on stdout (-s)."""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from jupyter_client.session import Session

from concur_magics.frontend import Kernel, running_kernel
from concur_magics.magics import ConcurMagics, parse_args
from tests.conftest import run, value


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mixed_soak_loses_nothing_and_leaves_nothing(fresh_kernel: Kernel) -> None:
    kernel = fresh_kernel
    run(kernel, "import threading")
    ours_left = "[t.name for t in threading.enumerate() if t.name.startswith('concur-')]"
    rss_before = psutil.Process(kernel.pid).memory_info().rss
    soak = r'''
import asyncio, random, time, concur_magics
from concur_magics import background, CellTimeout
from concur_magics.schedule import every
rng = random.Random(1)
jobs = []
for i in range(400):
    jobs.append(background(lambda i=i: sum(range(i * 100)), show=False))
for i in range(500):
    jobs.append(background(asyncio.sleep(rng.random() * 0.2, i), show=False))
for i in range(20):
    jobs.append(background("x = %d\nx * 2" % i, mode="dask", show=False))
for i in range(80):
    jobs.append(every("pass", 0.01, times=3, shell=get_ipython(), namespace={}))
for job in rng.sample(jobs, 100):
    job.cancel()
timeouts = {"signal": 0, "process": 0}
for i in range(100):
    for mode in timeouts:
        try:
            concur_magics.run_with_timeout(time.sleep, 0.02, 5, mode=mode)
        except CellTimeout:
            timeouts[mode] += 1
len(jobs)
'''
    cell = run(kernel, soak, timeout=240)
    assert cell.status == "ok", cell.text
    run(kernel, "%jobs wait --timeout 120", timeout=180)
    statuses = value(kernel, "sorted(__import__('collections').Counter(j.status for j in jobs).items())")
    outcomes = value(kernel, "all(j.done() and (j.cancelled() or j.exception() is not None or j.status == 'done') for j in jobs)")
    print(f"\nsoak: 1,000 jobs {statuses}; timeouts {value(kernel, 'timeouts')}")
    assert outcomes == "True"
    assert "pending" not in statuses and "running" not in statuses
    assert value(kernel, "timeouts") == "{'signal': 100, 'process': 100}"
    run(kernel, "%dask close\n%jobs clear\nimport gc; gc.collect()", timeout=60)
    # Every thread we start is named concur-*; distributed keeps process-wide helper threads of its
    # own once used (Dask-Offload, Dask-Callback-Thread), which are not ours to stop.
    try:
        kernel.wait_until(lambda: value(kernel, ours_left) == "[]", 30, "our threads to end")
    except TimeoutError:
        pytest.fail(f"threads left: {value(kernel, ours_left)}")
    print("soak: threads now", value(kernel, "[t.name for t in threading.enumerate()]").replace("\n", ""))
    workers = [p for p in kernel.children() if "resource_tracker" not in " ".join(p.cmdline())]
    assert workers == []
    growth = (psutil.Process(kernel.pid).memory_info().rss - rss_before) / 2**20
    print(f"soak: kernel memory growth {growth:.0f} MiB")
    # Generous: the soak imports Dask's client side and keeps results of a thousand jobs.
    assert growth < 400


def test_restart_and_shutdown_with_everything_running() -> None:
    with running_kernel() as kernel:
        run(kernel, "%load_ext concur_magics")
        run(kernel, "%%background\nwhile True:\n    pass")
        run(kernel, "%%background\nimport asyncio\nawait asyncio.sleep(600)")
        run(kernel, "c = %clock --interval 0.2")
        run(kernel, "%%every 100ms\npass")
        run(kernel, "%%background --dask\nimport time\ntime.sleep(600)", timeout=120)
        kernel.execute("%%timeout 600 --mode process\nimport time\ntime.sleep(600)", wait=False)
        kernel.wait_until(lambda: len(kernel.children()) >= 3, 60, "the cluster and the child")
        old = [psutil.Process(kernel.pid), *psutil.Process(kernel.pid).children(recursive=True)]
        kernel.manager.restart_kernel(now=False)
        gone, alive = psutil.wait_procs(old, timeout=30)
        assert alive == [], alive
        kernel.client.wait_for_ready(timeout=60)
        kernel.pump(0.5)
        cell = run(kernel, "%load_ext concur_magics")
        assert cell.status == "ok", cell.text
        assert run(kernel, "%%timeout 5\n'loaded again'").results[-1]["text/plain"] == "'loaded again'"
        run(kernel, "%%background\nimport time\ntime.sleep(600)")
        run(kernel, "%%background --dask\n1", timeout=120)
        survivors = [p for p in psutil.Process(kernel.pid).children(recursive=True)]
        kernel.manager.shutdown_kernel(now=False)
    gone, alive = psutil.wait_procs(survivors, timeout=30)
    assert alive == [], alive


# ----------------------------------------------------------------------------- argument fuzzing

@pytest.fixture(scope="module")
def magics() -> Iterator[ConcurMagics]:
    shell = InteractiveShell.instance()
    yield ConcurMagics(shell=shell)
    InteractiveShell.clear_instance()


TOKENS = st.sampled_from([
    "1", "0", "-1", "0.5", "500ms", "2m", "banana", "--mode", "signal", "process", "dask", "thread", "loop",
    "--timeout", "--times", "3", "-n", "name", "-o", "var", "2x", "--dask", "--interval", "--format", "%H",
    "--stop", "cancel", "wait", "clear", "list", "connect", "close", "info", "--", "-", "''", "\"", "nan", "inf",
])
LINES = st.one_of(st.lists(TOKENS, max_size=6).map(" ".join), st.text(max_size=40))


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=LINES, which=st.sampled_from(["timeout", "background", "jobs", "clock", "every", "dask"]))
def test_any_argument_line_parses_or_is_a_usage_error(magics: ConcurMagics, line: str, which: str) -> None:
    magic = getattr(magics, which)
    try:
        parse_args(magic, line)
    except UsageError as exc:
        assert str(exc).strip(), "a usage error must say something"
        assert f"%{which} " in str(exc) or f"%{which}\n" in str(exc) or f"%{which} [" in str(exc)


# ----------------------------------------------------------------------------- kernel_demo fuzzing

@pytest.fixture(scope="module")
def demo(kernel_demo_spec: str) -> Iterator[Kernel]:
    with running_kernel("kernel_demo", kernel_dirs=[kernel_demo_spec]) as kernel:
        yield kernel


def _mutations(rng: random.Random, session: Session, good: Session) -> list[list[bytes]]:
    msg = good.msg("execute_request", {"code": "fuzzed = True", "silent": False})
    frames = good.serialize(msg)
    out: list[list[bytes]] = []
    for _ in range(200):
        kind = rng.randrange(7)
        f = [bytes(x) for x in frames]
        if kind == 0:
            f[1] = bytes(rng.randrange(256) for _ in range(64))  # wrong signature
        elif kind == 1:
            f = f[: rng.randrange(1, len(f))]  # truncated
        elif kind == 2:
            f[rng.randrange(2, len(f))] = b"{not json"
        elif kind == 3:
            f[-1] = b"x" * (2**20)  # a huge frame
        elif kind == 4:
            content = json.dumps({"code": rng.choice([1, None, [], {}]), "silent": "yes"}).encode()
            msg2 = session.msg("execute_request", json.loads(content))
            f = session.serialize(msg2)  # signed with a wrong key
        elif kind == 5:
            f = [bytes(rng.randrange(256) for _ in range(rng.randrange(40))) for _ in range(rng.randrange(1, 9))]
        else:
            header = json.dumps({"msg_type": 7, "msg_id": None}).encode()
            f = [b"<IDS|MSG>", b"", header, b"{}", b"{}", b"{}"]
        out.append(f)
    return out


def test_fuzzed_messages_on_every_socket_leave_the_kernel_answering(demo: Kernel) -> None:
    rng = random.Random(11)
    info = demo.manager.get_connection_info()
    good = Session(key=demo.manager.session.key)
    wrong = Session(key=b"wrong")
    context = zmq.Context.instance()
    for port, kind in (("shell_port", zmq.DEALER), ("control_port", zmq.DEALER), ("stdin_port", zmq.DEALER),
                       ("iopub_port", zmq.SUB), ("hb_port", zmq.REQ)):
        sock = context.socket(kind)
        sock.linger = 0
        sock.connect(f"tcp://{info['ip']}:{info[port]}")
        try:
            for frames in _mutations(rng, wrong, good)[:60 if kind == zmq.REQ else 200]:
                if kind == zmq.SUB:
                    sock.setsockopt(zmq.SUBSCRIBE, frames[0][:8])
                elif kind == zmq.REQ:
                    sock.send(frames[0] or b"ping")
                    assert sock.poll(5000), "the heartbeat stopped echoing"
                    sock.recv()
                else:
                    sock.send_multipart(frames)
        finally:
            sock.close()
    time.sleep(1)
    assert demo.request("kernel_info_request", channel="control")["content"]["status"] == "ok"
    assert run(demo, "6 * 7").results[-1]["text/plain"] == "42"
    assert run(demo, "'fuzzed' in globals()").results[-1]["text/plain"] == "False"


def test_it_binds_only_where_the_connection_file_says(demo: Kernel) -> None:
    info = demo.manager.get_connection_info()
    wanted = {info[p] for p in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")}
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(demo.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {(info["ip"], port) for port in wanted}


# A kernelspec whose kernel exits at once (as one whose port was taken does) on the first N starts,
# counted in a file, then runs an ipykernel.
FLAKY_START = """
import os, sys
import time
count, limit, connection_file, how = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
started = len(open(count).read()) if os.path.exists(count) else 0
open(count, "a").write("x")
if started < limit and how == "hangs":
    time.sleep(600)  # as a kernel that lost a port can hang in its exit
if started < limit:
    sys.exit("Address already in use (a stand-in)")
os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", "-f", connection_file])
"""


def _flaky_spec(root: Path, failures: int, how: str = "exits") -> str:
    spec = root / "flaky"
    spec.mkdir()
    argv = [sys.executable, "-c", FLAKY_START, str(root / "starts"), str(failures), "{connection_file}", how]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "flaky", "language": "python"}))
    return str(root)


@pytest.mark.parametrize("how", ["exits", "hangs"])
def test_a_kernel_that_exits_or_hangs_as_it_starts_is_started_again(tmp_path: Path, how: str) -> None:
    spec = _flaky_spec(tmp_path, failures=2, how=how)
    with running_kernel("flaky", kernel_dirs=[spec], startup_timeout=5 if how == "hangs" else 30) as kernel:
        assert value(kernel, "6 * 7") == "42"
    assert (tmp_path / "starts").read_text() == "xxx"  # two that failed, the third runs


def test_a_kernel_that_never_starts_fails_after_three_tries(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="Kernel died before replying"):
        with running_kernel("flaky", kernel_dirs=[_flaky_spec(tmp_path, failures=99)], startup_timeout=30):
            pass
    assert (tmp_path / "starts").read_text() == "xxx"
