"""The ZODB integration: the storage wrapper, the reporter, ZConfig."""
