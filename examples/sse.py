"""An incremental parser for server-sent events (the ``text/event-stream`` format).

Feed it bytes exactly as they arrive — split anywhere, even inside a multi-byte character or in the
middle of a ``data:`` line — and it hands back complete events. It follows the WHATWG rules: lines
end with LF, CRLF or CR; ``data`` lines of one event are joined with newlines; lines starting with
``:`` are comments; ``id`` sets the last event id; a blank line dispatches the event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass
class Event:
    data: str
    event: str = "message"
    id: str | None = None


class SSEParser:
    def __init__(self) -> None:
        self._pending = b""  # bytes of an unfinished line (may end inside a UTF-8 character)
        self._data: list[str] = []
        self._event = ""
        self.last_id: str | None = None
        self.comments = 0

    def feed(self, chunk: bytes) -> list[Event]:
        """Add bytes; return the events they complete."""
        buffer = self._pending + chunk
        # A CR at the very end may be the first half of a CRLF: keep it until the next byte comes.
        hold = b"\r" if buffer.endswith(b"\r") else b""
        # Split on bytes, so a character cut in two waits, whole, in the unfinished last line.
        lines = _LINE_END.split(buffer[: len(buffer) - len(hold)])
        self._pending = lines.pop() + hold
        events = []
        for raw in lines:
            event = self._line(raw.decode("utf-8"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            event = Event("\n".join(self._data), self._event or "message", self.last_id)
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            self.comments += 1
            return None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self.last_id = value
        return None  # "retry" and unknown fields are ignored, as the standard says
