"""The coherency daemon: asyncio shell, connections, storage readers, ZEO helpers, its client."""
