"""Type stub of the native core (``_native.pyx`` and ``src/*.c``), for readers and type checkers.

The extension implements exactly the API of the pure-Python reference
(:mod:`dccsign.native._reference`), with the same exceptions (:mod:`dccsign.native.errors`);
the signatures here are the reference's. ``tests/test_native_stub.py`` checks that this
stub, the extension and the reference name the same things with the same parameters.
"""

from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

from ..protocol import wire
from ..protocol.cborlimits import MAX_SCAN_DEPTH as MAX_SCAN_DEPTH
from ._quota_py import Limits, Usage, Window
from ._reply_py import Refusal
from ._types import ES256 as ES256
from ._types import PS256 as PS256
from ._types import CwtFacts as CwtFacts
from ._types import NoncePoolInfo as NoncePoolInfo
from ._types import Sign1Parts as Sign1Parts
from ._types import Spans as Spans
from .errors import Base45DecodeError as Base45DecodeError
from .errors import CoseFormatError as CoseFormatError
from .errors import DCCDecodeError as DCCDecodeError
from .errors import KeyLoadError as KeyLoadError
from .errors import SigningError as SigningError
from .errors import ZlibError as ZlibError

class DccRules:
    """What the validator needs besides the DCC, compiled once: the value-set tables."""

    def __init__(self, valuesets: Any = None) -> None: ...
    valuesets: Any

class ReplyPool:
    """Reply bodies encoded in C threads that never take the GIL; ``fileno`` is an eventfd
    that becomes readable when jobs are done."""

    def __init__(self, threads: int = 2) -> None: ...
    def close(self) -> None: ...
    def collect(self) -> list[ReplyJob]: ...
    def fileno(self) -> int: ...
    @property
    def pending(self) -> int: ...
    def submit_encode(
        self,
        protected: Sequence[bytes],
        kids: Sequence[bytes],
        protected_of: Any,
        payloads: bytes,
        payload_offsets: Any,
        signatures: bytes,
        signature_offsets: Any,
        refusals: Mapping[int, Refusal],
        level: int = 9,
        *,
        single: bool = False,
    ) -> ReplyJob: ...
    threads: int

class ReplyJob:
    """One reply body being encoded (:meth:`ReplyPool.submit_encode`)."""

    def result(self) -> bytes: ...

class SigningKey:
    """A private signing key for ES256 (P-256) or PS256 (RSA 2048-4096)."""

    def __init__(self) -> None: ...
    alg: int
    def clear_nonce_pool(self) -> None: ...
    def close_nonce_pool(self) -> None: ...
    def enable_nonce_pool(self, capacity: int, *, background: bool = False) -> NoncePoolInfo: ...
    @classmethod
    def load_pem(cls, pem: bytes, passphrase: bytes | None) -> SigningKey: ...
    def nonce_pool_info(self) -> NoncePoolInfo | None: ...
    def public_key_der(self) -> bytes: ...
    def refill_nonce_pool(self, max_entries: int = 64) -> int: ...
    def sign(self, protected: bytes, payloads: Sequence[bytes]) -> list[bytes]: ...

class BatchView:
    """The items of one SIGN / SIGN_BATCH body as spans (see the module docstring)."""

    def __init__(self, data: bytes, body_size: int, count: int, columns: bytes) -> None: ...
    body_size: int
    columns: bytes
    count: int
    data: bytes
    def dcc_bytes(self, i: int) -> bytes: ...
    def fields(self, i: int) -> tuple[int, ...]: ...
    def sign_items(self) -> tuple[wire.SignItem, ...]: ...
    def values(self, i: int) -> tuple[bytes, str, str | None, bytes | None, int | None, Any]: ...

class SplicedPayloads:
    """The CWT payloads of a frame in one buffer: payload *i* is
    ``data[offsets[i]:offsets[i + 1]]``."""

    def __init__(
        self, data: bytes, offsets: bytes, slow: int, rows: array, ends: array, longest: int
    ) -> None: ...
    data: bytes
    ends: array
    longest: int
    offsets: bytes
    def payload(self, i: int) -> bytes: ...
    rows: array
    slow: int

MAX_INFLATED: int
MAX_UVCI_CHARS: int
SMALL_DEFLATE_MAX: int

def audit_issue_columns(
    time: bytes,
    alg: int,
    kid: bytes,
    clients: Sequence[str],
    accounts: Sequence[str],
    operators: Sequence[str | None],
    client_ix: array,
    account_ix: array,
    operator_ix: array,
    payloads: bytes,
    ends: array,
    facts: bytes,
    selected: array,
    signatures: bytes,
    sig_ends: array,
    seq: int,
    prev: str,
) -> tuple[bytes, str]: ...
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
) -> tuple[list[bytes], str]: ...
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
) -> tuple[list[bytes], str]: ...
def b45decode(text: str | bytes) -> bytes: ...
def b45encode(data: bytes) -> str: ...
def cbor_scan(data: bytes | bytearray | memoryview, max_items: int, max_depth: int) -> int: ...
def cwt_facts(payloads: Sequence[bytes]) -> list[CwtFacts | str]: ...
def dcc_validator_stats() -> dict[str, int]: ...
def encode_sign_batch_result(
    protected: Sequence[bytes],
    kids: Sequence[bytes],
    protected_of: Any,
    payloads: bytes,
    payload_offsets: Any,
    signatures: bytes,
    signature_offsets: Any,
    refusals: Mapping[int, Refusal],
    level: int = 9,
    *,
    single: bool = False,
) -> bytes: ...
def fill_rows(target: array, rows: array, value: int) -> None: ...
def gather_spans(n: int, groups: list[tuple[array, bytes, array]]) -> tuple[bytes, array]: ...
def hc1_encode(
    protected: bytes, payloads: Sequence[bytes], signatures: Sequence[bytes], level: int = 9
) -> list[str]: ...
def hc1_sign(
    key: SigningKey, protected: bytes, payloads: Sequence[bytes], level: int = 9
) -> list[str]: ...
def keyd_check_columns(
    payloads: bytes,
    ends: array,
    client_ix: array,
    client_ok: bytes,
    max_payload: int,
    not_before: float,
    not_after: float,
    latest_iat: float,
    allowed: str,
) -> tuple[bytearray, bytes, dict[int, str]]: ...
def protected_header(alg: int, kid: bytes) -> bytes: ...
def quota_add(usage: Usage, limits: Limits, buckets: tuple[int, int, int], n: int) -> bool: ...
def quota_charge_known(
    table: OrderedDict[tuple[str, str], Usage],
    client: str,
    accounts: Sequence[str],
    counts: Sequence[int],
    limits: Limits,
    buckets: tuple[int, int, int],
    start: int,
    insert: tuple[tuple[int, int, int], int] | None = None,
) -> tuple[int, bool]: ...
def quota_expire(w: Window, cutoff: int) -> None: ...
def quota_idle(
    usage: Usage, buckets: tuple[int, int, int], spans: tuple[int, int, int]
) -> bool: ...
def quota_remove_newest(w: Window, n: int) -> None: ...
def quota_take_back(usage: Usage, limits: Limits, n: int) -> None: ...
def scan_results(
    body: bytes | bytearray | memoryview, batch: bool, max_results: int, want: Sequence[int] = ()
) -> tuple[int, tuple[tuple[int, int], ...], tuple[tuple[str, bytes] | None, ...]]: ...
def sig_structure(protected: bytes, payload: bytes) -> bytes: ...
def sign1_decode(data: bytes) -> Sign1Parts: ...
def sign1_encode(protected: bytes, payload: bytes, signature: bytes) -> bytes: ...
def small_deflate(data: bytes, level: int = 9) -> bytes: ...
def span_table(
    data: bytes,
    columns: bytes,
    nfields: int,
    fields: tuple[int, int],
    rows: array,
    base: int = 0,
    absent: int = 4294967295,
) -> tuple[list[bytes], array]: ...
def splice_payloads(
    view: BatchView, prefixes: Sequence[bytes], prefix_of: Any
) -> SplicedPayloads: ...
def validate_cwt_batch(
    rules: DccRules, payloads: Sequence[bytes], today: date | None = None
) -> list[Any]: ...
def validate_dcc_batch(
    rules: DccRules,
    buf: bytes,
    offsets: Sequence[int],
    today: date | None = None,
    *,
    ends: Sequence[int] | None = None,
    strict: bool = True,
    nfc_names: bool = False,
) -> list[Any]: ...
def validate_dcc_cbor(
    rules: DccRules,
    data: bytes,
    today: date | None = None,
    *,
    strict: bool = True,
    nfc_names: bool = False,
) -> str: ...
def walk_sign_batch(body: bytes, max_batch: int, *, single: bool = False) -> BatchView: ...
def zlib_compress(data: bytes, level: int = 9) -> bytes: ...
def zlib_decompress(data: bytes, max_length: int = 65536) -> bytes: ...
def check_protected(alg: int, protected: bytes) -> None: ...
