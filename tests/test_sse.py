"""The examples' incremental SSE parser, fed the replay stream cut at every kind of boundary."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))

from servers import recorded_events, sse_bytes  # noqa: E402
from sse import SSEParser  # noqa: E402


@pytest.mark.parametrize("seed", range(10))
def test_random_chunking_gives_every_event_once(seed: int) -> None:
    events = recorded_events()
    stream = sse_bytes(events)
    rng, parser, got, position = random.Random(seed), SSEParser(), [], 0
    while position < len(stream):
        size = rng.randint(1, 60)
        got += parser.feed(stream[position:position + size])
        position += size
    assert [json.loads(e.data)["meta"]["id"] for e in got] == [e["meta"]["id"] for e in events]
    assert parser.last_id == events[-1]["meta"]["id"] and parser.comments >= 1


def test_one_byte_at_a_time_through_multibyte_characters() -> None:
    stream = "data: 東京\ndata: Zürich\n\n".encode()
    parser = SSEParser()
    events = [e for i in range(len(stream)) for e in parser.feed(stream[i:i + 1])]
    assert [e.data for e in events] == ["東京\nZürich"]


def test_line_endings_comments_and_fields() -> None:
    parser = SSEParser()
    events = parser.feed(b": hello\r\nevent: edit\r\nid: 7\r\ndata:no-space\r\n\r\ndata: x\rdata: y\r\n\n")
    assert [(e.event, e.id, e.data) for e in events] == [("edit", "7", "no-space"), ("message", "7", "x\ny")]
    assert parser.comments == 1
