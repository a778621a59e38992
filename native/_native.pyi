"""Type stub of the native core (``_native.pyx`` and ``src/*.c``), for readers and type checkers.

The extension implements exactly the API of the pure-Python reference
(:mod:`dccsign.native._reference`), with the same exceptions (:mod:`dccsign.native.errors`).
The contracts (what each function does, returns and raises) are written once, in the
pure-Python twins (``_*_py.py``), the readable reference: a function whose signature involves
no class of this module is re-exported from its twin, signature and all; the classes and the
functions that take or return them are declared here, types only.
``tests/test_native_stub.py`` checks that this stub, the extension and the reference name the
same things with the same parameters.
"""

from array import array
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

from ..protocol import wire
from ..protocol.cborlimits import MAX_SCAN_DEPTH as MAX_SCAN_DEPTH
from ._audit_py import audit_issue_groups as audit_issue_groups
from ._audit_py import audit_issue_lines as audit_issue_lines
from ._base45_py import b45decode as b45decode
from ._base45_py import b45encode as b45encode
from ._cose_py import check_protected as check_protected
from ._cose_py import protected_header as protected_header
from ._cose_py import sig_structure as sig_structure
from ._cose_py import sign1_decode as sign1_decode
from ._cose_py import sign1_encode as sign1_encode
from ._cwt_py import cwt_facts as cwt_facts
from ._dccvalidate_py import dcc_validator_stats as dcc_validator_stats
from ._hc1_py import hc1_encode as hc1_encode
from ._keydcols_py import audit_issue_columns as audit_issue_columns
from ._keydcols_py import keyd_check_columns as keyd_check_columns
from ._loadgen_py import scan_results as scan_results
from ._quota_py import quota_add as quota_add
from ._quota_py import quota_charge_known as quota_charge_known
from ._quota_py import quota_expire as quota_expire
from ._quota_py import quota_idle as quota_idle
from ._quota_py import quota_remove_newest as quota_remove_newest
from ._quota_py import quota_take_back as quota_take_back
from ._reply_py import Refusal
from ._reply_py import encode_sign_batch_result as encode_sign_batch_result
from ._smalldeflate_py import small_deflate as small_deflate
from ._spantable_py import fill_rows as fill_rows
from ._spantable_py import gather_spans as gather_spans
from ._spantable_py import span_table as span_table
from ._types import ES256 as ES256
from ._types import PS256 as PS256
from ._types import CwtFacts as CwtFacts
from ._types import NoncePoolInfo as NoncePoolInfo
from ._types import Sign1Parts as Sign1Parts
from ._types import Spans as Spans
from ._zlib_py import zlib_compress as zlib_compress
from ._zlib_py import zlib_decompress as zlib_decompress
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

def cbor_scan(data: bytes | bytearray | memoryview, max_items: int, max_depth: int) -> int: ...
def hc1_sign(
    key: SigningKey, protected: bytes, payloads: Sequence[bytes], level: int = 9
) -> list[str]: ...
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
