"""ZEO's own client test suites, run over a wrapped ClientStorage.

ZEO's ``GenericTestBase`` builds ``self._storage``, and every other client a
test opens (``_new_storage_client``: the race tests' databases, the
invalidation tests' second client), through its ``_wrap_client`` hook, the
hook ZEO uses for its own client-side wrapper (``FileStorageClientHexTests``).
The ``Wrapped*`` classes wrap there with :func:`tidstorage.wrap`; the
``Bare*`` classes run the same tests over the bare ClientStorage as the
baseline: the wrapper must add no failure. As in ``test_conformance.py`` the
reporter is real and its daemon is down (nothing listens on its port):
commits never wait for it, and the wrapper must behave exactly as its base.

What runs (each test starts its own ZEO server, a process from ZEO's forker
listening on a port the kernel chose):

* ``FileStorageTests`` (ZEO's ``FullGenericTests`` over a FileStorage:
  ZODB's basic, packable, synchronization, MT, read-only, revision, undo,
  iterator and conflict-resolution suites, ZEO's commit-lock, thread,
  cache, iteration and misc tests) and ``FileStorageRecoveryTests``
  (``restore``/``tpc_begin`` with an explicit tid: the wrapper's
  pass-through path);
* of ``BlobAdaptedFileStorageTests``, the blob tests (store, load, the
  temporary directory, buffer cleanup): its generic tests are those of
  ``FileStorageTests`` again, over a blob storage.

Left out by default for time (about 20 s each on 2 cores), run with
``TIDSTORAGE_ZEO_FULL=1``: ``race_external_invalidate_vs_disconnect`` (ZODB's
race test reopening databases in a loop), the generic tests of
``BlobAdaptedFileStorageTests``, and ``MappingStorageTests`` (the generic
tests over a server-side MappingStorage: nothing client-side differs).
Not run at all: ZEO's ``ConnectionTests``/``InvalidationTests`` (server
restarts, read-only fallback, client reconnection: ClientStorage internals
the wrapper delegates whole, and minutes of runtime), the SSL, hex and
load-delayed variants (server-side configuration), the doctests and the
storage-server tests (server internals).
"""

from __future__ import annotations

import os
import unittest

from ZEO.ClientStorage import ClientStorage
from ZEO.tests import testZEO

from tidstorage.demo.cluster import free_port
from tidstorage.zodb.storage import TIDStorage, wrap

_PORT = free_port()  # nothing listens there: the daemon is down
FULL = os.environ.get("TIDSTORAGE_ZEO_FULL") == "1"
_SLOW = {"test_race_external_invalidate_vs_disconnect"}
_BLOB_TESTS = {
    "test_StoreBlob", "test_StoreBlob_wrong_partition", "test_LoadBlob",
    "test_TemporaryDirectory", "test_TransactionBufferCleanup", "test_StoreAndLoadBlob",
    "test_Wrapped",
}
_SKIP_REASON = "left out for time (see the module docstring); TIDSTORAGE_ZEO_FULL=1 runs it"


def _wrap(client):
    return wrap(client, "1", server=f"127.0.0.1:{_PORT}", timeout=0.05)


class _Wrapped:
    """Mixin: every client a ZEO test opens is a wrapped ClientStorage."""

    def _wrap_client(self, client):
        return _wrap(client)

    def open(self, read_only=0):
        # GenericTests.open (the ReadOnlyStorage tests) builds a bare
        # ClientStorage, bypassing _wrap_client: wrap it too.
        addr = self._storage._addr
        self._storage.close()
        self._storage = self._wrap_client(
            ClientStorage(addr, read_only=read_only, wait=1, **self._client_options()))

    def checkWrapped(self):
        """The suites really run over the wrapper."""
        self.assertIsInstance(self._storage, TIDStorage)
        self.assertIsInstance(self._storage.base, ClientStorage)
        other = self._new_storage_client()
        try:
            self.assertIsInstance(other, TIDStorage)
        finally:
            other.close()
        self.open(read_only=1)
        self.assertIsInstance(self._storage, TIDStorage)
        self.assertTrue(self._storage.isReadOnly())


def _collect(keep=None):
    """Expose every ``check*`` as ``test_*`` (pytest collects ``test*``).
    Without ``TIDSTORAGE_ZEO_FULL``: skip the slow tests and, with ``keep``,
    collect only those (the others run in another class)."""

    def decorate(cls):
        for name in dir(cls):
            if name.startswith("check"):
                setattr(cls, "test_" + name[len("check"):], getattr(cls, name))
        if not FULL:
            for name in dir(cls):
                if not name.startswith("test"):
                    continue
                if keep is not None and name not in keep:
                    setattr(cls, name, None)  # not callable: not collected
                elif name in _SLOW:
                    setattr(cls, name, unittest.skip(_SKIP_REASON)(getattr(cls, name)))
        return cls

    return decorate


@_collect()
class BareFileStorageTests(testZEO.FileStorageTests):
    pass


@_collect()
class WrappedFileStorageTests(_Wrapped, testZEO.FileStorageTests):
    pass


@_collect(keep=_BLOB_TESTS)
class BareBlobAdaptedFileStorageTests(testZEO.BlobAdaptedFileStorageTests):
    pass


@_collect(keep=_BLOB_TESTS)
class WrappedBlobAdaptedFileStorageTests(_Wrapped, testZEO.BlobAdaptedFileStorageTests):
    pass


@_collect()
class BareFileStorageRecoveryTests(testZEO.FileStorageRecoveryTests):
    pass


@_collect()
class WrappedFileStorageRecoveryTests(testZEO.FileStorageRecoveryTests):
    def _new_storage(self):
        return _wrap(super()._new_storage())

    def checkWrapped(self):
        self.assertIsInstance(self._storage, TIDStorage)
        self.assertIsInstance(self._dst, TIDStorage)


if FULL:
    @_collect()
    class BareMappingStorageTests(testZEO.MappingStorageTests):
        pass

    @_collect()
    class WrappedMappingStorageTests(_Wrapped, testZEO.MappingStorageTests):
        pass
