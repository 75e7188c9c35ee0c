"""The DATA reader over large buffers answers as the per-line rules do, however the bytes come."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from poste.smtp.data_reader import DataState, DotReader, lines_fit

LIMIT, MAX_LINE = 3000, 100


class Body:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, line: bytes) -> None:
        self.data += line

    def discard(self) -> None:
        self.data.clear()


def per_line(stream: bytes) -> tuple[DataState, bytes, bytes]:
    """The rules one line at a time (the reader before): state, body, what follows the end."""
    state, size, body, pos = DataState.NOMINAL, 0, bytearray(), 0
    while True:
        i = stream.find(b"\r\n", pos)
        assert i >= 0, "the streams below always end with an end of data"
        part, line = stream[pos:i], stream[pos:i + 2]
        pos = i + 2
        if line == b".\r\n":
            return state, bytes(body) if state is DataState.NOMINAL else b"", stream[pos:]
        if len(part) > MAX_LINE:
            state = state if state is not DataState.NOMINAL else DataState.TOO_LONG
            body.clear()
            continue
        size += len(line)
        if state is not DataState.NOMINAL:
            continue
        fault = None
        if b"\r" in part or b"\n" in part:
            fault = DataState.BARE
        elif b"\x00" in line:
            fault = DataState.NUL
        elif size > LIMIT:
            fault = DataState.TOO_MUCH
        else:
            if line.startswith(b"."):
                line = line[1:]
            if len(line) > MAX_LINE:
                fault = DataState.TOO_LONG
        if fault is not None:
            state = fault
            body.clear()
            continue
        body += line


PIECES = st.sampled_from([
    b"plain text line\r\n", b".\r\n", b"..\r\n", b".dot first\r\n", b"x" * 98 + b"\r\n",
    b"." + b"x" * 98 + b"\r\n", b"y" * 99 + b"\r\n", b"z" * 300 + b"\r\n", b"bare\nlf\r\n",
    b"bare\rcr\r\n", b"\n.\r\n", b"nul\x00\r\n", b"\r\n", b"no end yet ", b"\r", b"\n",
    b"\r\n.\n", b"w" * 1500,
])


@settings(max_examples=400, deadline=None)
@given(st.lists(PIECES, max_size=60), st.lists(st.integers(1, 400), min_size=1, max_size=30),
       st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"]))
def test_same_answer_as_the_per_line_rules(pieces: list[bytes], cuts: list[int],
                                           after: bytes) -> None:
    stream = b"".join(pieces) + b"\r\n.\r\n" + after
    want = per_line(stream)
    body = Body()
    reader = DotReader(body, LIMIT, MAX_LINE)
    pos, k, got_after = 0, 0, None
    while got_after is None:
        assert pos < len(stream), "the end of data was missed"
        n = cuts[k % len(cuts)]
        k += 1
        got_after = reader.feed(stream[pos:pos + n])
        pos += n
    rest = got_after + stream[pos:]
    got_body = bytes(body.data) if reader.state is DataState.NOMINAL else b""
    assert (reader.state, got_body, rest) == want
    if reader.state is DataState.NOMINAL:  # a body sent on unscanned has no line to stuff
        lines = stream[:len(stream) - len(rest)].split(b"\r\n")
        assert reader.dotted == any(line.startswith(b".") for line in lines[:-2])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=50), st.integers(1, 45))
def test_lines_fit_as_the_split_says(lengths: list[int], max_line: int) -> None:
    region = b"".join(b"x" * n + b"\r\n" for n in lengths)
    assert lines_fit(region, max_line) == (max(lengths) + 2 <= max_line)


def test_an_endless_line_holds_no_more_than_a_line() -> None:
    body = Body()
    reader = DotReader(body, LIMIT, MAX_LINE)
    for _ in range(1000):
        assert reader.feed(b"a" * 1000) is None
        assert len(reader._tail) <= 1
    assert reader.feed(b"\r\n.\r\nQUIT\r\n") == b"QUIT\r\n"
    assert reader.state is DataState.TOO_LONG
