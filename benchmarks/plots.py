"""Plots of the benchmark figures where a picture says more than a row (matplotlib, Agg)."""

from __future__ import annotations

import os
import statistics
from typing import Any


def save_plots(raw: dict[str, Any], folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    saved = []
    if "clock" in raw:
        fig, ax = plt.subplots(figsize=(7, 3))
        idle, during = raw["clock"]["idle"], raw["clock"]["during"]
        ax.plot(range(len(idle)), [x * 1000 for x in idle], ".", label="idle")
        ax.plot(range(len(idle), len(idle) + len(during)), [x * 1000 for x in during], ".", label="while a cell blocks")
        ax.set_xlabel("tick")
        ax.set_ylabel("ms after the wall-clock second")
        ax.set_title("%clock: every tick on time, also while the main thread is blocked")
        ax.legend()
        fig.tight_layout()
        saved.append(_save(fig, folder, "clock.png"))
        plt.close(fig)
    if "timeout" in raw:
        works = list(raw["timeout"])
        tools = sorted({tool for per_work in raw["timeout"].values() for tool in per_work})
        fig, ax = plt.subplots(figsize=(8, 3.5))
        width = 0.8 / max(1, len(tools))
        for i, tool in enumerate(tools):
            values = [statistics.median(raw["timeout"][w][tool]) * 1000 if raw["timeout"][w].get(tool) else 0 for w in works]
            ax.bar([x + i * width for x in range(len(works))], values, width, label=tool)
        ax.set_xticks([x + width * (len(tools) - 1) / 2 for x in range(len(works))], works)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylabel("ms past the deadline (0: never stopped)")
        ax.set_title("Stopping work at a deadline")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        saved.append(_save(fig, folder, "timeouts.png"))
        plt.close(fig)
    return saved


def _save(fig: Any, folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    fig.savefig(path, dpi=100)
    return path
