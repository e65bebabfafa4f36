"""Is a Dask scheduler there? Check an address, and ask it, under one deadline.

distributed's ``Client`` trusts the other end: it waits without limit for the handshake of a server
that accepts a connection and says nothing, and it reads the first bytes of a server speaking
another protocol as a frame length (``MemoryError: Unable to allocate 3.07 EiB``). Before a client
is made, :func:`probe` opens one connection through distributed's own comm layer (so ``tls://`` and
its security settings apply), completes the handshake and asks the scheduler who it is, all within
the connect timeout, and turns every way of failing into one :class:`SchedulerUnreachable` that
names the address and why.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from typing import Any

__all__ = ["SchedulerUnreachable", "check_address", "probe"]

EXPECTED = "expected tcp://HOST:PORT or tls://HOST:PORT"


class SchedulerUnreachable(ConnectionError):
    """No Dask scheduler can be used at an address: it can't be reached, it is not a Dask
    scheduler, or TLS failed. The message names the address and why."""


def check_address(address: str) -> str:
    """``address`` as a full scheduler address; ``host:port`` means ``tcp://host:port``.

    Raises
    ------
    ValueError
        Naming the address and what is wrong with it.
    """
    from distributed.comm import backends, parse_address, parse_host_port

    text = address.strip()
    bad = f"not a Dask scheduler address: {address!r}"
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"{bad} ({EXPECTED})")
    try:
        scheme, location = parse_address(text, strict=False)
    except ValueError:
        raise ValueError(f"{bad} ({EXPECTED})") from None
    if scheme not in backends:
        known = ", ".join(f"{name}://" for name in sorted(backends))
        raise ValueError(f"{bad} (unknown protocol {scheme!r}; known: {known})")
    if scheme in ("tcp", "tls"):
        try:
            host, port = parse_host_port(location)
        except ValueError:
            raise ValueError(f"{bad} ({EXPECTED})") from None
        if not host or not 0 < port < 65536:
            raise ValueError(f"{bad} ({EXPECTED})")
    return f"{scheme}://{location}"


def probe(address: str, timeout: float, security: Any = None) -> None:
    """Check that a Dask scheduler answers at ``address`` within ``timeout`` seconds.

    Runs on a fresh event loop in a short-lived thread (the kernel's loop, in the main thread, must
    not wait on it), which ends within the deadline whatever the other end does.

    Parameters
    ----------
    address:
        A full address (see :func:`check_address`).
    timeout:
        Seconds for the whole attempt: connecting, the handshake and the answer.
    security:
        A :class:`distributed.Security`, or None for distributed's configuration.

    Raises
    ------
    SchedulerUnreachable
        Naming the address and why.
    """
    outcome: list[Any] = []
    stage = ["connect"]

    def attempt() -> None:
        try:
            outcome.append(asyncio.run(_identify(address, timeout, security, stage)))
        except BaseException as exc:  # noqa: BLE001 - every failure is explained below
            outcome.append(exc)

    thread = threading.Thread(target=attempt, name="concur-dask-probe", daemon=True)
    thread.start()
    thread.join(timeout + 5)  # the deadline is inside; 5 s more for its loop to wind down
    if not outcome:
        raise SchedulerUnreachable(
            f"could not reach the Dask scheduler at {address} within {timeout:g} s: no answer"
        )
    result = outcome[0]
    if isinstance(result, BaseException):
        raise SchedulerUnreachable(_why(address, result, stage[0], timeout))
    kind = result.get("type") if isinstance(result, dict) else None
    if kind != "Scheduler":
        what = f"a Dask {kind}" if isinstance(kind, str) else "something else"
        raise SchedulerUnreachable(
            f"could not connect to the Dask scheduler at {address}: it answered as {what}, not as a "
            "Dask scheduler"
        )


async def _identify(address: str, timeout: float, security: Any, stage: list[str]) -> Any:
    from distributed import Security
    from distributed.comm import connect

    args = (security if security is not None else Security()).get_connection_args("client")

    async def ask() -> Any:
        # distributed retries a refused connection until its own timeout; ours ends later, so
        # running out of time inside connect() means its handshake got no answer.
        comm = await connect(address, timeout=timeout * 0.8, **args)
        stage[0] = "identity"
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    return await asyncio.wait_for(ask(), timeout)


def _why(address: str, exc: BaseException, stage: str, timeout: float) -> str:
    """Why connecting to ``address`` failed, from the exception and how far the attempt got."""
    from distributed.comm import CommClosedError

    at = f"the Dask scheduler at {address}"
    if type(exc) in (TimeoutError, asyncio.TimeoutError):  # our deadline, not a refused connect
        return (f"could not connect to {at}: it accepted the connection but did not answer as a "
                f"Dask scheduler within {timeout:g} s")
    if isinstance(exc, TypeError) and "ssl" in str(exc).lower():
        return (f"could not connect to {at}: tls:// needs a CA, a certificate and a key: set "
                "distributed.comm.tls.* in the Dask config, or %config ConcurMagics.dask_security "
                "= distributed.Security(...)")
    cause = _innermost(exc)
    if isinstance(cause, ssl.SSLError) or "SSL" in str(exc):
        return f"could not connect to {at}: the TLS handshake failed: {cause}"
    if isinstance(exc, CommClosedError):
        hint = " (is it a tls:// address?)" if address.startswith("tcp://") else ""
        return (f"could not connect to {at}: it closed the connection without answering as a "
                f"Dask scheduler{hint}")
    if isinstance(exc, OSError):
        return f"could not reach {at} within {timeout:g} s: {_unreachable(address, exc, timeout)}"
    if isinstance(exc, MemoryError):
        # distributed read its first bytes as the length of a message (exabytes, typically).
        detail = "what it sent does not read as a Dask message"
    else:
        text = str(exc)
        detail = f"{type(exc).__name__}: {text if len(text) <= 200 else text[:200] + '...'}"
    return f"could not connect to {at}: it answered, but not in Dask's protocol ({detail})"


def _unreachable(address: str, exc: OSError, timeout: float) -> str:
    """Why nothing could be reached at ``address``: distributed's retries end in whatever the last
    attempt met, so one plain connection (in the fifth of the timeout that is left) tells refused, unknown host and silence
    apart."""
    from distributed.comm import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return str(exc)
    try:
        with socket.create_connection(parse_host_port(location), timeout=min(1.0, timeout * 0.2)):
            return str(exc)  # reachable now: it was not a moment ago
    except ConnectionRefusedError:
        return "connection refused (nothing listens there)"
    except socket.gaierror as error:
        return f"unknown host ({error.strerror})"
    except OSError:
        return "no answer (the host may be down, or a firewall drops the connection)"


def _innermost(exc: BaseException) -> BaseException:
    """The first exception of a chain (what went wrong under distributed's wrapping)."""
    seen = {id(exc)}
    while True:
        below = exc.__cause__ or exc.__context__
        if below is None or id(below) in seen:
            return exc
        seen.add(id(below))
        exc = below
