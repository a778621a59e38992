"""The pure-Python reference implementation of :mod:`dccsign.native`, as one namespace.

Readable first: each function states the contract the Cython extension (``_native.pyx``)
implements too, with the same exceptions.
"""

from ..protocol.cborlimits import scan as cbor_scan
from . import _quota_py
from ._audit_py import MAX_UVCI_CHARS, audit_issue_groups, audit_issue_lines
from ._base45_py import b45decode, b45encode
from ._cose_py import (
    check_protected,
    protected_header,
    sig_structure,
    sign1_decode,
    sign1_encode,
)
from ._cwt_py import cwt_facts
from ._dccvalidate_py import (
    DccRules,
    dcc_validator_stats,
    validate_cwt_batch,
    validate_dcc_batch,
    validate_dcc_cbor,
)
from ._hc1_py import hc1_encode, hc1_sign
from ._jobpool_py import ReplyPool
from ._keydcols_py import audit_issue_columns, keyd_check_columns
from ._loadgen_py import scan_results
from ._quota_py import *  # noqa: F403 -- the quota functions, as its __all__ lists them
from ._reply_py import encode_sign_batch_result
from ._signing_py import SigningKey
from ._signing_py import _nonce_batch_inverse as _nonce_batch_inverse  # test support
from ._smalldeflate_py import SMALL_DEFLATE_MAX, small_deflate
from ._spantable_py import fill_rows, gather_spans, span_table
from ._splice_py import splice_payloads
from ._walker_py import walk_sign_batch
from ._zlib_py import MAX_INFLATED, zlib_compress, zlib_decompress

__all__ = [
    "MAX_INFLATED",
    "MAX_UVCI_CHARS",
    "SMALL_DEFLATE_MAX",
    "DccRules",
    "ReplyPool",
    "SigningKey",
    "audit_issue_columns",
    "audit_issue_groups",
    "audit_issue_lines",
    "b45decode",
    "b45encode",
    "cbor_scan",
    "check_protected",
    "cwt_facts",
    "dcc_validator_stats",
    "encode_sign_batch_result",
    "fill_rows",
    "gather_spans",
    "hc1_encode",
    "hc1_sign",
    "keyd_check_columns",
    "protected_header",
    "scan_results",
    "sig_structure",
    "sign1_decode",
    "sign1_encode",
    "small_deflate",
    "span_table",
    "splice_payloads",
    "validate_cwt_batch",
    "validate_dcc_batch",
    "validate_dcc_cbor",
    "walk_sign_batch",
    "zlib_compress",
    "zlib_decompress",
    *_quota_py.__all__,
]
