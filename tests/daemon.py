"""A real ``tidstorage serve`` subprocess for tests: see ``tidstorage.processes``."""

from tidstorage.processes import DaemonProcess  # noqa: F401
