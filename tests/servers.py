"""Real ZEO servers for tests: see ``tidstorage.processes``."""

from tidstorage.processes import (  # noqa: F401
    POLL_INTERVAL,
    ZeoServer,
    ZeoServerError,
    free_port,
    wait_for_port,
)
