"""Lines of keyd's issuance audit log, pure-Python reference of the native implementation.

The line format, the hashes and the chain are specified in ``docs/audit-format.md``; these
functions only build ``issue`` lines, for groups of records that share everything except the
signed payload itself (one group is one part of a keyd batch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ._types import ES256, PS256

__all__ = ["MAX_UVCI_CHARS", "audit_issue_groups", "audit_issue_lines", "check_arguments"]

#: Longest UVCI the log accepts (an identifier, not a document).
MAX_UVCI_CHARS = 1024
_HEX = frozenset(b"0123456789abcdef")


def check_arguments(
    heads: Sequence[bytes],
    middles: Sequence[bytes],
    sizes: Sequence[int],
    time: bytes,
    alg: int,
    isses: Sequence[str],
    uvcis: Sequence[str],
    dcc_types: str,
    payloads: Sequence[bytes],
    signatures: Sequence[bytes],
    seq: int,
    prev: str,
    first_index: int = 0,
) -> tuple[
    tuple[bytes, ...],
    tuple[bytes, ...],
    tuple[int, ...],
    tuple[str, ...],
    tuple[bytes, ...],
    tuple[bytes, ...],
    tuple[bytes, ...],
]:
    """The argument checks of :func:`audit_issue_groups`, shared by both implementations (the
    native one imports this): its Raises section is raised here.

    Returns:
        The heads, middles and sizes, the isses, the UVCIs encoded as UTF-8, the payloads and
        the signatures, as tuples.
    """
    heads, middles, sizes = tuple(heads), tuple(middles), tuple(sizes)
    isses, uvcis = tuple(isses), tuple(uvcis)
    payloads, signatures = tuple(payloads), tuple(signatures)
    _check_shared_fields(heads, middles, sizes, time, alg, dcc_types)
    _check_counts(sizes, isses, uvcis, dcc_types, payloads, signatures)
    _check_chain(seq, prev)
    raws = _checked_records(isses, uvcis, dcc_types, payloads, signatures, alg, first_index)
    return heads, middles, sizes, isses, raws, payloads, signatures


def _check_shared_fields(
    heads: tuple[bytes, ...],
    middles: tuple[bytes, ...],
    sizes: tuple[int, ...],
    time: bytes,
    alg: int,
    dcc_types: str,
) -> None:
    """The rules on what a group's records share: the type column, the groups' heads and
    middles, the time and the alg."""
    if type(dcc_types) is not str:
        raise TypeError("dcc_types must be a str")
    if not len(heads) == len(middles) == len(sizes):
        raise ValueError("heads, middles and sizes differ in length")
    for name, values in (("head", heads), ("middle", middles), ("time", (time,))):
        for value in values:
            if type(value) is not bytes:
                raise TypeError(f"{name} must be bytes")
    if not time.isascii():
        raise ValueError("time must be ASCII")
    if alg not in (ES256, PS256):
        raise ValueError("alg must be -7 (ES256) or -37 (PS256)")


def _check_counts(
    sizes: tuple[int, ...],
    isses: tuple[str, ...],
    uvcis: tuple[str, ...],
    dcc_types: str,
    payloads: tuple[bytes, ...],
    signatures: tuple[bytes, ...],
) -> None:
    """One entry per record in every column, and group sizes that add up to the records."""
    n = len(payloads)
    if any(c != n for c in (len(isses), len(uvcis), len(dcc_types), len(signatures))):
        raise ValueError("isses, uvcis, dcc_types, payloads and signatures differ in length")
    if any(type(size) is not int or size < 0 for size in sizes) or sum(sizes) != n:
        raise ValueError("sizes must be non-negative integers that add up to the record count")


def _check_chain(seq: int, prev: str) -> None:
    """The first record's sequence number and the hash it chains to."""
    if type(seq) is not int or not 0 <= seq < 2**63:
        raise ValueError("seq must be a non-negative 64-bit integer")
    if type(prev) is not str or len(prev) != 64 or not _HEX.issuperset(prev.encode()):
        raise ValueError("prev must be 64 lower-case hex digits")


def _checked_records(
    isses: tuple[str, ...],
    uvcis: tuple[str, ...],
    dcc_types: str,
    payloads: tuple[bytes, ...],
    signatures: tuple[bytes, ...],
    alg: int,
    first_index: int,
) -> tuple[bytes, ...]:
    """The rules on each record, named ``record <first_index + i>`` in the messages; returns
    the UVCIs as UTF-8. One loop, no call per record: this runs on every audited batch."""
    raws: list[bytes] = []
    for i in range(len(payloads)):
        index = first_index + i
        iss, uvci, payload, signature = isses[i], uvcis[i], payloads[i], signatures[i]
        if type(payload) is not bytes:
            raise TypeError(f"payload {index} must be bytes, not {type(payload).__name__}")
        if type(signature) is not bytes:
            raise TypeError(f"signature {index} must be bytes, not {type(signature).__name__}")
        # isascii + isalpha + isupper: exactly A-Z (a generator over the characters costs
        # several times more, per record, on keyd's audit path)
        if (
            type(iss) is not str
            or len(iss) != 2
            or not (iss.isascii() and iss.isalpha() and iss.isupper())
        ):
            raise ValueError(f"record {index}: iss must be two ASCII capitals")
        if dcc_types[i] not in ("v", "t", "r"):
            raise ValueError(f"record {index}: dcc_type must be 'v', 't' or 'r'")
        if type(uvci) is not str or not uvci or len(uvci) > MAX_UVCI_CHARS:
            raise ValueError(f"record {index}: uvci must be a non-empty string")
        try:
            raws.append(uvci.encode())
        except UnicodeEncodeError:
            raise ValueError(f"record {index}: uvci is not valid Unicode text") from None
        if alg == ES256 and len(signature) != 64:
            raise ValueError(f"record {index}: an ES256 signature is 64 bytes (r||s)")
    return tuple(raws)


def audit_issue_lines(
    head: bytes,
    middle: bytes,
    time: bytes,
    alg: int,
    isses: Sequence[str],
    uvcis: Sequence[str],
    dcc_types: str,
    payloads: Sequence[bytes],
    signatures: Sequence[bytes],
    seq: int,
    prev: str,
    first_index: int = 0,
) -> tuple[list[bytes], str]:
    """Build the ``issue`` lines of N records that share kid, alg, client, account and operator.

    *head* is ``{"account":A,"alg":N,"client":C,"iss":`` and *middle* is
    ``,"kid":"K","operator":O,"payload_sha256":"`` (JSON literals already escaped); *time* is
    the commit time as the log writes it. Record i gets sequence number ``seq + i`` and
    chains to the line before it, the first to *prev*.

    Returns:
        The lines (no newline) and the SHA-256 hex of the last one (the next entry's prev).

    Raises:
        ValueError: lengths differ, a bad alg, seq or prev, or a bad record, named as
            ``record <first_index + i>``: iss not two ASCII capitals, dcc_type not v/t/r, uvci
            not a non-empty string of at most 1024 characters of valid Unicode, an ES256
            signature not 64 bytes.
        TypeError: head, middle or time not bytes; a payload or signature not bytes.
    """
    payloads = tuple(payloads)
    return audit_issue_groups(
        (head,),
        (middle,),
        (len(payloads),),
        time,
        alg,
        isses,
        uvcis,
        dcc_types,
        payloads,
        signatures,
        seq,
        prev,
        first_index,
    )


def audit_issue_groups(
    heads: Sequence[bytes],
    middles: Sequence[bytes],
    sizes: Sequence[int],
    time: bytes,
    alg: int,
    isses: Sequence[str],
    uvcis: Sequence[str],
    dcc_types: str,
    payloads: Sequence[bytes],
    signatures: Sequence[bytes],
    seq: int,
    prev: str,
    first_index: int = 0,
) -> tuple[list[bytes], str]:
    """:func:`audit_issue_lines` for several groups of records in one call (keyd's
    micro-batch: one group per part, each with its own client, account and operator).

    Group g is the next ``sizes[g]`` records, with ``heads[g]`` and ``middles[g]``; the
    records' columns run over all groups, and so do their sequence numbers and the chain.
    The result equals concatenating :func:`audit_issue_lines` group after group.

    Raises:
        ValueError: as :func:`audit_issue_lines`; also heads, middles and sizes of different
            lengths, or sizes that are not non-negative integers adding up to the record count.
        TypeError: as :func:`audit_issue_lines`, for any head or middle.
    """
    heads, middles, sizes, isses, raws, payloads, signatures = check_arguments(
        heads,
        middles,
        sizes,
        time,
        alg,
        isses,
        uvcis,
        dcc_types,
        payloads,
        signatures,
        seq,
        prev,
        first_index,
    )
    sha256 = hashlib.sha256
    when = time.decode("ascii")
    lines: list[bytes] = []
    start = 0
    for head, middle, size in zip(heads, middles, sizes, strict=True):
        for i in range(start, start + size):
            iss, raw, payload, signature = isses[i], raws[i], payloads[i], signatures[i]
            # the EU SIGNATURE revocation hash covers r only for ES256
            signed = signature[:32] if alg == ES256 else signature
            uvci_hash = sha256(raw).hexdigest()
            line = b"".join(
                (
                    head,
                    f'"{iss}"'.encode(),
                    middle,
                    (
                        f'{sha256(payload).hexdigest()}","prev":"{prev}","rev":{{'
                        f'"COUNTRYCODEUCI":"{sha256(iss.encode() + raw).hexdigest()[:32]}",'
                        f'"SIGNATURE":"{sha256(signed).hexdigest()[:32]}",'
                        f'"UCI":"{uvci_hash[:32]}"}},"seq":{seq + i},"t":"issue",'
                        f'"time":"{when}","type":"{dcc_types[i]}","uvci_hash":"{uvci_hash}"}}'
                    ).encode(),
                )
            )
            prev = sha256(line).hexdigest()
            lines.append(line)
        start += size
    return lines, prev
