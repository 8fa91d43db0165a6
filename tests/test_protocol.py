"""The sans-io codec (protocol.py): legacy wire format, limits, garbage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidstorage.core import protocol as p
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
        (b"BEGIN\nt1\n-1\n", "not an integer"),
        (b"BEGIN\nt1\n99999999\n", "out of range"),
        (b"COMMIT\nt1\n1\ns1\nnotanumber\n", "not an integer"),
        (b"COMMIT\nt1\n1\ns1\n-5\n", "not an integer"),
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
    # A BEGIN announcing MAX_STORAGES storages, then ids that never complete it.
    events = d.feed(b"BEGIN\nt1\n%d\n" % p.MAX_STORAGES)
    assert events == []
    assert d.pending
    big = (b"z" * 1000 + b"\n") * 1100  # > MAX_PENDING_BYTES, < MAX_STORAGES fields
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


# -- integers are ASCII digits only (issue 9.17) -----------------------------

# int() takes all of these; the codec must not.
NOT_DIGITS = ["+1", "+1_000", "1_0", " 12", "12 ", "\t1", "١٢", "１", "²", "", "-0", "0x1", "1e3"]
SLOTS = [
    ("BEGIN\nt1\n{}\ns1\n", "storage list count"),
    ("LOST\n{}\ns1\n", "storage list count"),
    ("COMMIT\nt1\n{}\ns1\n5\n", "TID dict count"),
    ("BEGIN2\nt1\n{}\ns1\n5\n", "TID dict count"),
    ("COMMIT\nt1\n1\ns1\n{}\n", "TID of storage 's1'"),
    ("COMMIT\nt1\n2\ns1\ns2\n5\n{}\n", "TID of storage 's2'"),
    ("BEGIN2\nt1\n2\ns1\ns2\n{}\n7\n", "TID of storage 's1'"),
    ("HELLO\nsid\nsecret\n{}\nhost\n", "HELLO pid"),
]


@pytest.mark.parametrize("template, field", SLOTS)
@pytest.mark.parametrize("value", NOT_DIGITS)
def test_integers_in_commands_are_ascii_digits_only(template, field, value):
    events = feed_all(b"DUMP\n" + template.format(value).encode() + b"DUMP\n")
    assert events[0] == (p.DUMP,) and len(events) == 2, events
    assert events[1][0] == p.ERROR and field in events[1][1], events


@pytest.mark.parametrize("value", NOT_DIGITS)
def test_integers_in_replies_are_ascii_digits_only(value):
    r = p.ReplyReader()
    r.feed(value.encode() + b"\n")
    with pytest.raises(p.ProtocolError, match="an integer reply is not an integer"):
        r.read_int()
    r = p.ReplyReader()
    r.feed(f"{value}\na\n5\n".encode())
    with pytest.raises(p.ProtocolError, match="reply dict count is not an integer"):
        r.read_dict()
    r = p.ReplyReader()
    r.feed(f"2\na\nb\n5\n{value}\n".encode())
    with pytest.raises(p.ProtocolError, match="TID of storage 'b' is not an integer"):
        r.read_dict()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="0123456789+_ -١x", max_size=22), min_size=1, max_size=6))
def test_tids_are_taken_exactly_when_they_are_ascii_decimal_numbers(values):
    keys = [f"s{i}" for i in range(len(values))]
    events = feed_all("\n".join(["COMMIT", "t1", str(len(keys)), *keys, *values, ""]).encode())
    valid = all(v.isascii() and v.isdigit() and len(v) <= p.MAX_DIGITS and int(v) <= p.MAX_TID
                for v in values)
    if valid:
        assert events == [(p.COMMIT, "t1", {k: int(v) for k, v in zip(keys, values)})]
    else:
        assert [e[0] for e in events] == [p.ERROR]
        assert "TID of storage" in events[0][1]


# -- one limit on storage ids, on both sides (issue 9.17) ----------------------


def _dict_reply(n: int) -> bytes:
    return p.encode_dict({f"storage-{i}": i for i in range(n)})


def test_the_largest_dict_is_accepted_by_both_sides():
    n = p.MAX_STORAGES
    tids = {f"storage-{i}": i for i in range(n)}
    assert feed_all(p.encode_commit("t1", tids), 65536) == [(p.COMMIT, "t1", tids)]
    r = p.ReplyReader()
    r.feed(_dict_reply(n))
    assert r.read_dict() == tids
    for data in (p.encode_commit("t1", {**tids, "one more": 1}), p.encode_begin("t1", [*tids, "x"])):
        events = feed_all(data)
        assert events[-1][0] == p.ERROR and f"out of range 0..{n}" in events[-1][1]
    r.feed(_dict_reply(n + 1))
    with pytest.raises(p.ProtocolError, match=f"reply dict count {n + 1} is out of range"):
        r.read_dict()


def test_dump_works_when_the_daemon_is_asked_for_more_ids_than_the_limit(tmp_path):
    """The daemon refuses the report that would make it publish more storage
    ids than a DUMP reply may hold (before: it took them, and then
    ``tidstorage dump`` failed for ever with "count 4097 is out of range")."""
    import json
    import socket

    from support.fsfixtures import run_cli
    from tidstorage.demo.cluster import DaemonProcess

    d = DaemonProcess(tmp_path / "d", verbose=False).start()  # no [storages]: any id
    try:
        ids = [f"storage-{i}" for i in range(p.MAX_STORAGES)]
        with socket.create_connection(d.address, timeout=10) as s:
            s.sendall(p.encode_begin("t1", ids) + p.encode_commit("t1", dict.fromkeys(ids, 7))
                      + p.SYNC_REQUEST + p.encode_begin("t2", ["storage-0", "one too many"])
                      + p.SYNC_REQUEST + p.encode_begin("t3", ["storage-1"]) + p.SYNC_REQUEST)
            replies = b""
            while replies.count(b"\n") < 3:
                replies += s.recv(100)
            assert replies == b"1\n0\n1\n"  # t2 refused; the connection lives on
            s.sendall(p.encode_commit("t3", {"storage-1": 8}) + p.SYNC_REQUEST)
            assert s.recv(100) == b"1\n"
        r = run_cli("dump", "--server", f"127.0.0.1:{d.port}", "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {**dict.fromkeys(ids, 7), "storage-1": 8}
    finally:
        assert d.stop() == 0
    assert "4096 are known already (limit 4096, MAX_STORAGES)" in d.log()
