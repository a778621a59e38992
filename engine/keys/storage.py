"""The keystore's files on disk: atomic writes, and the key-event journal that every key
operation appends to and keyd copies into the audit log.

Its own module so that the keystore (which writes a development keystore and its first event)
and the lifecycle commands (which change keys) share it without importing each other.
"""

from __future__ import annotations

import getpass
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["JOURNAL", "append_journal", "atomic_write", "journal_events"]

#: the key-event journal, one JSON object per line, in the keystore directory
JOURNAL = "key-events.jsonl"


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write *data* to *path* atomically with *mode*, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_journal(
    directory: Path, action: str, name: str, kid: bytes | None, reason: str | None
) -> None:
    """Append one key event to the journal of the keystore in *directory*, fsync'd before
    returning (a command reports success only after its event is durable)."""
    entry = {
        "id": str(uuid.uuid4()),
        "time": time.time(),
        "action": action,
        "key": name,
        "kid": kid.hex() if kid else None,
        "actor": f"os-user:{getpass.getuser()}",
        "reason": reason,
    }
    fd = os.open(directory / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def journal_events(directory: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete journal lines from byte *offset* on, and the offset after the last one."""
    try:
        with open(directory / JOURNAL, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written is left for next time
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, offset + end
