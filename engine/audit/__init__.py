"""The audit log: every signature keyd hands out, in hash-chained, durable segments.

keyd is the only writer (:mod:`.writer`: :class:`~.writer.AuditLog`); security staff read the
log with :mod:`.verify` (the whole-log check) and :mod:`.search` (search, revocations), as
``dccsign audit ...``. They share what an entry is (:mod:`.records`), the chain check
(:mod:`.chain`), the segment files (:mod:`.segments`, over the fsync'd primitives of
:mod:`.durable`), the audit key (:mod:`.key`) and the errors (:mod:`.errors`). Each node
keeps its own log, its id (:mod:`.node`) in every segment header; :mod:`.logs` identifies
several nodes' logs and merges them for the readers. The log holds
no clear personal data: no names, no dates of birth, no UVCI (only hashes of it).

The format (segments, entries and their hash chain, checkpoints), the order of the steps that
make a write durable, and what verify can and cannot detect are specified in
``docs/audit-format.md``; these modules implement that page.
"""
