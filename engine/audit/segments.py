"""Segment files on disk: their names, listing them, reading them (plain or ``.zst``), and
compressing a closed segment in the steps docs/audit-format.md ("Writing") gives."""

from __future__ import annotations

import os
import re
from pathlib import Path

import zstandard

from .durable import create_file, fsync_dir
from .errors import AuditError

__all__ = [
    "FLUSH_STEP",
    "SHRINK_STEP",
    "Raced",
    "compress",
    "decompress",
    "discard",
    "list_segments",
    "read_segment",
    "segment_name",
]

_SEGMENT_RE = re.compile(r"segment-(\d{6,})\.log(\.zst)?")
#: zstd level of closed segments. On keyd's segments level 1 is both smaller and faster than
#: 3 (measured on a full segment: bench/README.md); the compression thread's CPU comes out of
#: the cores that sign.
_ZSTD_LEVEL = 1
#: Bytes written between flushes when a closed segment's ``.zst`` is created
#: (docs/audit-format.md, "Writing": the commits' fsyncs wait for at most one step's writeback).
FLUSH_STEP = 1 << 20
#: Bytes a discarded plain segment is shrunk by per step before it is unlinked.
SHRINK_STEP = 8 << 20


def segment_name(number: int, compressed: bool = False) -> str:
    """The file name of segment *number* (``segment-000001.log``, ``.log.zst`` compressed)."""
    return f"segment-{number:06d}.log" + (".zst" if compressed else "")


def list_segments(root: Path) -> list[tuple[int, Path | None, Path | None]]:
    """``[(number, plain path or None, compressed path or None)]`` in number order."""
    found: dict[int, list[Path | None]] = {}
    for entry in os.scandir(root):
        match = _SEGMENT_RE.fullmatch(entry.name)
        if match:
            slot = found.setdefault(int(match.group(1)), [None, None])
            slot[1 if match.group(2) else 0] = Path(entry.path)
    return [(n, found[n][0], found[n][1]) for n in sorted(found)]


class Raced(AuditError):
    """The log changed under the reader (a live log): read again. The readers (verify,
    search, the writer's reopen) catch it and retry or report."""


def read_segment(root: Path, number: int, plain: Path | None, zst: Path | None) -> bytes:
    """The content of a segment; a plain file that vanishes (compressed meanwhile) is read
    from its .zst.

    Raises:
        ValueError: the .zst is damaged.
        Raced: the segment vanished altogether.
    """
    if zst is None and plain is not None:
        try:
            return plain.read_bytes()
        except FileNotFoundError:
            zst = root / segment_name(number, compressed=True)
    try:
        packed = zst.read_bytes()  # type: ignore[union-attr]
    except FileNotFoundError:
        raise Raced from None
    return decompress(packed)


def decompress(data: bytes) -> bytes:
    """Decompress one complete zstandard frame with nothing after it.

    Raises:
        ValueError: truncated, corrupt (checksum) or followed by other bytes.
    """
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = dobj.decompress(data)
    except zstandard.ZstdError as exc:
        raise ValueError(f"corrupt zstandard data ({exc})") from None
    if not dobj.eof:
        raise ValueError("the zstandard frame is truncated")
    if dobj.unused_data:
        raise ValueError(f"{len(dobj.unused_data)} bytes follow the zstandard frame")
    return out


def compress(plain: Path) -> None:
    """Replace closed segment *plain* by its ``.zst``: ``.zst.tmp`` written and fsynced,
    renamed, directory fsynced, plain copy discarded.

    Raises:
        OSError: a step failed (the plain copy stays: it is still the segment).
        ValueError: the compressed copy does not decompress to the segment.
    """
    data = plain.read_bytes()
    packed = zstandard.ZstdCompressor(
        level=_ZSTD_LEVEL, write_checksum=True, write_content_size=True
    ).compress(data)
    if decompress(packed) != data:
        raise ValueError("the compressed copy does not decompress to the segment")
    target = plain.with_name(plain.name + ".zst")
    temporary = plain.with_name(plain.name + ".zst.tmp")
    temporary.unlink(missing_ok=True)
    create_file(temporary, packed, 0o600, step=FLUSH_STEP)
    os.rename(temporary, target)
    fsync_dir(plain.parent)
    discard(plain)


def discard(plain: Path) -> None:
    """Remove a plain segment whose ``.zst`` is durable: renamed out of the segment names
    first (``.log.del``: from then on the segment is the ``.zst`` alone, whatever happens
    next), then shrunk SHRINK_STEP bytes at a time and unlinked (freeing tens of megabytes
    at once stalls the file system's other fsyncs)."""
    doomed = plain.with_name(plain.name + ".del")
    os.rename(plain, doomed)
    fsync_dir(plain.parent)
    fd = os.open(doomed, os.O_WRONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        while size > 0:
            size = max(0, size - SHRINK_STEP)
            os.ftruncate(fd, size)
            os.fdatasync(fd)
    finally:
        os.close(fd)
    os.unlink(doomed)
    fsync_dir(plain.parent)
