"""The ``issue`` lines of records given in columns (:class:`IssueLines`, for
:meth:`.writer.AuditLog.append_batches`): the fixed JSON parts of each batch, checked and
cached, and the lines themselves, hashed and chained by the native core."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from json.encoder import encode_basestring  # type: ignore[attr-defined]

from .. import native
from .records import ES256, PS256, IssuanceBatch

__all__ = ["CACHE_ENTRIES", "MAX_TEXT", "IssueLines"]

MAX_TEXT = 1024  # client, account, operator, ... : identifiers, not documents
#: Entries of each of :class:`IssueLines`' literal caches (client/account/operator JSON
#: literals, and record heads). Sized above the working set of a busy engine (10k+ accounts)
#: so that it does not churn; when full, the oldest entry goes (first in, first out): memory
#: stays bounded (~16k x ~0.3 KB). keyd's columns path
#: (:meth:`.writer.AuditLog.append_columns`) uses no cache: it builds the literals from each
#: message's string tables, natively.
CACHE_ENTRIES = 16_384


class IssueLines:
    """Builds the ``issue`` lines of batches. Keeps the JSON literals of identifiers
    (:attr:`texts`) and of batch heads, bounded by CACHE_ENTRIES each; not thread-safe (the
    writer calls it under its lock)."""

    __slots__ = ("_heads", "_kids", "texts")

    def __init__(self) -> None:
        #: identifier -> its JSON string literal (oldest first)
        self.texts: dict[str, str] = {}
        self._heads: dict[tuple[object, ...], bytes] = {}
        self._kids: dict[bytes, str] = {}

    def build(
        self, batches: Sequence[IssuanceBatch], when: bytes, seq: int, prev: str
    ) -> tuple[list[bytes], str]:
        """The lines of *batches*' records, in order, stamped *when*, numbered from *seq* and
        chained after the entry whose hash is *prev*.

        Returns:
            The lines and the hash of the last one.

        Raises:
            ValueError, TypeError: a malformed item, named by its index over all batches.
        """
        lines: list[bytes] = []
        # Hashing and formatting in one native call for each run of batches that share an
        # alg (keyd's micro-batch is one run whatever its number of parts), without the GIL
        # when native: a call per part cost more than the part's own lines.
        for alg, same_alg in itertools.groupby(batches, key=lambda b: b.alg):
            run = list(same_alg)
            heads: list[bytes] = []
            middles: list[bytes] = []
            sizes: list[int] = []
            isses: list[str] = []
            uvcis: list[str] = []
            payloads: list[bytes] = []
            signatures: list[bytes] = []
            index = len(lines)
            for b in run:
                # Each batch's columns must agree on their own: concatenated, a short one
                # would shift records into the next batch's group.
                if type(b.dcc_types) is not str:
                    raise TypeError("dcc_types must be a str")
                n = len(b.payloads)
                if not (
                    len(b.isses) == n
                    and len(b.uvcis) == n
                    and len(b.dcc_types) == n
                    and len(b.signatures) == n
                ):
                    raise ValueError(
                        f"record {index}: isses, uvcis, dcc_types, payloads and signatures "
                        "of a batch differ in length"
                    )
                heads.append(self._head(b, index))
                middles.append(self._middle(b, index))
                sizes.append(n)
                index += n
                isses += b.isses
                uvcis += b.uvcis
                payloads += b.payloads
                signatures += b.signatures
            group, prev = native.audit_issue_groups(
                heads,
                middles,
                sizes,
                when,
                alg,
                isses,
                uvcis,
                "".join(b.dcc_types for b in run),
                payloads,
                signatures,
                seq,
                prev,
                len(lines),
            )
            lines += group
            seq += len(group)
        return lines, prev

    def text(self, value: object, what: str, index: int) -> str:
        """JSON string literal of an identifier (cached: clients and accounts repeat)."""
        cached = self.texts.get(value)  # type: ignore[arg-type]
        if cached is not None:
            return cached
        if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
            raise ValueError(
                f"record {index}: {what} must be a non-empty string of at most "
                f"{MAX_TEXT} characters"
            )
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError(f"record {index}: {what} is not valid Unicode text") from None
        literal = encode_basestring(value)
        if len(self.texts) >= CACHE_ENTRIES:
            del self.texts[next(iter(self.texts))]  # the oldest: no clear-and-refill churn
        self.texts[value] = literal
        return literal

    def _head(self, r: IssuanceBatch, index: int) -> bytes:
        """``{"account":A,"alg":N,"client":C,"iss":`` of a batch (cached like :meth:`text`)."""
        slot = (r.account, r.alg, type(r.alg), r.client)
        try:
            cached = self._heads.get(slot)
        except TypeError:  # an unhashable field: text names it below
            cached = None
        if cached is not None:
            return cached
        if type(r.alg) is not int or r.alg not in (ES256, PS256):
            raise ValueError(f"record {index}: alg must be -7 (ES256) or -37 (PS256)")
        account = self.text(r.account, "account", index)
        client = self.text(r.client, "client", index)
        head = f'{{"account":{account},"alg":{r.alg},"client":{client},"iss":'.encode()
        if len(self._heads) >= CACHE_ENTRIES:
            del self._heads[next(iter(self._heads))]
        self._heads[slot] = head
        return head

    def _middle(self, r: IssuanceBatch, index: int) -> bytes:
        """``,"kid":"K","operator":O,"payload_sha256":"`` of a batch."""
        kid = self._kids.get(r.kid)
        if kid is None:
            if not isinstance(r.kid, bytes) or len(r.kid) != 8:
                raise ValueError(f"record {index}: kid must be 8 bytes")
            kid = self._kids[r.kid] = r.kid.hex()
        operator = "null" if r.operator is None else self.text(r.operator, "operator", index)
        return f',"kid":"{kid}","operator":{operator},"payload_sha256":"'.encode()
