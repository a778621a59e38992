"""Several logs at once (one per node): which log and node each directory holds
(:func:`open_logs`, which refuses the same log or node twice), and their entries merged in
time order (:func:`merge_by_time`). The readers of one log are :mod:`.search` and
:mod:`.verify`; they answer for several with these."""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from .errors import AuditError, AuditLogError
from .segments import list_segments

__all__ = ["DuplicateLog", "LogSource", "merge_by_time", "open_logs", "read_header"]

#: The longest first line (a segment header) read when identifying a log.
_MAX_HEADER = 64 * 1024


class DuplicateLog(AuditError):
    """Two of the directories given hold the same log, or logs of the same node: a copied
    log would be counted twice."""


@dataclass(frozen=True, slots=True)
class LogSource:
    """One node's log among several.

    Attributes:
        directory: the log directory, as given.
        log_id: the ``log`` id of its first segment's header (None: unreadable).
        node: the node id of its newest segment's header (None: an older log without one,
            or unreadable).
        audit_key: the audit key fingerprint its first header names (None: unreadable).
    """

    directory: Path
    log_id: str | None
    node: str | None
    audit_key: str | None

    @property
    def label(self) -> str:
        """How output names this log: its node id, else its directory."""
        return self.node if self.node is not None else str(self.directory)


def read_header(root: Path, number: int, plain: Path | None, zst: Path | None) -> dict | None:
    """The header entry of segment *number* (its first line), or None when it cannot be
    read or is not a header; reads only the start of the file."""
    try:
        if plain is not None:
            with open(plain, "rb") as stream:
                first = stream.readline(_MAX_HEADER)
        elif zst is not None:
            with open(zst, "rb") as packed:
                reader = zstandard.ZstdDecompressor().stream_reader(packed)
                first = reader.read(_MAX_HEADER).split(b"\n", 1)[0]
        else:
            return None
        entry = json.loads(first)
    except (OSError, ValueError, zstandard.ZstdError):
        return None
    return entry if isinstance(entry, dict) and entry.get("t") == "header" else None


def _identify(directory: Path) -> LogSource:
    """Which log *directory* holds, from its first and newest segment headers.

    Raises:
        AuditLogError: *directory* is not a directory.
    """
    if not directory.is_dir():
        raise AuditLogError(f"{directory}: no such audit log directory")
    segments = list_segments(directory)
    if not segments:
        return LogSource(directory, None, None, None)
    first = read_header(directory, *segments[0]) or {}
    newest = read_header(directory, *segments[-1]) or {}
    log_id, node, key = first.get("log"), newest.get("node"), first.get("audit_key")
    return LogSource(
        directory,
        log_id if isinstance(log_id, str) else None,
        node if isinstance(node, str) else None,
        key if isinstance(key, str) else None,
    )


def open_logs(directories: Sequence[str | os.PathLike[str]]) -> list[LogSource]:
    """Identify the log in each of *directories* (in that order).

    Raises:
        AuditLogError: one is not a directory (the first such is named).
        DuplicateLog: two hold the same log (the same ``log`` id: the same directory twice,
            or a copy) or name the same node id.
    """
    sources = [_identify(Path(d)) for d in directories]
    seen_logs: dict[str, LogSource] = {}
    seen_nodes: dict[str, LogSource] = {}
    for source in sources:
        for key, seen, what in (
            (source.log_id, seen_logs, "the same log"),
            (source.node, seen_nodes, f"logs of the same node {source.node!r}"),
        ):
            if key is None:
                continue
            other = seen.setdefault(key, source)
            if other is not source:
                raise DuplicateLog(
                    f"{other.directory} and {source.directory} hold {what}: one log per node, "
                    "each given once (a copied log would be counted twice)"
                )
    return sources


def merge_by_time(
    sources: Iterable[LogSource],
    entries_of: Callable[[LogSource], Iterable[dict[str, Any]]],
) -> Iterator[tuple[LogSource, dict[str, Any]]]:
    """The entries of every source (``entries_of(source)``, each in its log's order) merged
    by their ``time``, each with its source. Streams: one entry per log is held at a time.
    Entries with the same time keep the order of *sources*; a log whose clock stepped back
    still yields all its entries, in its own order."""
    streams = [_labelled(source, entries_of(source)) for source in sources]
    return heapq.merge(*streams, key=lambda pair: pair[1].get("time", ""))


def _labelled(
    source: LogSource, entries: Iterable[dict[str, Any]]
) -> Iterator[tuple[LogSource, dict[str, Any]]]:
    for entry in entries:
        yield source, entry
