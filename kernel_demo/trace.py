"""Dispatch records — what arrived, which handler took it, when, and what went back — and
how ``%dispatch`` shows them."""

from __future__ import annotations

import collections
import html
import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

FIELDS = ("channel", "msg_type", "msg_id", "handler", "received", "started", "finished", "sent", "rejected")


@dataclass
class Record:
    """One message's life in the kernel. Times are ``time.time()`` floats, in seconds."""

    channel: str
    msg_type: str
    msg_id: str
    handler: str | None
    received: float
    started: float | None = None
    finished: float | None = None
    sent: list[str] = field(default_factory=list)
    rejected: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if name in FIELDS}


class Trace:
    """The last records, newest last. Thread-safe: shell and control threads both add to it."""

    def __init__(self, path: str | None = None, keep: int = 10_000) -> None:
        self._records: collections.deque[Record] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - closed in close()
        self.listeners: list[Callable[[], None]] = []

    def add(self, record: Record) -> Record:
        with self._lock:
            self._records.append(record)
        if record.rejected is not None:
            self.finished(record)
        return record

    def finished(self, record: Record) -> None:
        """A record is complete: write it to the trace file and tell live views."""
        if self._file is not None:
            with self._lock:
                self._file.write(json.dumps(record.as_dict()) + "\n")
        for listener in list(self.listeners):
            listener()

    def last(self, n: int | None = None) -> list[Record]:
        with self._lock:
            records = list(self._records)
        return records if n is None else records[-n:] if n > 0 else []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# The records as data, in a MIME type only programs read: frontends show the table beside it, and
# no JSON tree (JupyterLab would render application/json, ranking it above text/html).
MIME_TYPE = "application/vnd.kernel-demo.dispatch+json"


def bundle(records: list[Record]) -> dict[str, Any]:
    """One output for the records: a table (``text/plain``, ``text/html``) and the records as data
    (:data:`MIME_TYPE`, the list of records with their field names)."""
    rows = [_row(r) for r in records]
    header = ("channel", "msg_type", "handler", "received", "wait ms", "run ms", "sent / rejected")
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows
    )
    table = (
        "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + f"</tr></thead><tbody>{cells}</tbody></table>"
    )
    return {"text/plain": "\n".join(lines), "text/html": table, MIME_TYPE: [r.as_dict() for r in records]}


def _row(r: Record) -> tuple[str, ...]:
    import time

    clock = time.strftime("%H:%M:%S", time.localtime(r.received)) + f".{int(r.received % 1 * 1000):03d}"
    wait = f"{(r.started - r.received) * 1000:.1f}" if r.started else ""
    run = f"{(r.finished - r.started) * 1000:.1f}" if r.finished and r.started else ""
    outcome = f"rejected: {r.rejected}" if r.rejected else ", ".join(r.sent)
    return (r.channel, r.msg_type, r.handler or "", clock, wait, run, outcome)
