"""A job's output log keeps the newest output within its bound, in order, and says what it dropped."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from concur_magics.output import OutputLog

writes = st.lists(
    st.one_of(
        st.tuples(st.just("stream"), st.sampled_from(["stdout", "stderr"]), st.text(max_size=300)),
        st.tuples(st.just("display"), st.just("text/plain"), st.text(min_size=1, max_size=200)),
        st.tuples(st.just("error"), st.just("ValueError"), st.text(max_size=200)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(writes, st.integers(min_value=1, max_value=2_000))
def test_the_log_is_bounded_ordered_and_counts_what_it_dropped(items: list[tuple[str, str, str]], limit: int) -> None:
    log = OutputLog(limit=limit)
    total = 0
    for kind, name, text in items:
        if kind == "stream":
            log.add_stream(name, text)
        elif kind == "display":
            log.add_display({name: text})
        else:
            log.add_error(name, text, [text])
        total += len(text)
    kept = 0
    for entry in log.entries():
        kept += len(entry[2]) if entry[0] == "stream" else (
            len(entry[1]["text/plain"]) if entry[0] == "display" else sum(map(len, entry[3])))
    assert kept <= limit
    assert kept + log.dropped == total  # nothing vanishes without being counted
    # The newest output is what is kept: the stream text of the log ends as the full stream did.
    items = [item for item in items if item[0] != "stream" or item[2]]  # empty writes add nothing
    if items and items[-1][0] == "stream" and kept:
        full = "".join(text for kind, name, text in items if kind == "stream" and name == items[-1][1])
        tail = log.entries()[-1]
        assert tail[0] == "stream" and full.endswith(tail[2])


def test_the_text_says_how_much_was_dropped() -> None:
    log = OutputLog(limit=10)
    log.add_stream("stdout", "0123456789abcdef")
    assert log.text() == "[... 6 characters of earlier output dropped ...]\n6789abcdef"


def test_a_display_update_replaces_what_the_log_shows() -> None:
    log = OutputLog(limit=1000)
    log.add_display({"text/plain": "waiting"}, display_id="board")
    log.add_stream("stdout", "between\n")
    log.add_display({"text/plain": "x" * 500}, display_id="board", update=True)
    log.add_display({"text/plain": "for a display shown elsewhere"}, display_id="other", update=True)
    assert log.text() == "x" * 500 + "\nbetween\n"
    # Over the bound: the oldest output goes first, even when it is the display just updated.
    log.add_display({"text/plain": "y" * 995}, display_id="board", update=True)
    assert log.text().endswith("dropped ...]\nbetween\n") and log.dropped == 995
