"""One transaction written straight through a ZEO ClientStorage, outside
tidstorage's wrapper: a stamped part on one storage only (a real split, as a
writer killed between its finishes leaves), or an undo (a heal by hand)."""

from __future__ import annotations

import base64
import io
import pickle

from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64, u64


def mapping_pickle() -> bytes:
    """The record of an empty PersistentMapping."""
    f = io.BytesIO()
    p = pickle.Pickler(f, 3)
    p.dump((PersistentMapping, None))
    p.dump({"data": {}})
    return f.getvalue()


def raw_commit(address, storage: str, stamp: dict | None = None,
               undo: int | None = None) -> int:
    """Commit one new object (or the undo of the transaction ``undo``) with
    ``extension["tidstorage"] = stamp``; return its TID."""
    cs = ClientStorage(address, storage=storage, wait_timeout=10)
    try:
        txn = TransactionMetaData(extension={"tidstorage": stamp} if stamp else {})
        cs.tpc_begin(txn)
        if undo is not None:  # FileStorage's undo ids are base64 TIDs
            cs.undo(base64.encodebytes(p64(undo)).rstrip(b"\n"), txn)
        else:
            cs.store(cs.new_oid(), b"\0" * 8, mapping_pickle(), "", txn)
        cs.tpc_vote(txn)
        return u64(cs.tpc_finish(txn))
    finally:
        cs.close()
