"""tidstorage: coherent backups and crash repair for a set of ZODB storages.

The public Python API is small::

    import tidstorage
    db = ZODB.DB(tidstorage.wrap(storage, "main", server="127.0.0.1:9001"))

* :func:`wrap` and :class:`TIDStorage`: the storage wrapper (``zodb/``);
  in ZConfig, ``%import tidstorage`` and a ``<tidstorage>`` section;
* :class:`TidstorageError`: the root of the errors tidstorage raises for
  something a user or operator can act on (``errors.py``; ``wrap`` raises
  ``ValueError``/``TypeError`` for bad arguments, as Python does, and never
  fails a commit);
* ``__version__``.

The command line is ``tidstorage`` (``cli/``). Where the rest lives:
``core/`` the rules (sans-io), ``formats/`` the file formats, ``daemon/``
the coherency daemon, ``tools/`` backup/restore/repair/verify/cleanup,
``demo/`` the demo and its local cluster.
"""

from __future__ import annotations

from importlib import metadata as _metadata

__all__ = ["TIDStorage", "TidstorageError", "__version__", "wrap"]

try:
    __version__ = _metadata.version("tidstorage")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a tree
    __version__ = "0+unknown"


def __getattr__(name: str):
    # Lazy: ``import tidstorage`` (the CLI, ZConfig's %import) stays cheap.
    if name in ("wrap", "TIDStorage"):
        from .zodb import storage

        return getattr(storage, name)
    if name == "TidstorageError":
        from .errors import TidstorageError

        return TidstorageError
    raise AttributeError(f"module 'tidstorage' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
