"""The daemon's line protocol: a sans-io codec, compatible with legacy TIDStorage.

Wire format (the legacy ``ExchangeProtocol``)
=============================================
Everything is a sequence of *fields*. A field is bytes ended by ``\\n``; any
``\\r`` is ignored (dropped wherever it appears). Integers are decimal fields
of ASCII digits only (no sign, space, ``_`` or other scripts' digits).
A *list* is a count field then that many fields. A *dict* (str -> int) is a
count field, then the keys, then the values, in the same order.

A command is a field, case insensitive, followed by its arguments:

==================  ==========================  ==============================
command             arguments                   reply
==================  ==========================  ==============================
``BEGIN``           txn id, list of storages    none
``COMMIT``          txn id, dict storage->tid   none
``ABORT``           txn id                      none
``DUMP``                                        dict of published TIDs
``BOOTSTRAPED``                                 ``1`` or ``0``
``QUIT``                                        none; the server closes
==================  ==========================  ==============================

Extensions (legacy clients never send them, so they see no difference):

``BEGIN2`` txn id, dict storage->bound
    ``BEGIN`` with, per storage, a TID the commit will exceed (see "Bounds"
    in ``tracker.py``): lets a busy group publish. No reply.
``SYNC``
    Reply ``1`` once every command received before it on this connection has
    been applied. The ZODB integration sends ``BEGIN`` + ``SYNC`` and waits
    for the reply before its first ``tpc_finish``: the daemon has then
    registered the transaction. Benchmarks use it to confirm processing.
``AUTH`` token
    Must be the first command when the daemon has an auth token; reply ``1``,
    or the server logs the failure and closes the connection.
``LOST`` list of storages
    The client could not get a BEGIN confirmed for transactions on these
    storages (daemon down or slow): the daemon must not trust its state for
    them; it freezes and re-checks them (see ``server.py``). No reply.
``INDOUBT`` txn id
    The client does not know whether its transaction finished everywhere
    (a ``tpc_finish`` failed after another succeeded): the daemon resolves it
    from the stamps in the storages. No reply.
``HELLO`` session id, secret, pid, host
    Sent by tidstorage clients first (after ``AUTH``): who this process is.
    A process keeps its session id and secret across reconnections, so the
    daemon knows the transactions it re-declares are its own. Reply: one
    field, the daemon's id (random per daemon process): a client reaching
    the same daemon under two addresses uses one connection.

``ADMIN`` request
    The operators' command (``tidstorage status``, ``tidstorage admin``):
    one field, a JSON object ``{"verb": ..., "token": ..., ...}`` of at most
    :data:`MAX_FIELD_BYTES`. Reply: a list of fields that, joined, are the
    JSON answer (at most :data:`MAX_ADMIN_REPLY_BYTES`, in fields of
    :data:`ADMIN_CHUNK` characters). The verbs (``coordinator._admin``):
    ``status`` (the point, each storage's lag and problems, in-flight and
    in-doubt transactions, splits; ``tidstorage status``, ``backup``,
    ``heal``, the metrics), ``tidlog`` (a page of the TID log, for a backup
    on another host), and, with the daemon's admin token, ``set-tid``,
    ``forget`` (``tidstorage admin``), ``accept`` and ``healed``
    (``tidstorage heal``). Only an authenticated connection sends any.

``SYNC`` replies ``0`` instead of ``1`` when a ``BEGIN`` received since the
previous ``SYNC`` on the connection was refused (a rule, a budget, an
unknown storage): the client's commit is then not registered.

Malformed input (an unknown command, a bad count or integer, an over-long
field, bytes that are not UTF-8) cannot be resynchronised: the decoder emits
an :data:`ERROR` event after the commands decoded before it, and the server
closes that connection. Nothing of the bad command is applied.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from ..errors import ProtocolError
from .tids import MAX_TID  # TIDs are unsigned 64-bit integers

# -- limits ---------------------------------------------------------------

#: Longest field (a transaction id or a storage id). Legacy storage ids are
#: the repr of a ZEO client's addresses and storage name (~100 bytes); ids of
#: 16 KiB are garbage, and the bound keeps a peer from making us buffer an
#: endless line.
MAX_FIELD_BYTES = 16 * 1024
#: Most storage ids in one list or dict (a command, or a ``DUMP`` reply), and
#: so in the daemon's published state: the tracker refuses a report that
#: would make it name more (``tracker.py``), so a ``DUMP`` reply always fits
#: what clients accept and ``tidstorage dump`` always works. A site has a few
#: to a few hundred storages (one per mounted database); more than this is a
#: peer inventing ids, and the bound keeps every command and every ``DUMP``
#: reply (some 0.5 MB with legacy ids of ~100 bytes) small.
MAX_STORAGES = 4096
#: Most bytes buffered for one incomplete command (fields received but not
#: yet a whole command). A command of MAX_STORAGES ids of 64 bytes fits easily.
MAX_PENDING_BYTES = 1024 * 1024
#: Receive size of the clients' sockets (the CLI's client and the
#: reporter; replies are a few bytes, a DUMP reply up to MAX_STORAGES ids).
RECV_BYTES = 64 * 1024
#: Integers (counts, TIDs) are ASCII decimal digits, at most this many
#: (MAX_TID has 20); no sign, space, ``_`` or other digits (``int()`` takes
#: them all).
MAX_DIGITS = 20

# -- events ---------------------------------------------------------------
# Decoded commands are plain tuples (cheap: the decoder handles ~10^6 a
# second). The first item says which:
BEGIN = "BEGIN"  # (BEGIN, txn: str, storages: list[str], bounds: dict[str, int] | None)
COMMIT = "COMMIT"  # (COMMIT, txn: str, tids: dict[str, int])
ABORT = "ABORT"  # (ABORT, txn: str)
DUMP = "DUMP"  # (DUMP,)
BOOTSTRAPED = "BOOTSTRAPED"  # (BOOTSTRAPED,)
QUIT = "QUIT"  # (QUIT,)
SYNC = "SYNC"  # (SYNC,)
AUTH = "AUTH"  # (AUTH, token: str)
LOST = "LOST"  # (LOST, storages: list[str])
INDOUBT = "INDOUBT"  # (INDOUBT, txn: str)
HELLO = "HELLO"  # (HELLO, session: str, secret: str, pid: int, host: str)
ADMIN = "ADMIN"  # (ADMIN, request: str): a JSON object
ERROR = "ERROR"  # (ERROR, message: str): malformed input; close the connection

_SIMPLE = {
    "DUMP": (DUMP,),
    "BOOTSTRAPED": (BOOTSTRAPED,),
    "QUIT": (QUIT,),
    "SYNC": (SYNC,),
}
#: Commands of one text field: name -> (event kind, what the field is).
_ONE_FIELD = {
    "ABORT": (ABORT, "transaction id"),
    "AUTH": (AUTH, "auth token"),
    "INDOUBT": (INDOUBT, "transaction id"),
    "ADMIN": (ADMIN, "admin request"),
}


class _Incomplete(Exception):
    """The buffered fields end in the middle of a command."""


def _text(field: str, what: str) -> str:
    if len(field) > MAX_FIELD_BYTES:
        raise ProtocolError(f"{what} is {len(field)} characters long (limit {MAX_FIELD_BYTES})")
    return field


def _texts(fields: list[str], what: str) -> list[str]:
    if fields and max(map(len, fields)) > MAX_FIELD_BYTES:
        raise ProtocolError(f"a {what} is over {MAX_FIELD_BYTES} characters long")
    return fields


def _decimal(field: str | bytes, what: str) -> int:
    if not (field.isascii() and field.isdigit()) or len(field) > MAX_DIGITS:
        raise ProtocolError(
            f"{what} is not an integer of at most {MAX_DIGITS} ASCII digits: {field[:40]!r}")
    return int(field)


def _count(field: str | bytes, what: str) -> int:
    value = _decimal(field, f"{what} count")
    if value > MAX_STORAGES:
        raise ProtocolError(f"{what} count {value} is out of range 0..{MAX_STORAGES}")
    return value


def _tid(field: str | bytes, key: str) -> int:
    value = _decimal(field, f"TID of storage {key!r}")
    if value > MAX_TID:
        raise ProtocolError(f"TID of storage {key!r} is out of range: {value}")
    return value


def _tids(keys: list[str], values: list[str]) -> dict[str, int]:
    """Keys and values of a dict -> {key: TID} (later duplicates win)."""
    digits = "".join(values)
    if (digits.isascii() and digits.isdigit() and all(values)
            and max(map(len, values)) <= MAX_DIGITS):  # the usual case, fast
        tids = dict(zip(keys, map(int, values)))
        for key, value in tids.items():
            if value > MAX_TID:
                raise ProtocolError(f"TID of storage {key!r} is out of range: {value}")
        return tids
    return {k: _tid(v, k) for k, v in zip(keys, values)}


def _utf8_error(data: bytes, exc: UnicodeDecodeError) -> ProtocolError:
    start = data.rfind(b"\n", 0, exc.start) + 1
    end = data.find(b"\n", exc.start)
    field = data[start : end if end >= 0 else len(data)]
    return ProtocolError(f"a field is not UTF-8: {field[:40]!r}")


class Decoder:
    """Turn received bytes into command events.

    ``feed(data)`` returns the commands completed by ``data``. After an
    :data:`ERROR` event the decoder is broken and returns nothing more.
    Complete lines are decoded from UTF-8 in one call per read (a partial
    last line stays bytes, so a character split across reads is fine).
    """

    def __init__(self) -> None:
        self._fields: list[str] = []  # complete fields of an incomplete command
        self._partial = b""  # bytes of a field not yet ended by \n
        self._broken = False

    def feed(self, data: bytes) -> list[tuple]:
        if self._broken:
            return []
        if b"\r" in data:
            data = data.replace(b"\r", b"")
        if self._partial:
            data = self._partial + data
        cut = data.rfind(b"\n")
        events: list[tuple] = []
        try:
            if cut < 0:
                self._partial = data
                if len(data) > MAX_FIELD_BYTES:
                    raise ProtocolError(
                        f"a field is over {MAX_FIELD_BYTES} bytes long with no end of line"
                    )
                return events
            self._partial = partial = data[cut + 1 :]
            if len(partial) > MAX_FIELD_BYTES:
                raise ProtocolError(
                    f"a field is over {MAX_FIELD_BYTES} bytes long with no end of line"
                )
            complete = data[:cut]
            try:
                parts = complete.decode("utf-8").split("\n")
            except UnicodeDecodeError as exc:
                raise _utf8_error(complete, exc) from None
            if self._fields:
                parts = self._fields + parts
            used = self._parse(parts, events)
        except ProtocolError as exc:
            self._broken = True
            self._fields = []
            self._partial = b""
            events.append((ERROR, str(exc)))
            return events
        self._fields = rest = parts[used:]
        if rest and sum(map(len, rest)) + len(rest) + len(partial) > MAX_PENDING_BYTES:
            self._broken = True
            events.append((ERROR, f"an incomplete command is over {MAX_PENDING_BYTES} bytes"))
        return events

    @property
    def pending(self) -> bool:
        """True when bytes of an incomplete command are buffered."""
        return bool(self._fields or self._partial)

    @staticmethod
    def _parse(fields: list[str], events: list[tuple]) -> int:
        """Decode whole commands from ``fields``; return how many fields they used."""
        n = len(fields)
        i = 0
        append = events.append
        while i < n:
            start = i
            name = fields[i].upper()
            try:
                if name == "BEGIN":
                    if i + 2 >= n:
                        raise _Incomplete
                    txn = _text(fields[i + 1], "transaction id")
                    count = _count(fields[i + 2], "storage list")
                    i += 3
                    if i + count > n:
                        raise _Incomplete
                    storages = _texts(fields[i : i + count], "storage id")
                    i += count
                    append((BEGIN, txn, storages, None))
                elif name == "COMMIT" or name == "BEGIN2":
                    if i + 2 >= n:
                        raise _Incomplete
                    txn = _text(fields[i + 1], "transaction id")
                    count = _count(fields[i + 2], "TID dict")
                    i += 3
                    if i + 2 * count > n:
                        raise _Incomplete
                    keys = _texts(fields[i : i + count], "storage id")
                    tids = _tids(keys, fields[i + count : i + 2 * count])
                    if len(tids) != count:
                        raise ProtocolError(f"{name} {txn!r} names a storage twice")
                    i += 2 * count
                    if name == "COMMIT":
                        append((COMMIT, txn, tids))
                    else:
                        append((BEGIN, txn, keys, tids))
                elif name in _ONE_FIELD:  # ABORT, AUTH, INDOUBT, ADMIN
                    if i + 1 >= n:
                        raise _Incomplete
                    kind, what = _ONE_FIELD[name]
                    append((kind, _text(fields[i + 1], what)))
                    i += 2
                elif name in _SIMPLE:
                    append(_SIMPLE[name])
                    i += 1
                elif name == "HELLO":
                    if i + 4 >= n:
                        raise _Incomplete
                    session = _text(fields[i + 1], "session id")
                    secret = _text(fields[i + 2], "session secret")
                    pid = fields[i + 3]
                    if not (pid.isascii() and pid.isdigit()) or len(pid) > 10:
                        raise ProtocolError(f"HELLO pid is not a number: {pid[:40]!r}")
                    append((HELLO, session, secret, int(pid), _text(fields[i + 4], "host name")))
                    i += 5
                elif name == "LOST":
                    if i + 1 >= n:
                        raise _Incomplete
                    count = _count(fields[i + 1], "storage list")
                    if i + 2 + count > n:
                        raise _Incomplete
                    append((LOST, _texts(fields[i + 2 : i + 2 + count], "storage id")))
                    i += 2 + count
                else:
                    raise ProtocolError(f"unknown command {fields[i][:40]!r}")
            except _Incomplete:
                return start
        return i


# -- encoding (clients and replies) ------------------------------------------


def _field(value: str) -> bytes:
    data = value.encode("utf-8")
    if b"\n" in data or b"\r" in data:
        raise ValueError(f"a field cannot contain a line break: {value!r}")
    if len(data) > MAX_FIELD_BYTES:
        raise ValueError(f"a field is limited to {MAX_FIELD_BYTES} bytes: {value[:40]!r}...")
    return data


def encode_int(value: int) -> bytes:
    return b"%d\n" % value


def encode_list(values: Iterable[str]) -> bytes:
    items = [_field(v) for v in values]
    return b"\n".join([b"%d" % len(items), *items, b""])


def encode_dict(tids: Mapping[str, int]) -> bytes:
    keys = [_field(k) for k in tids]
    return b"\n".join([b"%d" % len(keys), *keys, *(b"%d" % v for v in tids.values()), b""])


def encode_begin(
    txn: str, storages: Iterable[str], bounds: Mapping[str, int] | None = None
) -> bytes:
    """``BEGIN`` (legacy), or ``BEGIN2`` with ``bounds`` (its keys are the storages)."""
    if bounds is not None:
        return b"BEGIN2\n" + _field(txn) + b"\n" + encode_dict(bounds)
    return b"BEGIN\n" + _field(txn) + b"\n" + encode_list(storages)


def encode_commit(txn: str, tids: Mapping[str, int]) -> bytes:
    return b"COMMIT\n" + _field(txn) + b"\n" + encode_dict(tids)


def encode_abort(txn: str) -> bytes:
    return b"ABORT\n" + _field(txn) + b"\n"


def encode_auth(token: str) -> bytes:
    return b"AUTH\n" + _field(token) + b"\n"


def encode_lost(storages: Iterable[str]) -> bytes:
    return b"LOST\n" + encode_list(storages)


def encode_in_doubt(txn: str) -> bytes:
    return b"INDOUBT\n" + _field(txn) + b"\n"


def encode_hello(session: str, secret: str, pid: int, host: str) -> bytes:
    return b"HELLO\n" + b"\n".join(
        [_field(session), _field(secret), b"%d" % pid, _field(host or "?"), b""])


def encode_field(value: str) -> bytes:
    """One reply field (the HELLO reply)."""
    return _field(value) + b"\n"


#: Largest answer to an ADMIN request (a status of MAX_STORAGES storages
#: with legacy ids fits), and the size of the fields it is sent in.
MAX_ADMIN_REPLY_BYTES = 4 * 1024 * 1024
ADMIN_CHUNK = 8 * 1024


def encode_admin(request: Mapping) -> bytes:
    import json

    return b"ADMIN\n" + _field(json.dumps(request, separators=(",", ":"), sort_keys=True)) + b"\n"


def encode_admin_reply(answer: Mapping) -> bytes:
    """The JSON answer as a list of fields (JSON text has no line break)."""
    import json

    text = json.dumps(answer, separators=(",", ":"), sort_keys=True)
    if len(text) > MAX_ADMIN_REPLY_BYTES:
        text = json.dumps({"ok": False, "error": f"answer over {MAX_ADMIN_REPLY_BYTES} bytes"})
    chunks = [text[i:i + ADMIN_CHUNK] for i in range(0, len(text), ADMIN_CHUNK)] or [""]
    return encode_list(chunks)


DUMP_REQUEST = b"DUMP\n"
BOOTSTRAPED_REQUEST = b"BOOTSTRAPED\n"
SYNC_REQUEST = b"SYNC\n"
QUIT_REQUEST = b"QUIT\n"


class ReplyReader:
    """Client side: pull replies (ints and dicts) out of received bytes."""

    def __init__(self) -> None:
        self._fields: list[bytes] = []
        self._partial = b""

    def feed(self, data: bytes) -> None:
        data = self._partial + data.replace(b"\r", b"")
        parts = data.split(b"\n")
        self._partial = parts.pop()
        if len(self._partial) > MAX_FIELD_BYTES:
            raise ProtocolError("reply field too long")
        self._fields.extend(parts)

    def read_int(self) -> int | None:
        """The next integer reply, or None if not received yet."""
        if not self._fields:
            return None
        return _decimal(self._fields.pop(0), "an integer reply")

    def read_field(self) -> str | None:
        """The next reply field as text (the HELLO reply), or None."""
        if not self._fields:
            return None
        return _text(self._fields.pop(0).decode("utf-8", "replace"), "reply field")

    def read_admin(self) -> dict | None:
        """The next ADMIN answer (a list of JSON pieces), or None if not
        wholly received yet."""
        import json

        fields = self._fields
        if not fields:
            return None
        count = _count(fields[0], "admin reply")
        if count * ADMIN_CHUNK > MAX_ADMIN_REPLY_BYTES + ADMIN_CHUNK:
            raise ProtocolError(f"admin reply of {count} fields is over the limit")
        if len(fields) < 1 + count:
            return None
        text = b"".join(fields[1:1 + count]).decode("utf-8", "replace")
        del fields[: 1 + count]
        try:
            answer = json.loads(text)
        except ValueError as exc:
            raise ProtocolError(f"admin reply is not JSON: {exc}") from None
        if not isinstance(answer, dict):
            raise ProtocolError("admin reply is not a JSON object")
        return answer

    def read_dict(self) -> dict[str, int] | None:
        """The next dict reply, or None if not wholly received yet."""
        fields = self._fields
        if not fields:
            return None
        count = _count(fields[0], "reply dict")
        if len(fields) < 1 + 2 * count:
            return None
        keys = [_text(f.decode("utf-8", "replace"), "storage id") for f in fields[1 : 1 + count]]
        values = [_tid(v, k) for k, v in zip(keys, fields[1 + count : 1 + 2 * count])]
        del fields[: 1 + 2 * count]
        return dict(zip(keys, values))
