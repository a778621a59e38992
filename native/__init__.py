"""The native core: base45, COSE, zlib, signing and batch HC1 assembly, keyd's per-item work
(the structural CWT check and the audit log's issue lines), and DCC validation on CBOR bytes
(``DccRules``, ``validate_dcc_cbor``, ``validate_dcc_batch``, ``validate_cwt_batch``), the
data plane's frame functions (request walk, spans, splice, reply bodies and their pool), and
the quota tracker's window arithmetic (``quota_*``).

Two implementations share one API and one set of exceptions (:mod:`dccsign.native.errors`):

* ``native`` -- the Cython extension over the system libcrypto, zlib and libdeflate (fast;
  batch calls release the GIL);
* ``python`` -- the readable pure-Python reference (``cbor2``-free, ``cryptography`` for
  signing).

``DCCSIGN_PUREPYTHON=1`` selects the reference. Otherwise the extension is used when it is
importable, and the reference is the fallback. :data:`IMPLEMENTATION` says which one this
process uses; :func:`implementation` returns either by name (tests use both).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from ._types import ES256, PS256, CwtFacts, NoncePoolInfo, Sign1Parts, Spans
from ._walker_py import BatchView
from .errors import (
    Base45DecodeError,
    CoseFormatError,
    DCCDecodeError,
    KeyLoadError,
    NativeError,
    SigningError,
    ZlibError,
)

__all__ = [
    "ES256",
    "IMPLEMENTATION",
    "PS256",
    "PURE_PYTHON_FORCED",
    "Base45DecodeError",
    "BatchView",
    "CoseFormatError",
    "CwtFacts",
    "DCCDecodeError",
    "KeyLoadError",
    "NativeError",
    "NoncePoolInfo",
    "Sign1Parts",
    "SigningError",
    "Spans",
    "ZlibError",
    "implementation",
]

PURE_PYTHON_FORCED = os.environ.get("DCCSIGN_PUREPYTHON", "") not in ("", "0")

_MODULES = {"native": "dccsign.native._native", "python": "dccsign.native._reference"}


def implementation(name: str) -> ModuleType:
    """Return the implementation module called *name* (``"native"`` or ``"python"``).

    Raises:
        ImportError: the native extension is not built, or is disabled by
            ``DCCSIGN_PUREPYTHON=1``.
        ValueError: *name* is neither ``"native"`` nor ``"python"``.
    """
    if name not in _MODULES:
        raise ValueError(f"unknown implementation {name!r}; use 'native' or 'python'")
    if name == "native" and PURE_PYTHON_FORCED:
        raise ImportError("DCCSIGN_PUREPYTHON=1 disables the native extension")
    return importlib.import_module(_MODULES[name])


def _select() -> tuple[str, ModuleType]:
    if not PURE_PYTHON_FORCED:
        try:
            return "native", implementation("native")
        except ImportError:
            pass
    return "python", implementation("python")


IMPLEMENTATION, _impl = _select()

# The common API, bound to the selected implementation (documented in _reference.py).
b45encode = _impl.b45encode
b45decode = _impl.b45decode
protected_header = _impl.protected_header
sig_structure = _impl.sig_structure
sign1_encode = _impl.sign1_encode
sign1_decode = _impl.sign1_decode
zlib_compress = _impl.zlib_compress
zlib_decompress = _impl.zlib_decompress
small_deflate = _impl.small_deflate
SigningKey = _impl.SigningKey
check_protected = _impl.check_protected
hc1_encode = _impl.hc1_encode
hc1_sign = _impl.hc1_sign
cwt_facts = _impl.cwt_facts
audit_issue_lines = _impl.audit_issue_lines
audit_issue_groups = _impl.audit_issue_groups
cbor_scan = _impl.cbor_scan
walk_sign_batch = _impl.walk_sign_batch
span_table = _impl.span_table
gather_spans = _impl.gather_spans
fill_rows = _impl.fill_rows
keyd_check_columns = _impl.keyd_check_columns
audit_issue_columns = _impl.audit_issue_columns
splice_payloads = _impl.splice_payloads
encode_sign_batch_result = _impl.encode_sign_batch_result
ReplyPool = _impl.ReplyPool
DccRules = _impl.DccRules
validate_dcc_cbor = _impl.validate_dcc_cbor
validate_dcc_batch = _impl.validate_dcc_batch
validate_cwt_batch = _impl.validate_cwt_batch
dcc_validator_stats = _impl.dcc_validator_stats
scan_results = _impl.scan_results
quota_add = _impl.quota_add
quota_take_back = _impl.quota_take_back
quota_expire = _impl.quota_expire
quota_idle = _impl.quota_idle
quota_remove_newest = _impl.quota_remove_newest
quota_charge_known = _impl.quota_charge_known
