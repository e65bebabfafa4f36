"""``python -m benchmarks [--quick] [--only NAME]``: run every figure against its anchor, print a table."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import figures


@dataclass
class Row:
    figure: str
    ours: str
    anchor: str
    ratio: float | None
    goal: str
    verdict: str


def spread(samples: list[float], unit: float = 1000.0, fmt: str = ".2f") -> str:
    """``median (p10–p90) ms`` of samples in seconds."""
    ordered = sorted(samples)
    p10 = ordered[int(0.1 * (len(ordered) - 1))]
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"{statistics.median(samples) * unit:{fmt}} ({p10 * unit:{fmt}}–{p90 * unit:{fmt}}) ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small version of every figure")
    parser.add_argument("--only", action="append", help="run only figures whose name contains this")
    parser.add_argument("--plot", metavar="DIR", help="also save plots (PNG) of the figures that have them here")
    args = parser.parse_args(argv)
    os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    rows: list[Row] = []
    chosen: list[tuple[str, Callable[[bool], list[Row]]]] = [
        (name, fn) for name, fn in figures.ALL if not args.only or any(o in name for o in args.only)
    ]
    for name, fn in chosen:
        start = time.monotonic()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.extend(fn(args.quick))
        print(f"  {name}: {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
    print(table(rows))
    if args.plot:
        from .plots import save_plots

        for path in save_plots(figures.RAW, args.plot):
            print(f"saved {path}")
    return 0


def table(rows: list[Row]) -> str:
    header = ("figure", "ours", "anchor", "ratio", "goal", "verdict")
    cells = [(r.figure, r.ours, r.anchor, "" if r.ratio is None else f"{r.ratio:.3g}", r.goal, r.verdict) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |" for c in cells]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
