"""The rules: sans-io, no I/O (tracker, gate, coordinator, session, codec, stamps, TIDs)."""
