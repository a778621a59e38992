"""The audit log: every signature keyd hands out, in hash-chained, durable segments
(:mod:`.log`: writing, verifying, searching)."""
