"""The IPython layer: argument parsing, help text, and a call into the plain-Python API."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.utils.process import arg_split
from traitlets import Enum, Float, Instance, TraitError, Unicode, default, observe, validate

from . import cluster, compat, runners, schedule, shipping, tracebacks
from .cells import CompiledCell, compile_cell
from .jobs import Job
from .output import show_job_logs
from .table import JobsView, wait_for_jobs, wait_for_jobs_async
from .runtime import Runtime
from .timeout import MODES, check_seconds, run_cell_with_timeout, run_cell_with_timeout_async

__all__ = ["ConcurMagics", "parse_args"]


def parse_args(magic: Callable[..., Any], line: str) -> argparse.Namespace:
    """Parse a magic's argument line, or raise UsageError with the message and the usage line.

    IPython's parser reports only the message; users also need to see what the magic expects.
    Options may come anywhere, between positional arguments too (``%jobs wait --show fit``).
    """
    try:
        return magic.parser.parse_intermixed_args(arg_split(line, strict=True))  # type: ignore[attr-defined]
    except ValueError as exc:  # shlex: an unclosed quote
        raise UsageError(f"{exc} in {line!r}\n{_usage(magic)}") from None
    except UsageError as exc:
        message = str(exc)
        negative = [token for token in line.split() if re.fullmatch(r"-\d[\w.]*", token)]
        if negative:
            # argparse reads "-5s" as an unknown option; say what is really wrong.
            message = f"durations must be positive, got {negative[0]!r}"
        raise UsageError(f"{message}\n{_usage(magic)}") from None


def seconds(text: str) -> float:
    """An argparse type for a positive duration: ``2``, ``0.5``, ``500ms``, ``1m`` (at most 24.8 days)."""
    from dask.utils import parse_timedelta

    shown = text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
    try:
        value = float(text)  # plain numbers first: "1e400" is a number too large, not a typo
    except ValueError:
        value = None
    try:
        if value is None:
            value = parse_timedelta(text, default="seconds")
    except (KeyError, ValueError, TypeError, OverflowError, IndexError):  # IndexError: dask on ""
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds (or a duration like 500ms), got {shown!r}"
        ) from None
    try:
        return check_seconds(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most 2147483 s (24.8 days, the longest wait the platform "
            f"can express), got {shown!r}"
        ) from None


def interval(text: str) -> float:
    """An argparse type for a timer interval: a duration of at least 1 ms."""
    value = seconds(text)
    if value < schedule.MIN_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"must be at least 1 ms (a shorter timer would spin a core or never keep up), got {text!r}"
        )
    return value


@magics_class
class ConcurMagics(Magics):
    """Magics that run cells alongside other work: ``%%timeout``, ``%%background``, ``%jobs``,
    ``%clock`` and ``%%every``."""

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

    dask_scheduler = Unicode(
        help="Address of an existing Dask scheduler (tcp://host:8786) for --dask jobs and "
        "--mode dask timeouts. Empty: start a local cluster on first use. Default: the "
        f"{cluster.ENV_SCHEDULER} environment variable.",
    ).tag(config=True)

    dask_connect_timeout = Float(
        5.0, help="Seconds to wait for the Dask scheduler before giving up with an error."
    ).tag(config=True)

    dask_security = Instance(
        "distributed.security.Security",
        allow_none=True,
        help="A distributed.Security with the CA, certificate and key for tls:// schedulers. None "
        "(the default): distributed's own configuration (distributed.comm.tls.* in the Dask "
        "config) applies.",
    ).tag(config=True)

    @default("dask_scheduler")
    def _default_scheduler(self) -> str:
        return os.environ.get(cluster.ENV_SCHEDULER, "")

    @property
    def runtime(self) -> Runtime:
        """The owner of everything these magics start."""
        return Runtime.current()

    @property
    def _cluster(self) -> cluster.Cluster:
        return self.runtime.cluster

    @observe("dask_scheduler")
    def _scheduler_changed(self, change: dict[str, Any]) -> None:
        # Taken up at the next use, which keeps the cluster in use if the new one fails.
        self._cluster.address = change["new"]

    @observe("dask_security")
    def _security_changed(self, change: dict[str, Any]) -> None:
        self._cluster.security = change["new"]

    @validate("dask_scheduler")
    def _check_scheduler(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        if not value.strip():
            return ""
        try:
            return cluster.check_address(value)
        except ValueError as exc:
            raise TraitError(f"dask_scheduler: {exc}") from None

    @observe("dask_connect_timeout")
    def _connect_timeout_changed(self, change: dict[str, Any]) -> None:
        self._cluster.connect_timeout = change["new"]

    @validate("dask_connect_timeout", "timeout_grace")
    def _check_seconds(self, proposal: dict[str, Any]) -> float:
        value = proposal["value"]
        if not 0 < value < float("inf"):
            name = proposal["trait"].name
            raise TraitError(f"{name} must be a positive number of seconds, got {value!r}")
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
        "process group at the deadline (also stops C code); dask: run the cell on a Dask worker "
        "and, at the deadline, cancel it and have that worker process killed (see %%dask). "
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
        try:
            return run_cell_with_timeout(compiled, self._namespace, args.seconds, **self._timeout_options(args))
        except BaseException as exc:
            shown = self._timeout_failure(exc)
            if shown is exc:
                raise
            raise shown from None

    async def timeout_async(self, line: str, cell: str) -> Any:
        """``%%timeout`` for a cell that awaits at top level; the cell runs on the kernel's loop.

        :mod:`concur_magics.transform` routes such cells here so the kernel awaits them instead
        of calling the synchronous magic.
        """
        __tracebackhide__ = True
        args, compiled = self._prepare_timeout(line, cell)
        try:
            return await run_cell_with_timeout_async(
                compiled, self._namespace, args.seconds, **self._timeout_options(args)
            )
        except BaseException as exc:
            shown = self._timeout_failure(exc)
            if shown is exc:
                raise
            raise shown from None

    def _timeout_options(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"mode": args.mode, "shell": self.shell, "grace": self.timeout_grace}

    def _timeout_failure(self, exc: BaseException) -> BaseException:
        """What a failed ``%%timeout`` cell shows for ``exc``: a UsageError for an unusable
        scheduler, a plain TypeError for inputs Dask can't take, else ``exc`` itself, shown from
        the cell's own lines (not from this magic's call line, nor through us)."""
        if isinstance(exc, cluster.SchedulerUnreachable):
            self._sync_traits()
            return UsageError(str(exc))
        if isinstance(exc, shipping.UnpicklableInputs):
            return _plain_type_error(exc)
        tracebacks.with_user_traceback(exc)
        return exc

    @property
    def _namespace(self) -> dict[str, Any]:
        if self.shell is None:
            raise RuntimeError("ConcurMagics needs a shell")
        return self.shell.user_ns  # type: ignore[no-any-return]

    def _prepare_timeout(self, line: str, cell: str) -> tuple[argparse.Namespace, CompiledCell]:
        args = parse_args(self.timeout, line)
        args.mode = args.mode or self.default_timeout_mode
        if args.mode == "dask":
            self._sync_cluster()
        try:
            return args, compile_cell(cell, shell=self.shell, first_line=2)
        except SyntaxError as exc:
            raise tracebacks.tidy_syntax_error(self.shell, exc) from None

    @magic_arguments()
    @argument("-n", "--name", help="a name for the job, for %%jobs and %%jobs cancel NAME")
    @argument("-o", "--out", metavar="VAR", help="bind the Job to VAR at once")
    @argument(
        "--mode",
        choices=runners.MODES,
        default=None,
        help="thread: run in a worker thread (for blocking code); loop: run as a task on the "
        "kernel's event loop, no thread (for code that awaits). Default: loop if the cell awaits "
        "at top level, thread otherwise.",
    )
    @argument("--timeout", type=seconds, metavar="SECONDS", help="stop the job after this long")
    @argument(
        "--dask",
        action="store_true",
        help="run the cell on a Dask worker (same as --mode dask): the names it reads are shipped "
        "with it, the names it assigns come back; see %%dask",
    )
    @cell_magic
    def background(self, line: str, cell: str) -> None:
        """Run the cell alongside the notebook and return at once; its output stays in this cell.

        The job runs in the notebook's namespace: the names it assigns are there when it ends. Its
        prints, displays, final value and traceback appear under this cell, also after the cell
        has returned and while other cells run. ``-o VAR`` binds a ``concur_magics.Job`` (a future:
        ``result()``, ``cancel()``, ``status``, ``await job``).

        Examples
        --------
        ::

            In [1]: %%background -n slow -o job
               ...: import time
               ...: time.sleep(2)
               ...: answer = 42
               ...: answer
            <Job #1 slow [thread] done 2.0 s: time.sleep(2)>
            42

            In [2]: job.result(), job.status
            Out[2]: (42, 'done')
        """
        __tracebackhide__ = True
        args = parse_args(self.background, line)
        usage = _usage(self.background)
        if args.out is not None and not args.out.isidentifier():
            raise UsageError(f"-o needs a variable name, got {args.out!r}\n{usage}")
        if args.dask and args.mode not in (None, "dask"):
            raise UsageError(f"--dask and --mode {args.mode} contradict each other\n{usage}")
        self._sync_cluster()
        key, run = self._cell_key(line, cell)
        try:
            job = runners.background(
                cell, name=args.name, mode="dask" if args.dask else args.mode, timeout=args.timeout,
                shell=self.shell, first_line=2, cell=key, run=run,
            )
        except cluster.SchedulerUnreachable as exc:
            raise UsageError(str(exc)) from None
        except shipping.UnpicklableInputs as exc:
            raise _plain_type_error(exc) from None
        except SyntaxError as exc:
            raise tracebacks.tidy_syntax_error(self.shell, exc) from None
        finally:
            self._sync_traits()
        if args.out is not None:
            self._namespace[args.out] = job

    def _cell_key(self, line: str, cell: str) -> tuple[str, str | None]:
        """``(cell, run)``: what identifies this cell across reruns (the frontend's cell id, else
        its text), and this run of it (the request's id)."""
        cell_id, request = compat.execution(self.shell)
        return cell_id or f"text:{hash((line, cell))}", request

    @magic_arguments()
    @argument(
        "action",
        nargs="?",
        default="list",
        choices=("list", "show", "cancel", "wait", "clear"),
        help="list (default): a table of jobs; show: show a job's output again here; cancel: stop "
        "jobs; wait: wait for jobs to end; clear: forget jobs that have ended",
    )
    @argument(
        "jobs",
        nargs="*",
        metavar="ID|NAME",
        help="jobs to show, cancel or wait for, by id, name, or the variable given to -o "
        "(wait: default all running jobs)",
    )
    @argument("--timeout", type=seconds, metavar="SECONDS", help="wait: give up after this long")
    @argument(
        "--show", action="store_true",
        help="wait: then show each job's output here — the named jobs, or every job kept (for "
        "notebooks run headless, e.g. by nbclient or papermill, which keep only what arrives "
        "before each cell's reply)",
    )
    @line_magic
    def jobs(self, line: str) -> JobsView | None:
        """List, cancel, wait for or forget background jobs.

        Examples
        --------
        ::

            In [3]: %jobs
            Out[3]:
            id  name  mode    status  elapsed  cell
            1   slow  thread  done    2.0 s    time.sleep(2)

            In [4]: %jobs show slow
            ── <Job #1 slow [thread] done 2.0 s: time.sleep(2)>
            42

            In [5]: %jobs cancel slow
            #1 slow: done

            In [6]: %jobs wait --timeout 10
            no jobs to wait for

            In [7]: %jobs clear
            forgot 1 finished job(s)
        """
        args, targets = self._parse_jobs(line)
        if args.action == "list":
            return self.runtime.jobs.view()
        if args.action == "show":
            show_job_logs(targets, self.shell)
            return None
        if args.action == "clear":
            print(f"forgot {self.runtime.jobs.clear()} finished job(s)")
            return None
        if args.action == "cancel":
            for job in targets:
                job.cancel()
                print(f"{job.label}: {job.status if job.done() else 'cancelling, ' + _STOPS[job.mode]}")
            return None
        # wait, reached synchronously (inside a function): fine for threads, not for loop jobs.
        if any(job.mode == "loop" and not job.done() for job in targets):
            raise UsageError(
                "%jobs wait for loop jobs must be awaited on the kernel's loop: use it at the top "
                "level of a cell (not inside a function), or `await job`"
            )
        wait_for_jobs(targets, args.timeout)
        return self._waited(targets, args)

    async def jobs_async(self, line: str) -> JobsView | None:
        """``%jobs wait`` on the kernel's loop, so loop jobs keep running while it waits."""
        args, targets = self._parse_jobs(line)
        await wait_for_jobs_async(targets, args.timeout, self.runtime.activity)
        return self._waited(targets, args)

    def _parse_jobs(self, line: str) -> tuple[argparse.Namespace, list[Job]]:
        args = parse_args(self.jobs, line)
        usage = _usage(self.jobs)
        if args.action in ("list", "clear") and args.jobs:
            raise UsageError(f"%jobs {args.action} takes no job ids or names\n{usage}")
        if args.action in ("cancel", "show") and not args.jobs:
            raise UsageError(f"%jobs {args.action} needs job ids or names\n{usage}")
        if args.timeout is not None and args.action != "wait":
            raise UsageError(f"--timeout goes with %jobs wait\n{usage}")
        if args.show and args.action != "wait":
            raise UsageError(f"--show goes with %jobs wait (to show a job's output: %jobs show ID)\n{usage}")
        targets = [self._find_job(key, usage) for key in args.jobs]
        if args.action == "wait" and not args.jobs:
            targets, endless = self.runtime.jobs.endable()
            if endless:
                print(f"not waiting for open-ended schedules: {', '.join(job.label for job in endless)} "
                      "(name them to wait, or %jobs cancel them)")
        return args, targets

    @magic_arguments()
    @argument(
        "action", nargs="?", default="info", choices=("info", "connect", "close"),
        help="info (default): scheduler, dashboard, workers and this kernel's jobs on the cluster; "
        "connect ADDRESS: use an existing cluster (the one in use stays if that fails); close: "
        "disconnect (and close the local cluster if we started it; forget an address that failed)",
    )
    @argument("address", nargs="?", help="for connect: the scheduler address, e.g. tcp://10.0.0.5:8786")
    @line_magic
    def dask(self, line: str) -> cluster.ClusterInfo | None:
        """Show, connect to, or close the Dask cluster that --dask jobs and --mode dask use.

        By default a local cluster (worker processes, one per core) starts on first use. Set
        ``CONCUR_DASK_SCHEDULER``, ``%config ConcurMagics.dask_scheduler = "tcp://..."`` or use
        ``%dask connect ADDRESS`` to use an existing cluster instead (we never shut that one down).
        A connection that fails within ``ConcurMagics.dask_connect_timeout`` is a UsageError naming
        the address and why, and the cluster in use stays connected; ``%dask close`` also forgets
        an address that could not be used. ``tls://`` takes distributed's TLS configuration or
        ``%config ConcurMagics.dask_security``.

        Examples
        --------
        ::

            In [1]: %dask
            Out[1]:
            Dask scheduler tcp://127.0.0.1:40123 (local cluster started by concur_magics)
            workers: 2, threads: 2, memory: 23.4 GiB
            ...
            no jobs of this kernel on the cluster

            In [2]: %dask connect tcp://10.0.0.5:8786
            In [3]: %dask close
        """
        args = parse_args(self.dask, line)
        usage = _usage(self.dask)
        if args.action != "connect" and args.address:
            raise UsageError(f"%dask {args.action} takes no address\n{usage}")
        if args.action == "close":
            done = self._cluster.close()
            self._sync_traits()
            print(done)
            return None
        self._sync_cluster()
        if args.action == "connect":
            if not args.address:
                raise UsageError(f"%dask connect needs a scheduler address\n{usage}")
            try:
                self._cluster.address = cluster.check_address(args.address)
            except ValueError as exc:
                raise UsageError(f"{exc}\n{usage}") from None
        try:
            return self._cluster.info(self._dask_jobs())
        except cluster.SchedulerUnreachable as exc:
            raise UsageError(str(exc)) from None
        finally:
            self._sync_traits()

    def _dask_jobs(self) -> list[Job]:
        return [job for job in self.runtime.jobs.running() if job.mode == "dask"]

    def _sync_cluster(self) -> None:
        """Hand the configuration to the connection, which takes it up at its next use."""
        self._cluster.connect_timeout = self.dask_connect_timeout
        self._cluster.security = self.dask_security
        self._cluster.address = self.dask_scheduler

    def _sync_traits(self) -> None:
        """Show in the configuration what the connection uses after an attempt: a failed switch
        goes back to the cluster in use, and ``%dask close`` may forget a failed address."""
        address = self._cluster.address or ""
        if address != self.dask_scheduler:  # (an address from the environment is not validated)
            self.dask_scheduler = address
        if self._cluster.security is not self.dask_security:
            self.dask_security = self._cluster.security

    def _find_job(self, key: str, usage: str) -> Job:
        """A job by id, name, or a variable it was bound to with ``-o``."""
        try:
            return self.runtime.jobs.find(key)
        except KeyError as exc:
            bound = self._namespace.get(key)
            if isinstance(bound, Job):
                return bound
            raise UsageError(f"{exc.args[0]}\n{usage}") from None

    def _waited(self, targets: list[Job], args: argparse.Namespace) -> JobsView | None:
        if args.show:
            # Named jobs, or (none named) every job kept: those that ended before the wait too.
            show_job_logs(targets if args.jobs else list(self.runtime.jobs), self.shell)
        if not targets:
            print("no jobs to wait for")
            return None
        running = [job.label for job in targets if not job.done()]
        if running:
            print(f"still running: {', '.join(running)}")
        return self.runtime.jobs.view(targets)


    @magic_arguments()
    @argument(
        "--format", default=schedule.DEFAULT_FORMAT, metavar="FMT",
        help="a time.strftime format (default: %%d-%%m-%%Y %%H:%%M:%%S)",
    )
    @argument("--interval", type=interval, default=1.0, metavar="SECONDS", help="seconds between ticks (default 1)")
    @argument("--stop", nargs="?", const="all", metavar="ID", help="stop every clock, or the one with this id")
    @line_magic
    def clock(self, line: str) -> schedule.Clock | None:
        """Show a live clock in this cell, updated in place; the cell returns at once.

        Ticks fall on wall-clock multiples of the interval and keep coming while other cells run
        blocking code (they are published from the kernel's IOPub thread). C code that holds the
        GIL stops every thread, this one too: the clock resumes when the call returns.

        Examples
        --------
        ::

            In [1]: c = %clock --interval 1
            25-11-2026 11:46:13
            In [2]: c.stop()
            In [3]: %clock --stop        # every clock
        """
        args = parse_args(self.clock, line)
        if args.stop is not None:
            clock_id = None if args.stop == "all" else _clock_id(args.stop, self.clock)
            try:
                schedule.stop_clocks(clock_id)
            except KeyError as exc:
                raise UsageError(f"{exc.args[0]}\n{_usage(self.clock)}") from None
            return None
        try:
            return schedule.start_clock(self.shell, args.interval, args.format)
        except RuntimeError as exc:
            raise UsageError(str(exc)) from None

    @magic_arguments()
    @argument("interval", type=interval, help="time between runs: 5, 0.5, 500ms, 5s, 2m (at least 1 ms)")
    @argument("--times", type=int, metavar="N", help="stop after N runs")
    @argument("-n", "--name", help="a name for the job, for %%jobs and %%jobs cancel NAME")
    @argument("-o", "--out", metavar="VAR", help="bind the Job to VAR at once")
    @cell_magic
    def every(self, line: str, cell: str) -> None:
        """Run the cell every INTERVAL on the kernel's loop, between other cells, as a job.

        Each run happens while no other cell is executing, so it never races a foreground cell
        for the namespace; its output goes to this cell. The schedule is a job in ``%jobs``:
        ``%jobs cancel`` stops it. An exception stops it with status ``error``.

        Examples
        --------
        ::

            In [1]: %%every 1s --times 3 -n counter
               ...: count = globals().get('count', 0) + 1
               ...: count
            <Job #1 counter [every] done 2.0 s: count = globals().get('count', 0) + 1>
            1
            2
            3
        """
        args = parse_args(self.every, line)
        usage = _usage(self.every)
        if args.times is not None and args.times < 1:
            raise UsageError(f"--times must be at least 1, got {args.times}\n{usage}")
        if args.out is not None and not args.out.isidentifier():
            raise UsageError(f"-o needs a variable name, got {args.out!r}\n{usage}")
        key, run = self._cell_key(line, cell)
        try:
            job = schedule.every(
                cell, args.interval, times=args.times, name=args.name, shell=self.shell,
                namespace=self._namespace, first_line=2, cell=key, run=run,
            )
        except SyntaxError as exc:
            raise tracebacks.tidy_syntax_error(self.shell, exc) from None
        if args.out is not None:
            self._namespace[args.out] = job


_STOPS = {
    "thread": "stops at its next Python bytecode",
    "loop": "stops at its next await",
    "every": "no further runs",
    "dask": "its task is cancelled and its worker process killed",
}


def _clock_id(text: str, magic: Callable[..., Any]) -> int:
    if not text.isdigit():
        raise UsageError(f"--stop takes a clock id (a number), got {text!r}\n{_usage(magic)}")
    return int(text)


def _plain_type_error(exc: shipping.UnpicklableInputs) -> TypeError:
    """What a cell shows for inputs that can't go to Dask: a TypeError with the names, and no
    frames (none of them are the user's; nothing ran)."""
    return tracebacks.with_user_traceback(TypeError(str(exc)))  # type: ignore[return-value]


def _usage(magic: Callable[..., Any]) -> str:
    return str(magic.parser.format_usage().strip())  # type: ignore[attr-defined]
