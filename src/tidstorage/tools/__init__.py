"""The operator tools: backup, restore, repair, verify, cleanup."""
