"""%dask connect that fails cleanly and keeps what works, distributed's log kept out of cells,
inputs that can't be pickled named before anything is sent, tls:// clusters, and what %dask shows."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from concur_magics.cluster import ClusterInfo, JobOnCluster, WorkerInfo, check_address
from concur_magics.frontend import Kernel, running_kernel
from concur_magics.shipping import check_picklable
from tests.conftest import refused, run, value

# Generous bounds for a loaded 2-core machine: the connect timeout below is 2 s.
CONNECT = 2.0
WITHIN = CONNECT + 8.0


@pytest.fixture(scope="module")
def connect_kernel(dask_processes: dict[str, object]) -> Iterator[Kernel]:
    """A kernel connected to the module's scheduler (by CONCUR_DASK_SCHEDULER), 2 s connect timeout."""
    env = {"CONCUR_DASK_SCHEDULER": str(dask_processes["address"])}
    with running_kernel(env=env) as kernel:
        cell = run(kernel, f"%load_ext concur_magics\n%config ConcurMagics.dask_connect_timeout = {CONNECT}")
        assert cell.status == "ok", cell.text
        assert run(kernel, "%dask").status == "ok"
        yield kernel


class Stranger:
    """A TCP server on 127.0.0.1 that is not a Dask scheduler: it sends garbage, or says nothing."""

    def __init__(self, garbage: bool) -> None:
        self.garbage = garbage
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="stranger", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.held.append(conn)
            if self.garbage:
                conn.sendall(b"SSH-2.0-OpenSSH_9.6 hello, this is not Dask\r\n" * 4)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.mark.parametrize("garbage", [True, False], ids=["garbage", "silent"])
def test_connecting_to_a_stranger_fails_in_time_and_keeps_the_cluster(
    connect_kernel: Kernel, dask_processes: dict[str, object], garbage: bool
) -> None:
    stranger = Stranger(garbage)
    try:
        start = time.monotonic()
        cell = run(connect_kernel, f"%dask connect {stranger.address}")
        took = time.monotonic() - start
    finally:
        stranger.close()
    assert cell.reply is not None and cell.reply["ename"] == "UsageError", cell.text
    assert took < WITHIN
    why = "answered, but not in Dask's protocol" if garbage else "did not answer as a Dask scheduler within 2 s"
    assert f"the Dask scheduler at {stranger.address}" in cell.stderr and why in cell.stderr, cell.stderr
    assert f"still connected to {dask_processes['address']}" in cell.stderr
    assert "MemoryError" not in cell.text and "Traceback" not in cell.text
    # The working cluster is still connected and in use.
    assert f"Dask scheduler {dask_processes['address']}" in value(connect_kernel, "%dask")
    done = run(connect_kernel, "%%timeout 30 --mode dask\n6 * 7")
    assert done.results[-1]["text/plain"] == "42", done.text


def test_a_failed_address_is_forgotten_by_close(connect_kernel: Kernel, dask_processes: dict[str, object]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]  # a port nothing listens on once this block ends
    nowhere = f"tcp://127.0.0.1:{port}"
    try:
        assert "disconnected from" in run(connect_kernel, "%dask close").stdout
        # distributed's logging is as it was before the kernel connected.
        assert value(connect_kernel, HANDLERS) == "['StreamHandler']"
        for code in (f"%dask connect {nowhere}", "%%background --dask\n1"):
            start = time.monotonic()
            cell = run(connect_kernel, code)
            assert time.monotonic() - start < WITHIN
            assert cell.reply is not None and cell.reply["ename"] == "UsageError", cell.text
            assert f"could not reach the Dask scheduler at {nowhere} within 2 s: connection refused" in cell.stderr
            assert "%dask close forgets this address" in cell.stderr
        closing = run(connect_kernel, "%dask close")
        assert f"forgot {nowhere}" in closing.stdout, closing.text
        assert value(connect_kernel, "[m for m in get_ipython().magics_manager.registry.values() "
                     "if type(m).__name__ == 'ConcurMagics'][0].dask_scheduler") == "''"
    finally:
        cell = run(connect_kernel, f"%dask connect {dask_processes['address']}")
        assert cell.status == "ok", cell.text


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("not-an-address", "not a Dask scheduler address: 'not-an-address'"),
        ("tcp://127.0.0.1", "not a Dask scheduler address: 'tcp://127.0.0.1'"),
        ("carrier-pigeon://coop:1", "unknown protocol 'carrier-pigeon'"),
    ],
)
def test_a_malformed_address_is_refused_at_once(connect_kernel: Kernel, address: str, message: str) -> None:
    start = time.monotonic()
    refused(connect_kernel, f"%dask connect {address}", message, "%dask [")
    assert time.monotonic() - start < CONNECT  # no connection attempt


def test_a_malformed_address_in_the_configuration_is_refused(connect_kernel: Kernel) -> None:
    cell = run(connect_kernel, "%config ConcurMagics.dask_scheduler = 'tcp://no-port-here'")
    # %config reports a TraitError itself (as a logged error, the cell's status stays ok).
    assert "dask_scheduler: not a Dask scheduler address: 'tcp://no-port-here'" in cell.text, cell.text
    assert run(connect_kernel, "%%timeout 30 --mode dask\n'still connected'").results[-1]["text/plain"] == "'still connected'"


def test_check_address_reads_host_port_as_tcp() -> None:
    assert check_address("127.0.0.1:8786") == "tcp://127.0.0.1:8786"
    assert check_address(" tls://[::1]:8786 ") == "tls://[::1]:8786"
    with pytest.raises(ValueError, match="expected tcp://HOST:PORT"):
        check_address("tcp://host:port")


HANDLERS = "[type(h).__name__ for h in __import__('logging').getLogger('distributed').handlers]"

BOMB = """%%background --dask -o bomb
def explode():
    raise ValueError('this value does not unpickle in the kernel')
class Bomb:
    def __reduce__(self):
        return (explode, ())
Bomb()"""


def test_distributed_logs_stay_out_of_cells(connect_kernel: Kernel) -> None:
    assert value(connect_kernel, HANDLERS) == "['_ToKernelLog']"
    # The job's value fails to deserialise in the kernel: distributed logs it as CRITICAL from its
    # client thread, while a foreground cell runs.
    job_cell = run(connect_kernel, BOMB)
    foreground = run(connect_kernel, "import time\nfor _ in range(40):\n    time.sleep(0.1)\n"
                     "    if bomb.done(): break\nprint('foreground done')")
    connect_kernel.wait_until(lambda: value(connect_kernel, "bomb.done()") == "True", 30, "the job to end")
    assert foreground.stdout == "foreground done\n", foreground.text
    assert "Failed to deserialize" not in foreground.text and "CRITICAL" not in foreground.text
    assert value(connect_kernel, "bomb.status") == "'error'"
    connect_kernel.wait_until(lambda: job_cell.error is not None, 30, "the job's error in its cell")
    assert "does not unpickle" in job_cell.error["evalue"] or "does not unpickle" in job_cell.text
    assert "CRITICAL" not in job_cell.text


def test_check_picklable_names_each_input_its_type_and_why() -> None:
    import threading as t

    def numbers() -> Iterator[int]:
        yield 1

    with socket.socket() as sock:
        with pytest.raises(TypeError, match=r"lock \(a _thread.lock: TypeError: cannot pickle '_thread.lock' object\)"
                           r".*sock \(a socket.socket: TypeError: cannot pickle 'socket' object\)"
                           r".*gen \(a generator: TypeError: cannot pickle 'generator' object\)"):
            check_picklable({"fine": [1, 2], "lock": t.Lock(), "sock": sock, "gen": numbers(), "f": len})
    check_picklable({"fine": [1, 2], "square": lambda x: x * x})


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A ``dask scheduler`` and ``dask worker`` on 127.0.0.1 speaking only TLS, with a CA made here."""
    import trustme

    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": tmp / "ca.pem", "cert": tmp / "cert.pem", "key": tmp / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    tls = ["--tls-ca-file", str(files["ca"]), "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])]
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    scheduler_file = tmp / "scheduler.json"
    quiet = {"cwd": str(tmp), "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [subprocess.Popen(
        [dask, "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
         "--scheduler-file", str(scheduler_file), *tls], **quiet,  # type: ignore[call-overload]
    )]
    try:
        deadline = time.monotonic() + 60  # a cold start on a loaded machine; usually ~2 s
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            assert time.monotonic() < deadline, "the TLS scheduler did not start within 60 s"
            assert processes[0].poll() is None, "the TLS scheduler exited"
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tls://127.0.0.1:"), address
        processes.append(subprocess.Popen(
            [dask, "worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1",
             "--no-dashboard", *tls], **quiet,  # type: ignore[call-overload]
        ))
        yield {"address": address, **{k: str(v) for k, v in files.items()}}
    finally:
        for process in reversed(processes):
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            process.wait(timeout=30)


def test_a_tls_cluster_through_dask_config_and_through_security(
    connect_kernel: Kernel, tls_cluster: dict[str, str], dask_processes: dict[str, object]
) -> None:
    address = tls_cluster["address"]
    ca, cert, key = tls_cluster["ca"], tls_cluster["cert"], tls_cluster["key"]
    try:
        # Without TLS settings: a clear refusal, and the tcp:// cluster stays.
        cell = run(connect_kernel, f"%dask connect {address}")
        assert cell.reply is not None and cell.reply["ename"] == "UsageError", cell.text
        assert "tls:// needs a CA, a certificate and a key" in cell.stderr
        # distributed's own configuration.
        run(connect_kernel, f"import dask\ndask.config.set({{'distributed.comm.tls.ca-file': {ca!r}, "
            f"'distributed.comm.tls.client.cert': {cert!r}, 'distributed.comm.tls.client.key': {key!r}}})")
        cell = run(connect_kernel, f"%dask connect {address}")
        assert cell.status == "ok", cell.text
        _runs_on_a_worker_of(connect_kernel, address)
        run(connect_kernel, "dask.config.refresh()\n%dask close")
        # A Security object, set with %config.
        run(connect_kernel, f"from distributed import Security\nsecurity = Security(tls_ca_file={ca!r}, "
            f"tls_client_cert={cert!r}, tls_client_key={key!r}, require_encryption=True)")
        cell = run(connect_kernel, f"%config ConcurMagics.dask_security = security\n%dask connect {address}")
        assert cell.status == "ok", cell.text
        _runs_on_a_worker_of(connect_kernel, address)
    finally:
        cell = run(connect_kernel, f"%config ConcurMagics.dask_security = None\n%dask connect {dask_processes['address']}")
        assert cell.status == "ok", cell.text


def _runs_on_a_worker_of(kernel: Kernel, address: str) -> None:
    shown = value(kernel, "%dask")
    assert f"Dask scheduler {address}" in shown
    cell = run(kernel, "%%background --dask -o secure\nimport distributed\n"
               "distributed.get_worker().scheduler.address")
    kernel.wait_until(lambda: value(kernel, "secure.done()") == "True", 30, "the job on the TLS cluster")
    assert value(kernel, "secure.result()") == repr(address), cell.text


def test_dask_shows_workers_and_our_jobs_on_the_cluster(
    connect_kernel: Kernel, dask_processes: dict[str, object]
) -> None:
    run(connect_kernel, "%%background --dask -n napper -o napper\nimport time\ntime.sleep(30)")
    try:
        connect_kernel.wait_until(lambda: "napper" in value(connect_kernel, "%dask"), 10, "the job in %dask")
        cell = run(connect_kernel, "%dask")
        text, page = cell.results[-1]["text/plain"], cell.results[-1]["text/html"]
        assert "workers: 1, threads: 2" in text
        assert "worker" in text and "127.0.0.1" in text
        assert "napper" in text and "running" in text
        assert "<th style='text-align:left'>worker</th>" in page and "napper" in page
        # Letting go of the client would lose the job's result: switching waits for it.
        cell = run(connect_kernel, "%dask connect tcp://127.0.0.1:9")
        assert cell.reply is not None and cell.reply["ename"] == "UsageError", cell.text
        assert (f"not switching to tcp://127.0.0.1:9: 1 job(s) of this kernel still run on "
                f"{dask_processes['address']}") in cell.stderr
        assert f"Dask scheduler {dask_processes['address']}" in value(connect_kernel, "%dask")
    finally:
        run(connect_kernel, "%jobs cancel napper\n%jobs wait napper --timeout 30")


def test_cluster_info_shows_the_dashboard_as_a_link() -> None:
    info = ClusterInfo(
        address="tcp://10.0.0.5:8786", ours=False, workers=1, threads=4, memory=2**33,
        dashboard="http://10.0.0.5:8787/status",
        worker_list=[WorkerInfo("tcp://10.0.0.6:40000", 4, 2**33)],
        jobs=[JobOnCluster(3, "train", "running", 12.5)],
    )
    page = info._repr_html_()
    assert "<a href='http://10.0.0.5:8787/status' target='_blank'>" in page
    assert "<code>tcp://10.0.0.6:40000</code>" in page and "8.0 GiB" in page
    assert ">train<" in page and ">running<" in page
    text = repr(info)
    assert "dashboard: http://10.0.0.5:8787/status" in text
    assert "tcp://10.0.0.6:40000  4" in text and "#3 train  running  12.5 s" in text


@pytest.mark.parametrize("magic", ["%%background --dask -o sent", "%%timeout 30 --mode dask"])
def test_an_unpicklable_input_fails_at_once_and_nothing_is_sent(connect_kernel: Kernel, magic: str) -> None:
    run(connect_kernel, "import threading\nfrom concur_magics.runtime import Runtime\nlock = threading.Lock()\n"
        "sent = None\njobs_before = len(list(Runtime.current().jobs))")
    start = time.monotonic()
    cell = run(connect_kernel, f"{magic}\nwith lock:\n    pass")
    assert time.monotonic() - start < 5  # at once: checked in the kernel, not at the 30 s deadline
    assert cell.error is not None and cell.error["ename"] == "TypeError", cell.text
    assert ("these inputs can't be serialised: lock (a _thread.lock: TypeError: cannot pickle "
            "'_thread.lock' object). Nothing was sent") in cell.error["evalue"]
    assert value(connect_kernel, "sent, len(list(Runtime.current().jobs)) == jobs_before") == "(None, True)"
