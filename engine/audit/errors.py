"""The audit log's errors: who caused the failure (the key, the log on disk, the disk)."""

from __future__ import annotations

from ..errors import DccSignError, KeystoreError

__all__ = ["AuditError", "AuditKeyError", "AuditLogError", "AuditUnavailable"]


class AuditError(DccSignError):
    """Base class of the audit log's errors."""


class AuditKeyError(AuditError, KeystoreError):
    """The audit key (or a public key given to verify) cannot be used. The message names the
    file. Also a :exc:`KeystoreError`, so the CLI reports it as a key problem (exit 4)."""


class AuditLogError(AuditError):
    """The log on disk is broken or cannot be used (another process holds it, a segment is
    missing or altered). The message names the file, segment and sequence number."""


class AuditUnavailable(AuditError):
    """The log cannot be written durably (``ENOSPC``, ``EIO``, a read-only file system, ...).

    keyd must stop signing. The log refuses every further append until it is reopened.
    """
