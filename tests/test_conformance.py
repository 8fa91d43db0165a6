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
from tidstorage.demo.cluster import free_port
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
