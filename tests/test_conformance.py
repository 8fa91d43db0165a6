"""ZODB's own storage conformance suites, run over the wrapper.

As zc.zlibstorage's tests do: the suites of ``ZODB.tests`` (BasicStorage,
TransactionalUndoStorage, RevisionStorage, PackableStorage, Synchronization,
ConflictResolution, HistoryStorage, IteratorStorage, PersistentStorage,
MTStorage, ReadOnlyStorage) over a FileStorage wrapped by ``TIDStorage``,
and the same suites over the bare FileStorage: the wrapper must add no
failure. The reporter is real; its daemon is not running (commits never
wait for it: the wrapper must then behave exactly as its base).
"""

from __future__ import annotations

import unittest

import ZODB.FileStorage
from ZODB.tests import (
    BasicStorage,
    ConflictResolution,
    HistoryStorage,
    IteratorStorage,
    MTStorage,
    PackableStorage,
    PersistentStorage,
    ReadOnlyStorage,
    RevisionStorage,
    StorageTestBase,
    Synchronization,
    TransactionalUndoStorage,
)

from tidstorage.demo.cluster import free_port
from tidstorage.zodb.storage import TIDStorage, wrap

_PORT = free_port()  # nothing listens there: the daemon is down


class _Suites(
    StorageTestBase.StorageTestBase,
    BasicStorage.BasicStorage,
    TransactionalUndoStorage.TransactionalUndoStorage,
    RevisionStorage.RevisionStorage,
    PackableStorage.PackableStorageWithOptionalGC,
    PackableStorage.PackableUndoStorage,
    Synchronization.SynchronizedStorage,
    ConflictResolution.ConflictResolvingStorage,
    ConflictResolution.ConflictResolvingTransUndoStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.IteratorStorage,
    IteratorStorage.ExtendedIteratorStorage,
    PersistentStorage.PersistentStorage,
    MTStorage.MTStorage,
    ReadOnlyStorage.ReadOnlyStorage,
):
    use_extension_bytes = True
    __test__ = False  # only the concrete classes below are collected

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self.open(create=1)

    def checkDoubleTpcBegin(self):
        """The wrapper defers its base's tpc_begin; it must still refuse a
        second tpc_begin of the same transaction at once."""
        from ZODB.Connection import TransactionMetaData
        from ZODB.POSException import StorageTransactionError

        txn = TransactionMetaData()
        self._storage.tpc_begin(txn)
        self.assertRaises(StorageTransactionError, self._storage.tpc_begin, txn)
        self._storage.tpc_abort(txn)

    def checkTpcBeginWaitsForTheCommitInProgress(self):
        """IStorage: tpc_begin blocks while another transaction commits. The
        wrapper defers its base's tpc_begin, so it must block by itself
        (regression: ZEO's ``checkSecondBeginFails``)."""
        import linecache
        import sys
        import threading
        import time

        from ZODB.Connection import TransactionMetaData
        from ZODB.tests.MinPO import MinPO
        from ZODB.tests.StorageTestBase import zodb_pickle
        from ZODB.utils import z64

        storage = self._storage
        first = TransactionMetaData()
        storage.tpc_begin(first)
        storage.store(storage.new_oid(), z64, zodb_pickle(MinPO(1)), "", first)
        storage.tpc_vote(first)
        events = []
        second = TransactionMetaData()

        def begin_second():
            storage.tpc_begin(second)
            events.append("second begun")

        def waits_on_a_lock(thread):
            frame = sys._current_frames().get(thread.ident)
            return frame is not None and ".acquire(" in linecache.getline(
                frame.f_code.co_filename, frame.f_lineno)

        thread = threading.Thread(target=begin_second, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60  # a bound, not a measurement
        while not waits_on_a_lock(thread):
            self.assertTrue(thread.is_alive() and not events,
                            "tpc_begin returned while another transaction was committing")
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.001)
        events.append("first finishing")
        storage.tpc_finish(first)
        thread.join(60)
        self.assertEqual(events, ["first finishing", "second begun"])
        storage.tpc_abort(second)


class BareFileStorageTests(_Suites, unittest.TestCase):
    __test__ = True

    def open(self, **kwargs):
        self._storage = ZODB.FileStorage.FileStorage("FileStorageTests.fs", **kwargs)


class WrappedFileStorageTests(_Suites, unittest.TestCase):
    __test__ = True

    def open(self, **kwargs):
        base = ZODB.FileStorage.FileStorage("FileStorageTests.fs", **kwargs)
        self._storage = wrap(base, "main", server=f"127.0.0.1:{_PORT}", timeout=0.05)

    def checkWrapperIsAStorageWrapper(self):
        from ZODB.interfaces import IBlobStorage, IStorage, IStorageWrapper

        storage = self._storage
        self.assertIsInstance(storage, TIDStorage)
        self.assertTrue(IStorageWrapper.providedBy(storage))
        self.assertTrue(IStorage.providedBy(storage))
        self.assertEqual(IBlobStorage.providedBy(storage), IBlobStorage.providedBy(storage.base))


def load_tests(loader, tests, pattern):  # unittest-style discovery of check* methods
    suite = unittest.TestSuite()
    for cls in (BareFileStorageTests, WrappedFileStorageTests):
        suite.addTests(unittest.makeSuite(cls, "check"))
    return suite


def _collect(cls):
    """pytest collects ``test*`` methods: expose every ``check*`` as one."""
    for name in dir(cls):
        if name.startswith("check"):
            setattr(cls, "test_" + name[len("check"):], getattr(cls, name))
    return cls


_collect(BareFileStorageTests)
_collect(WrappedFileStorageTests)
