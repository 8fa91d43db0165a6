"""Tests of tidstorage.formats.tidlog, on real files in tmp_path."""

from __future__ import annotations

import json
import logging
import os
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidstorage.formats import tidlog
from tidstorage.formats.tidlog import (
    KIND_FULL,
    KIND_INCREMENTAL,
    LogContents,
    Record,
    TidLogError,
    TidLogWriter,
    check_log,
    decode_line,
    encode_record,
    read_log,
    rewrite_full,
)

# Storage ids: any unicode, including lone surrogates, controls and newlines.
storage_ids = st.text(st.characters(exclude_categories=()), max_size=12)
tid_values = st.integers(min_value=0, max_value=2**64 - 1)
tid_maps = st.dictionaries(storage_ids, tid_values, max_size=8)
timestamps = st.floats(min_value=0, max_value=1e10, allow_nan=False, allow_infinity=False)
kinds = st.sampled_from([KIND_FULL, KIND_INCREMENTAL])


def write_lines(path, *lines: bytes) -> None:
    path.write_bytes(b"".join(lines))


def line_with_valid_crc(obj: dict) -> bytes:
    """A JSON line for `obj` (without "crc") with a correct crc added."""
    dumps = lambda o: json.dumps(o, sort_keys=True, separators=(",", ":"))
    crc = format(zlib.crc32(dumps(obj).encode()), "08x")
    return dumps({**obj, "crc": crc}).encode() + b"\n"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------
# encode / decode
# ---------------------------------------------------------------------------


@given(time=timestamps, kind=kinds, tids=tid_maps)
def test_round_trip(time, kind, tids):
    line = encode_record(time, kind, tids)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    line.decode("ascii")  # json.dumps escapes everything
    record = decode_line(line, lineno=7, path="x")
    assert record == Record(time=time, kind=kind, tids=tids, lineno=7, legacy=False)


def test_encoding_is_canonical_json_with_crc():
    line = encode_record(12.5, KIND_FULL, {"main": 5, "other": 2**64 - 1})
    obj = json.loads(line)
    assert set(obj) == {"v", "time", "kind", "tids", "crc"}
    crc = obj.pop("crc")
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    assert crc == format(zlib.crc32(canonical.encode()), "08x")
    assert line == line_with_valid_crc(obj)


@pytest.mark.parametrize(
    "kind, tids, time",
    [
        ("partial", {"a": 1}, 1.0),
        (KIND_FULL, {"a": -1}, 1.0),
        (KIND_FULL, {"a": 2**64}, 1.0),
        (KIND_FULL, {"a": True}, 1.0),
        (KIND_FULL, {1: 1}, 1.0),
        (KIND_FULL, {"a": 1}, float("nan")),
    ],
)
def test_encode_refuses_invalid_input(kind, tids, time):
    with pytest.raises(ValueError):
        encode_record(time, kind, tids)


def test_crc_mismatch_detected():
    line = encode_record(1.0, KIND_FULL, {"main": 123456})
    corrupted = line.replace(b"123456", b"123457")
    assert corrupted != line
    with pytest.raises(TidLogError, match="crc mismatch") as info:
        decode_line(corrupted, lineno=3, path="/some/log")
    assert "/some/log:3:" in str(info.value)


@given(tids=tid_maps.filter(bool), data=st.data())
def test_any_single_character_change_in_tids_is_detected(tids, data):
    line = encode_record(1.0, KIND_INCREMENTAL, tids)
    start = line.index(b'"tids":') + len(b'"tids":')
    end = line.index(b',"time"')
    position = data.draw(st.integers(start, end - 1))
    replacement = data.draw(st.sampled_from(b"0123456789abz\"{}:,").filter(lambda c: c != line[position]))
    corrupted = line[:position] + bytes([replacement]) + line[position + 1 :]
    with pytest.raises(TidLogError):
        decode_line(corrupted)


@pytest.mark.parametrize(
    "line, reason",
    [
        (encode_record(1.0, KIND_FULL, {"a": 1})[:-1], "no trailing newline"),
        (b"\n", "neither"),
        (b"[1, 2]\n", "neither"),
        (b"{not json}\n", "invalid JSON"),
        (b'{"v":1}\xff\n', "UTF-8"),
        (line_with_valid_crc({"v": 1, "time": 1.0, "kind": "full"}), "keys"),
        (line_with_valid_crc({"v": 1, "time": 1.0, "kind": "full", "tids": {}, "x": 1}), "keys"),
        (line_with_valid_crc({"v": 2, "time": 1.0, "kind": "full", "tids": {}}), "version"),
        (line_with_valid_crc({"v": True, "time": 1.0, "kind": "full", "tids": {}}), "version"),
        (line_with_valid_crc({"v": 1, "time": "1", "kind": "full", "tids": {}}), "time"),
        (line_with_valid_crc({"v": 1, "time": 1.0, "kind": "f", "tids": {}}), "kind"),
        (line_with_valid_crc({"v": 1, "time": 1.0, "kind": "full", "tids": []}), "mapping"),
        (line_with_valid_crc({"v": 1, "time": 1.0, "kind": "full", "tids": {"a": True}}), "tid"),
        (line_with_valid_crc({"v": 1, "time": 1.0, "kind": "full", "tids": {"a": -1}}), "tid"),
        (line_with_valid_crc({"v": 1, "time": 1.0, "kind": "full", "tids": {"a": 2**64}}), "tid"),
        (line_with_valid_crc({"v": 1, "time": 1.0, "kind": "full", "tids": {"a": 1.0}}), "tid"),
        (b'{"crc":"00000000","kind":"full","tids":{},"time":NaN,"v":1}\n', "NaN"),
        (b'{"crc":"00000000","kind":"full","kind":"full","tids":{},"time":1.0,"v":1}\n', "duplicate"),
        (b'{"crc":"ABCDEF00","kind":"full","tids":{},"time":1.0,"v":1}\n', "hex"),
        (encode_record(1.0, KIND_FULL, {"a": 1}) * 2, "more than one line"),
    ],
)
def test_decode_refuses_invalid_lines(line, reason):
    with pytest.raises(TidLogError, match=reason):
        decode_line(line, lineno=4, path="p")


# ---------------------------------------------------------------------------
# Legacy format
# ---------------------------------------------------------------------------


def test_legacy_line_from_the_old_daemon():
    line = b"1196179931.55 f {\"((('127.0.0.1', 8100),), '1')\": 270462919574233856L, 'main': 5L}\n"
    record = decode_line(line, lineno=2)
    assert record == Record(
        time=1196179931.55,
        kind=KIND_FULL,
        tids={"((('127.0.0.1', 8100),), '1')": 270462919574233856, "main": 5},
        lineno=2,
        legacy=True,
    )


@pytest.mark.parametrize(
    "line, kind, tids",
    [
        (b"10.00 d {'a': 1L}\n", KIND_INCREMENTAL, {"a": 1}),
        (b"10.00 d {}\n", KIND_INCREMENTAL, {}),
        (b"10.00 f {'x1L': 0L}\n", KIND_FULL, {"x1L": 0}),
        (b"10.00 f {\"x1L\": 2, '3L,4L': 18446744073709551615L}\n", KIND_FULL, {"x1L": 2, "3L,4L": 2**64 - 1}),
        (b"10.00 f {'a, (b)': 7, \"it's\": 8L}\n", KIND_FULL, {"a, (b)": 7, "it's": 8}),
        (b"10.00 f {'caf\\xe9': 1}\n", KIND_FULL, {"caf\xe9": 1}),
    ],
)
def test_legacy_lines(line, kind, tids):
    record = decode_line(line)
    assert (record.kind, record.tids, record.time, record.legacy) == (kind, tids, 10.0, True)


@pytest.mark.parametrize(
    "line",
    [
        b"1.0 f __import__('os').system('x')\n",
        b"1.0 f {'a': __import__('os').system('x')}\n",
        b"1.0 f {'a': (lambda: 1)()}\n",
        b"1.0 f {'a': 1} or __import__('os').system('x') or {}\n",
        b"1.0 f {'a': 1}; __import__('os').system('x'); {}\n",
        b"1.0 f {'a': 1L L}\n",
        b"1.0 f {'a': 1 L}\n",
        b"1.0 f {'a': -1}\n",
        b"1.0 f {'a': 1.5}\n",
        b"1.0 f {'a': True}\n",
        b"1.0 f {1: 1}\n",
        b"1.0 f {'a': 2**64}\n",
        b"1.0 f {'a': 18446744073709551616L}\n",
        b"1.0 f {'a', 'b'}\n",
        b"1.0 x {'a': 1}\n",
        b"nan f {'a': 1}\n",
        b"1.0 f {'a': 1}",
        b"1.0  f {'a': 1}\n",
        b"1.0 f {'a': 1\n",
        b"1.0 f {'a': 1}\r\n",
    ],
)
def test_legacy_lines_refused(line, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args))
    with pytest.raises(TidLogError):
        decode_line(line, lineno=1, path="legacy")
    assert calls == []


# ---------------------------------------------------------------------------
# read_log
# ---------------------------------------------------------------------------


def test_read_missing_file_is_empty(tmp_path):
    contents = read_log(tmp_path / "missing")
    assert contents == LogContents(records=[], torn_tail=None)
    assert contents.final_tids() == {}


def test_read_log_line_numbers_and_final_tids(tmp_path):
    path = tmp_path / "tids.log"
    write_lines(
        path,
        b"1.00 f {'a': 1L, 'b': 2L}\n",
        encode_record(2.0, KIND_INCREMENTAL, {"a": 5}),
        encode_record(3.0, KIND_FULL, {"a": 4, "c": 1}),  # lower a, missing b: values never go down
    )
    contents = read_log(path)
    assert [r.lineno for r in contents.records] == [1, 2, 3]
    assert [r.legacy for r in contents.records] == [True, False, False]
    assert contents.torn_tail is None
    assert contents.final_tids() == {"a": 5, "b": 2, "c": 1}


def test_every_truncation_of_the_last_record_is_a_torn_tail(tmp_path, caplog):
    head = [
        encode_record(1.0, KIND_FULL, {"a": 1, "b": 2}),
        b"1.50 d {'b': 3L}\n",
    ]
    last = encode_record(2.0, KIND_INCREMENTAL, {"a": 10, "é\u2028": 2**63})
    prefix = b"".join(head)
    path = tmp_path / "tids.log"
    expected = [decode_line(line, n) for n, line in enumerate(head, start=1)]
    for cut in range(len(last) + 1):
        path.write_bytes(prefix + last[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=tidlog.__name__):
            contents = read_log(path)
        if cut == len(last):
            assert contents.records[:2] == expected
            assert contents.records[2] == decode_line(last, 3)
            assert contents.torn_tail is None
        else:
            assert contents.records == expected, cut  # never a misread record
            if cut == 0:
                assert contents.torn_tail is None
            else:
                assert contents.torn_tail is not None and contents.torn_tail[0] == 3
                assert [r.levelno for r in caplog.records] == [logging.WARNING]
                assert f"{path}:3:" in caplog.records[0].getMessage()


def test_corrupt_last_complete_line_is_a_torn_tail(tmp_path):
    path = tmp_path / "tids.log"
    write_lines(path, encode_record(1.0, KIND_FULL, {"a": 1}), b"\x00\x00garbage\n")
    contents = read_log(path)
    assert len(contents.records) == 1
    assert contents.torn_tail is not None and contents.torn_tail[0] == 2


def _flipped_middle_log(path):
    """The trial's case: a byte flip in the middle; the records after it
    would fold {a: 7, b: 1} where the published state was {a: 7, b: 5}."""
    lines = [
        encode_record(1.0, KIND_FULL, {"a": 5, "b": 1}),
        encode_record(2.0, KIND_INCREMENTAL, {"b": 5}).replace(b'"b":5', b'"b":4'),
        encode_record(3.0, KIND_INCREMENTAL, {"a": 7}),
    ]
    write_lines(path, *lines)
    return lines


def test_corrupt_middle_line_stops_reading(tmp_path):
    path = tmp_path / "tids.log"
    _flipped_middle_log(path)
    with pytest.raises(TidLogError) as info:
        read_log(path)
    assert info.value.lineno == 2 and info.value.path == str(path)
    text = str(info.value)
    assert text.startswith(f"{path}:2: corrupt record: crc mismatch")
    assert f"tidstorage log recover {path}" in text


# ---------------------------------------------------------------------------
# check_log
# ---------------------------------------------------------------------------


def test_check_valid_log(tmp_path):
    path = tmp_path / "tids.log"
    write_lines(
        path,
        b"1.00 f {'a': 1L}\n",
        b"1.00 d {'b': 1L}\n",  # equal timestamps are allowed
        encode_record(2.0, KIND_INCREMENTAL, {"a": 1}),  # equal value is allowed
        encode_record(3.0, KIND_FULL, {"a": 2, "b": 1, "c": 0}),
    )
    report = check_log(path)
    assert report.ok, report.problems
    assert report.problems == []
    assert report.records == 4
    assert report.final_tids == {"a": 2, "b": 1, "c": 0}


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (encode_record(1.5, KIND_INCREMENTAL, {"b": 3}), "before the previous"),
        (encode_record(5.0, KIND_INCREMENTAL, {"a": 1}), "goes down"),
        (encode_record(5.0, KIND_FULL, {"a": 2}), "lacks storage 'b'"),
        (encode_record(5.0, KIND_FULL, {"a": 1, "b": 2}), "goes down"),
        (b"garbage\n", "corrupt line: neither a JSON record"),
    ],
    ids=["decreasing-time", "decreasing-incremental", "full-missing-key", "full-lower-value", "corrupt"],
)
def test_check_finds_problem_with_its_line_number(tmp_path, bad_line, message):
    path = tmp_path / "tids.log"
    write_lines(
        path,
        encode_record(1.0, KIND_FULL, {"a": 1}),
        encode_record(2.0, KIND_INCREMENTAL, {"a": 2, "b": 2}),
        bad_line,
        encode_record(10.0, KIND_FULL, {"a": 3, "b": 3}),
    )
    report = check_log(path)
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    lineno, text = report.problems[0]
    assert lineno == 3 and message in text


def test_check_reports_torn_tail_as_a_warning(tmp_path):
    path = tmp_path / "tids.log"
    write_lines(path, encode_record(1.0, KIND_FULL, {"a": 1}), encode_record(2.0, KIND_FULL, {"a": 2})[:-5])
    report = check_log(path)
    assert report.ok and report.problems == []
    assert report.records == 1 and report.final_tids == {"a": 1}
    assert [(lineno, "torn tail" in text) for lineno, text in report.warnings] == [(2, True)]


def test_check_stops_at_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "tids.log"
    _flipped_middle_log(path)
    report = check_log(path)
    assert not report.ok and report.records == 1 and report.final_tids == {"a": 5, "b": 1}
    assert [lineno for lineno, _ in report.problems] == [2]
    assert "checking stops here" in report.problems[0][1]


def test_check_missing_file(tmp_path):
    report = check_log(tmp_path / "missing")
    assert not report.ok and report.problems[0][0] == 0


# ---------------------------------------------------------------------------
# rewrite_full
# ---------------------------------------------------------------------------


def test_rewrite_full(tmp_path):
    src = tmp_path / "old.log"
    dst = tmp_path / "new.log"
    write_lines(
        src,
        b"1.00 f {'a': 1L, 'b': 1L}\n",
        b"1.00 d {'b': 4L}\n",
        encode_record(2.0, KIND_INCREMENTAL, {"c": 7}),
        encode_record(3.0, KIND_FULL, {"a": 2, "b": 4, "c": 7}),
        encode_record(4.0, KIND_INCREMENTAL, {"a": 9})[:10],  # torn tail
    )
    assert rewrite_full(src, dst) == 4
    contents = read_log(dst)
    assert contents.torn_tail is None
    assert [r.kind for r in contents.records] == [KIND_FULL] * 4
    assert not any(r.legacy for r in contents.records)
    assert [r.time for r in contents.records] == [1.0, 1.0, 2.0, 3.0]
    assert [r.tids for r in contents.records] == [
        {"a": 1, "b": 1},
        {"a": 1, "b": 4},
        {"a": 1, "b": 4, "c": 7},
        {"a": 2, "b": 4, "c": 7},
    ]
    assert contents.final_tids() == read_log(src).final_tids()
    assert check_log(dst).ok
    assert sorted(os.listdir(tmp_path)) == ["new.log", "old.log"]  # no temporary file left


@given(records=st.lists(st.tuples(kinds, tid_maps), max_size=6))
def test_rewrite_full_in_place_keeps_final_tids(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("rewrite") / "tids.log"
    write_lines(path, *(encode_record(float(i), kind, tids) for i, (kind, tids) in enumerate(records)))
    before = read_log(path).final_tids()
    assert rewrite_full(path, path) == len(records)
    after = read_log(path)
    assert all(r.kind == KIND_FULL for r in after.records)
    assert after.final_tids() == before
    assert check_log(path).ok
    assert os.listdir(path.parent) == ["tids.log"]


def test_rewrite_full_refuses_a_corrupt_log(tmp_path):
    src = tmp_path / "old.log"
    _flipped_middle_log(src)
    with pytest.raises(TidLogError, match=":2: corrupt record"):
        rewrite_full(src, tmp_path / "new.log")
    assert sorted(os.listdir(tmp_path)) == ["old.log"]


def test_recover_keeps_the_valid_prefix_and_the_original(tmp_path):
    path = tmp_path / "tids.log"
    lines = _flipped_middle_log(path)
    original = path.read_bytes()
    out = tmp_path / "out.log"
    res = tidlog.recover_log(path, out)
    assert out.read_bytes() == lines[0] and path.read_bytes() == original
    assert (res.kept, res.dropped_lines, res.error.lineno) == (1, 2, 2)
    assert res.final_tids == {"a": 5, "b": 1}
    with pytest.raises(FileExistsError):
        tidlog.recover_log(path, out)  # never overwrites another file
    res = tidlog.recover_log(path)  # in place: the original is kept beside it
    assert path.read_bytes() == lines[0]
    assert res.original.startswith(f"{path}.corrupt-")
    assert open(res.original, "rb").read() == original
    assert check_log(path).ok and read_log(path).final_tids() == {"a": 5, "b": 1}
    # nothing to recover: untouched
    assert tidlog.recover_log(path).original is None
    assert sorted(os.listdir(tmp_path)) == sorted(["tids.log", "out.log",
                                                   os.path.basename(res.original)])


def test_rewrite_full_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError):
        rewrite_full(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# TidLogWriter
# ---------------------------------------------------------------------------


def records_of(path) -> list[tuple[float, str, dict[str, int]]]:
    contents = read_log(path)
    assert contents.torn_tail is None
    return [(r.time, r.kind, r.tids) for r in contents.records]


def test_writer_full_record_at_start_holds_initial_state(tmp_path):
    path = tmp_path / "tids.log"
    clock = FakeClock(100.0)
    writer = TidLogWriter(path, burst_period=1, full_dump_period=60, clock=clock, initial_state={"a": 3})
    assert path.read_bytes() == b""  # created, first record written by the first tick
    assert writer.tick() is True
    assert records_of(path) == [(100.0, KIND_FULL, {"a": 3})]
    assert writer.tick() is False  # nothing changed
    clock.now += 30
    assert writer.tick() is False
    assert len(records_of(path)) == 1
    writer.close()


def test_writer_writes_nothing_when_state_is_empty(tmp_path):
    path = tmp_path / "tids.log"
    clock = FakeClock()
    with TidLogWriter(path, burst_period=1, full_dump_period=60, clock=clock) as writer:
        assert writer.tick() is False
        clock.now += 100
        assert writer.tick() is False
    assert path.read_bytes() == b""


def test_writer_incremental_after_burst_period_with_changed_keys_only(tmp_path):
    path = tmp_path / "tids.log"
    clock = FakeClock(100.0)
    writer = TidLogWriter(path, burst_period=1, full_dump_period=60, clock=clock, initial_state={"a": 1, "b": 1})
    writer.tick()  # full record
    clock.now = 100.5
    writer.published({"a": 2}, {"a": 2, "b": 1})  # within burst period: remembered only
    writer.published({"a": 3}, {"a": 3, "b": 1})
    assert writer.tick() is False
    assert len(records_of(path)) == 1
    clock.now = 101.0
    assert writer.tick() is True
    assert records_of(path)[1:] == [(101.0, KIND_INCREMENTAL, {"a": 3})]
    assert writer.tick() is False  # no pending change any more
    clock.now = 105.0
    assert writer.tick() is False
    # The first change after a quiet period is written at once by published().
    writer.published({"b": 7}, {"a": 3, "b": 7})
    assert records_of(path)[2:] == [(105.0, KIND_INCREMENTAL, {"b": 7})]
    writer.close()
    assert len(records_of(path)) == 3  # close had nothing to flush
    assert check_log(path).ok


def test_writer_full_dump_takes_precedence(tmp_path):
    path = tmp_path / "tids.log"
    clock = FakeClock(100.0)
    writer = TidLogWriter(path, burst_period=1, full_dump_period=10, clock=clock, initial_state={"a": 1})
    writer.tick()
    clock.now = 105.0
    writer.published({"b": 1}, {"a": 1, "b": 1})  # written at once (burst due)
    clock.now = 105.5
    writer.published({"a": 2}, {"a": 2, "b": 1})  # pending
    clock.now = 110.0  # both a burst and a full dump are due
    assert writer.tick() is True
    assert records_of(path)[2:] == [(110.0, KIND_FULL, {"a": 2, "b": 1})]
    assert writer.tick() is False  # the full record absorbed the pending change
    clock.now = 111.0
    assert writer.tick() is False
    writer.close()
    assert [kind for _, kind, _ in records_of(path)] == [KIND_FULL, KIND_INCREMENTAL, KIND_FULL]


def test_writer_without_periods_writes_every_publication(tmp_path):
    path = tmp_path / "tids.log"
    clock = FakeClock(100.0)
    writer = TidLogWriter(path, burst_period=None, full_dump_period=None, clock=clock)
    writer.published({"a": 1}, {"a": 1})
    writer.published({"b": 1}, {"a": 1, "b": 1})
    assert writer.tick() is False
    writer.close()
    records = records_of(path)
    assert [(kind, tids) for _, kind, tids in records] == [(KIND_INCREMENTAL, {"a": 1}), (KIND_INCREMENTAL, {"b": 1})]
    assert records[0][0] < records[1][0]  # same clock reading, still strictly increasing


def test_writer_timestamps_strictly_increase(tmp_path):
    path = tmp_path / "tids.log"
    clock = FakeClock(100.0)
    writer = TidLogWriter(path, burst_period=0, full_dump_period=None, clock=clock)
    for value in range(1, 4):
        writer.published({"a": value}, {"a": value})
        clock.now -= 10  # clock going backwards
    writer.close()
    times = [t for t, _, _ in records_of(path)]
    assert len(times) == 3 and times[0] == 100.0
    assert times[0] < times[1] < times[2]
    # Across a restart too: the last record of the existing file is taken into account.
    writer = TidLogWriter(path, burst_period=0, full_dump_period=None, clock=FakeClock(50.0))
    writer.published({"a": 9}, {"a": 9})
    writer.close()
    assert records_of(path)[-1][0] > times[-1]
    assert check_log(path).ok


def test_writer_schedule_survives_clock_going_back(tmp_path):
    path = tmp_path / "tids.log"
    clock = FakeClock(1000.0)
    writer = TidLogWriter(path, burst_period=1, full_dump_period=60, clock=clock, initial_state={"a": 1})
    writer.tick()
    clock.now = 100.0  # back by 900 s
    writer.published({"a": 2}, {"a": 2})
    clock.now = 101.0
    assert writer.tick() is True  # not 900 s later
    clock.now = 160.0
    assert writer.tick() is True
    writer.close()
    assert [kind for _, kind, _ in records_of(path)] == [KIND_FULL, KIND_INCREMENTAL, KIND_FULL]


def test_writer_flush_and_close(tmp_path):
    path = tmp_path / "tids.log"
    clock = FakeClock(100.0)
    writer = TidLogWriter(path, burst_period=10, full_dump_period=None, clock=clock)
    writer.published({"a": 1}, {"a": 1})  # written at once
    clock.now += 1
    writer.published({"b": 1}, {"a": 1, "b": 1})  # pending
    writer.flush()
    assert records_of(path)[1:] == [(101.0, KIND_INCREMENTAL, {"b": 1})]
    writer.flush()  # nothing pending: nothing written
    clock.now += 1
    writer.published({"a": 2}, {"a": 2, "b": 1})
    writer.close()
    assert records_of(path)[2:] == [(102.0, KIND_INCREMENTAL, {"a": 2})]
    writer.close()  # idempotent
    with pytest.raises(ValueError):
        writer.write_full()


def test_writer_write_full(tmp_path):
    path = tmp_path / "tids.log"
    clock = FakeClock(100.0)
    writer = TidLogWriter(path, burst_period=10, full_dump_period=None, clock=clock)
    writer.published({"a": 1}, {"a": 1})
    clock.now += 1
    writer.published({"b": 1}, {"a": 1, "b": 1})
    writer.write_full()
    writer.close()  # the full record absorbed the pending change
    assert records_of(path) == [
        (100.0, KIND_INCREMENTAL, {"a": 1}),
        (101.0, KIND_FULL, {"a": 1, "b": 1}),
    ]


def test_writer_fsyncs_each_record(tmp_path, monkeypatch):
    path = tmp_path / "tids.log"
    clock = FakeClock(100.0)
    writer = TidLogWriter(path, burst_period=0, full_dump_period=None, clock=clock)
    synced_sizes = []
    real_fsync = os.fsync
    monkeypatch.setattr(tidlog.os, "fsync", lambda fd: (synced_sizes.append(os.fstat(fd).st_size), real_fsync(fd)))
    writer.published({"a": 1}, {"a": 1})
    size_after_first = path.stat().st_size
    writer.published({"a": 2}, {"a": 2})
    assert synced_sizes == [size_after_first, path.stat().st_size]
    writer.close()


def test_writer_reopen_after_rotation(tmp_path):
    path = tmp_path / "tids.log"
    rotated = tmp_path / "tids.log.1"
    clock = FakeClock(100.0)
    writer = TidLogWriter(path, burst_period=1, full_dump_period=3600, clock=clock, initial_state={"a": 1})
    writer.tick()
    clock.now += 5
    writer.published({"b": 2}, {"a": 1, "b": 2})
    old_contents = path.read_bytes()
    os.rename(path, rotated)
    clock.now += 5
    writer.reopen()
    assert rotated.read_bytes() == old_contents  # nothing more went to the old file
    assert records_of(path) == [(110.0, KIND_FULL, {"a": 1, "b": 2})]
    clock.now += 5
    writer.published({"a": 3}, {"a": 3, "b": 2})
    writer.close()
    assert records_of(path)[1:] == [(115.0, KIND_INCREMENTAL, {"a": 3})]


@pytest.mark.parametrize("torn", [
    encode_record(2.0, KIND_INCREMENTAL, {"a": 2})[:-7],           # no newline
    b"\x00" * 40,                                                 # zeros, no newline
    encode_record(2.0, KIND_INCREMENTAL, {"a": 2})[:9] + b"\x00" * 9 + b"}\n",  # a lost page
], ids=["cut", "zeros", "garbled-with-newline"])
def test_writer_truncates_a_torn_tail(tmp_path, caplog, torn):
    """After a crash while appending, the next writer cuts the torn bytes
    off: the log stays readable after any number of crashes."""
    path = tmp_path / "tids.log"
    first = encode_record(1.0, KIND_FULL, {"a": 1})
    write_lines(path, first, torn)
    assert read_log(path).torn_tail[0] == 2 and check_log(path).ok
    with caplog.at_level(logging.WARNING, logger=tidlog.__name__):
        writer = TidLogWriter(path, burst_period=1, full_dump_period=60, clock=FakeClock(100.0), initial_state={"a": 1})
    assert any("torn" in r.getMessage() and "truncating" in r.getMessage() for r in caplog.records)
    assert writer.tick() is True
    writer.close()
    assert path.read_bytes() == first + encode_record(100.0, KIND_FULL, {"a": 1})
    assert records_of(path) == [(1.0, KIND_FULL, {"a": 1}), (100.0, KIND_FULL, {"a": 1})]
    report = check_log(path)
    assert report.ok and report.warnings == []


def test_writer_keeps_pending_changes_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "tids.log"
    clock = FakeClock(100.0)
    writer = TidLogWriter(path, burst_period=1, full_dump_period=None, clock=clock)
    writer.published({"a": 1}, {"a": 1})
    real_write = os.write

    def half_write_then_fail(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tidlog.os, "write", half_write_then_fail)
    clock.now += 1
    with pytest.raises(OSError):
        writer.published({"a": 2}, {"a": 2})
    monkeypatch.setattr(tidlog.os, "write", real_write)
    clock.now += 1
    writer.published({"b": 1}, {"a": 2, "b": 1})  # retries with all pending changes
    writer.close()
    contents = read_log(path)
    assert [r.tids for r in contents.records] == [{"a": 1}, {"a": 2, "b": 1}]
    assert [r.lineno for r in contents.records] == [1, 2]  # the half-written line was cut off
    assert contents.torn_tail is None and check_log(path).ok


# ---------------------------------------------------------------------------
# The command line: log check / recover, and the daemon's refusal to start
# ---------------------------------------------------------------------------


def test_cli_log_check_torn_tail_is_a_warning(tmp_path):
    from support.fsfixtures import run_cli

    path = tmp_path / "tids.log"
    write_lines(path, encode_record(1.0, KIND_FULL, {"a": 1}), encode_record(2.0, KIND_FULL, {"a": 2})[:-5])
    r = run_cli("log", "check", path, "--json")
    assert r.returncode == 0, r.stderr
    assert f"{path}:2: warning: torn tail" in r.stderr
    assert json.loads(r.stdout) == {"a": 1}


def test_cli_corrupt_middle_line_serve_refuses_then_recover(tmp_path):
    from support.fsfixtures import run_cli

    path = tmp_path / "tids.log"
    lines = _flipped_middle_log(path)
    r = run_cli("log", "check", path, "--json")
    assert r.returncode == 1 and f"{path}:2: corrupt line: crc mismatch" in r.stderr
    # the daemon refuses to start, naming the file and the line
    r = run_cli("serve", "--port", "0", "--status-file", path, timeout=60)
    assert r.returncode != 0
    assert f"{path}:2: corrupt record: crc mismatch" in r.stderr
    assert "tidstorage log recover" in r.stderr
    assert path.read_bytes() == b"".join(lines)  # untouched
    r = run_cli("log", "recover", path)
    assert r.returncode == 0, r.stderr
    assert f"{path}:2: first corrupt line" in r.stdout and "kept 1 valid record(s)" in r.stdout
    kept = [p for p in os.listdir(tmp_path) if p.startswith("tids.log.corrupt-")]
    assert len(kept) == 1 and (tmp_path / kept[0]).read_bytes() == b"".join(lines)
    r = run_cli("log", "check", path, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"a": 5, "b": 1}
    r = run_cli("log", "recover", path)
    assert r.returncode == 0 and "nothing to recover" in r.stdout


def test_accept_records_are_kept_across_reopen_and_rewrite(tmp_path):
    from tidstorage.formats.tidlog import TidLogWriter, encode_accept, read_log, rewrite_full

    path = tmp_path / "t.tid"
    with TidLogWriter(path, burst_period=None, full_dump_period=None,
                      initial_state={"a": 5}) as w:
        w.write_full()
        w.accept("ts:x-1")
        w.published({"a": 7}, {"a": 7})
        w.tick()
        path.rename(tmp_path / "old.tid")  # logrotate
        w.reopen()
    contents = read_log(path)
    assert contents.accepted() == {"ts:x-1"} and contents.final_tids() == {"a": 7}
    assert read_log(tmp_path / "old.tid").accepted() == {"ts:x-1"}
    assert rewrite_full(path, tmp_path / "full.tid") == len(contents.records)
    assert read_log(tmp_path / "full.tid").accepted() == {"ts:x-1"}
    # a tampered accept record is refused like any other
    line = encode_accept(1.0, "ts:y-1").replace(b"ts:y-1", b"ts:z-1")
    (tmp_path / "bad.tid").write_bytes(line + encode_accept(2.0, "ts:x-1"))
    import pytest

    from tidstorage.errors import TidLogError
    with pytest.raises(TidLogError, match="crc"):
        read_log(tmp_path / "bad.tid")
