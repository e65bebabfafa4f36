"""The figures. Each runs ours and its anchor in the same process, on real kernels, and returns rows."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from concur_magics.frontend import Kernel, running_kernel

if TYPE_CHECKING:
    from .__main__ import Row


def _row(*args: object) -> Row:
    from .__main__ import Row

    return Row(*args)  # type: ignore[arg-type]


def _round_trips(kernel: Kernel, n: int, code: str = "1+1") -> list[float]:
    client = kernel.client
    for _ in range(max(5, n // 10)):  # warm up
        client.execute_interactive(code, timeout=30, output_hook=lambda msg: None)
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        client.execute_interactive(code, timeout=30, output_hook=lambda msg: None)
        samples.append(time.perf_counter() - start)
    return samples


def _pipelined(kernel: Kernel, n: int) -> float:
    """Requests per second when n execute_requests are sent at once and all replies awaited."""
    client = kernel.client
    start = time.perf_counter()
    ids = {client.execute("1+1") for _ in range(n)}
    while ids:
        reply = client.get_shell_msg(timeout=30)
        ids.discard(reply["parent_header"].get("msg_id"))
    return n / (time.perf_counter() - start)


def kernel_demo_round_trip(quick: bool) -> list[Row]:
    from kernel_demo.__main__ import install

    from .__main__ import spread

    n = 50 if quick else 500
    with tempfile.TemporaryDirectory() as prefix:
        kernels = os.path.dirname(install(prefix=prefix))
        with running_kernel("kernel_demo", kernel_dirs=[kernels]) as demo:
            ours = _round_trips(demo, n)
            ours_rate = _pipelined(demo, n)
    with running_kernel() as ipykernel:
        anchor = _round_trips(ipykernel, n)
        anchor_rate = _pipelined(ipykernel, n)
    ratio = statistics.median(ours) / statistics.median(anchor)
    p99 = lambda s: sorted(s)[int(0.99 * (len(s) - 1))] * 1000  # noqa: E731
    return [
        _row("kernel_demo: execute `1+1` round trip, median (p10–p90)", spread(ours), "ipykernel " + spread(anchor),
             ratio, "≤ 0.5", "met" if ratio <= 0.5 else "missed"),
        _row("kernel_demo: round trip p99", f"{p99(ours):.2f} ms", f"ipykernel {p99(anchor):.2f} ms",
             p99(ours) / p99(anchor), "—", "info"),
        _row(f"kernel_demo: pipelined throughput ({n} requests)", f"{ours_rate:.0f} req/s", f"ipykernel {anchor_rate:.0f} req/s",
             ours_rate / anchor_rate, "—", "info"),
    ]


ALL: list[tuple[str, Callable[[bool], list[Row]]]] = [
    ("kernel_demo", kernel_demo_round_trip),
]
