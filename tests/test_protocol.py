"""The sans-io codec (protocol.py): legacy wire format, limits, garbage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidstorage import protocol as p


def feed_all(data: bytes, chunk: int | None = None) -> list[tuple]:
    d = p.Decoder()
    if chunk is None:
        return d.feed(data)
    events = []
    for i in range(0, len(data), chunk):
        events += d.feed(data[i : i + chunk])
    return events


# Bytes exactly as the legacy ExchangeProtocol sends them.
LEGACY = (
    b"begin\nzope1_7f3a\n2\n((('127.0.0.1', 8100),), '1')\nother\n"
    b"commit\nzope1_7f3a\n2\n((('127.0.0.1', 8100),), '1')\nother\n"
    b"271828182845904523\n314159265358979323\n"
    b"abort\nzope2_1\n"
    b"dump\nbootstraped\nquit\n"
)
LEGACY_EVENTS = [
    (p.BEGIN, "zope1_7f3a", ["((('127.0.0.1', 8100),), '1')", "other"], None),
    (p.COMMIT, "zope1_7f3a", {"((('127.0.0.1', 8100),), '1')": 271828182845904523,
                              "other": 314159265358979323}),
    (p.ABORT, "zope2_1"),
    (p.DUMP,),
    (p.BOOTSTRAPED,),
    (p.QUIT,),
]


def test_legacy_bytes_decode():
    assert feed_all(LEGACY) == LEGACY_EVENTS


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_any_split_of_the_stream_gives_the_same_events(chunk):
    assert feed_all(LEGACY, chunk) == LEGACY_EVENTS


def test_carriage_returns_ignored_and_case_insensitive():
    data = LEGACY.replace(b"\n", b"\r\n").replace(b"begin", b"BeGiN")
    assert feed_all(data) == LEGACY_EVENTS
    assert feed_all(b"du\rmp\n") == [(p.DUMP,)]


def test_encoders_round_trip():
    data = (
        p.encode_begin("t1", ["a", "b"]) + p.encode_commit("t1", {"a": 1, "b": 2**64 - 1})
        + p.encode_abort("t2") + p.SYNC_REQUEST + p.encode_auth("tok")
        + p.encode_begin("t3", ["a", "b"], {"a": 5, "b": 6})
        + p.encode_lost(["a", "b"]) + p.encode_in_doubt("t3")
    )
    assert feed_all(data) == [
        (p.BEGIN, "t1", ["a", "b"], None),
        (p.COMMIT, "t1", {"a": 1, "b": 2**64 - 1}),
        (p.ABORT, "t2"),
        (p.SYNC,),
        (p.AUTH, "tok"),
        (p.BEGIN, "t3", ["a", "b"], {"a": 5, "b": 6}),
        (p.LOST, ["a", "b"]),
        (p.INDOUBT, "t3"),
    ]


def test_encoders_refuse_line_breaks():
    with pytest.raises(ValueError):
        p.encode_begin("t\n1", ["a"])
    with pytest.raises(ValueError):
        p.encode_commit("t1", {"a\r": 1})


def test_dump_reply_matches_legacy_send_dict():
    # legacy: count, keys, then values (no second count)
    assert p.encode_dict({"a": 1, "b": 22}) == b"2\na\nb\n1\n22\n"
    assert p.encode_dict({}) == b"0\n"
    r = p.ReplyReader()
    r.feed(b"2\na\nb\n1\n")
    assert r.read_dict() is None  # incomplete
    r.feed(b"22\n1\n")
    assert r.read_dict() == {"a": 1, "b": 22}
    assert r.read_int() == 1


@pytest.mark.parametrize(
    "data, message",
    [
        (b"FROB\n", "unknown command"),
        (b"BEGIN\nt1\nx\n", "not an integer"),
        (b"BEGIN\nt1\n-1\n", "out of range"),
        (b"BEGIN\nt1\n99999999\n", "out of range"),
        (b"COMMIT\nt1\n1\ns1\nnotanumber\n", "not an integer"),
        (b"COMMIT\nt1\n1\ns1\n-5\n", "out of range"),
        (b"COMMIT\nt1\n1\ns1\n%d\n" % 2**64, "out of range"),
        (b"COMMIT\nt1\n2\ns1\ns1\n1\n2\n", "twice"),
        (b"BEGIN\n\xff\xfe\n1\ns1\n", "not UTF-8"),
        (b"BEGIN\n" + b"x" * (p.MAX_FIELD_BYTES + 1) + b"\n1\ns\n", "long (limit"),
        (b"DUMP\n" + b"y" * (p.MAX_FIELD_BYTES + 1), "no end of line"),
        (b"\x00\x01\x02\n", "unknown command"),
    ],
)
def test_malformed_input_is_an_error_event(data, message):
    events = feed_all(data)
    assert events[-1][0] == p.ERROR
    assert message in events[-1][1]
    # nothing of the bad command was decoded
    assert all(e[0] in (p.DUMP, p.ERROR) for e in events)


def test_commands_before_the_error_are_kept_and_decoder_stays_broken():
    d = p.Decoder()
    events = d.feed(b"DUMP\nBEGIN\nt1\n1\ns1\nFROB\nDUMP\n")
    assert events[:2] == [(p.DUMP,), (p.BEGIN, "t1", ["s1"], None)]
    assert events[2][0] == p.ERROR
    assert d.feed(b"DUMP\n") == []


def test_pending_command_is_bounded():
    d = p.Decoder()
    # A BEGIN announcing MAX_ITEMS storages, then ids that never complete it.
    events = d.feed(b"BEGIN\nt1\n%d\n" % p.MAX_ITEMS)
    assert events == []
    assert d.pending
    big = (b"z" * 1000 + b"\n") * 1100  # > MAX_PENDING_BYTES, < MAX_ITEMS fields
    events = d.feed(big)
    assert events and events[-1][0] == p.ERROR


def test_half_a_message_stays_pending():
    d = p.Decoder()
    assert d.feed(b"COMMIT\nt1\n2\na\nb\n1\n") == []
    assert d.pending
    assert d.feed(b"2\n") == [(p.COMMIT, "t1", {"a": 1, "b": 2})]
    assert not d.pending


ids = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
    min_size=1, max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(
    txns=st.lists(
        st.tuples(ids, st.dictionaries(ids, st.integers(0, 2**64 - 1), min_size=1, max_size=5)),
        max_size=10,
    ),
    chunk=st.integers(1, 50),
)
def test_round_trip_any_chunking(txns, chunk):
    data = b"".join(
        p.encode_begin(txn, tids) + p.encode_commit(txn, tids) for txn, tids in txns
    )
    expected = []
    for txn, tids in txns:
        expected += [(p.BEGIN, txn, list(tids), None), (p.COMMIT, txn, tids)]
    assert feed_all(data, chunk) == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_raises(data):
    events = p.Decoder().feed(data)
    for event in events:
        assert event[0] in {p.BEGIN, p.COMMIT, p.ABORT, p.DUMP, p.BOOTSTRAPED, p.QUIT,
                            p.SYNC, p.AUTH, p.LOST, p.INDOUBT, p.ERROR}
    assert all(e[0] != p.ERROR for e in events[:-1])
