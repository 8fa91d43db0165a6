"""tidstorage: coherent point-in-time backups and crash repair for a set of
ZODB storages whose transactions span several of them."""

__version__ = "0.1.0"
