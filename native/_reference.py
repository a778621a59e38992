"""The pure-Python reference implementation of :mod:`dccsign.native`, as one namespace.

Readable first: each function states the contract the Cython extension (``_native.pyx``)
implements too, with the same exceptions.
"""

from ..protocol.cborlimits import scan as cbor_scan
from ._audit_py import MAX_UVCI_CHARS, audit_issue_groups, audit_issue_lines
from ._base45_py import b45decode, b45encode
from ._cose_py import protected_header, sig_structure, sign1_decode, sign1_encode
from ._cwt_py import cwt_facts
from ._hc1_py import hc1_encode, hc1_sign
from ._reply_py import encode_sign_batch_result
from ._signing_py import SigningKey
from ._splice_py import splice_payloads
from ._walker_py import walk_sign_batch
from ._zlib_py import MAX_INFLATED, zlib_compress, zlib_decompress

__all__ = [
    "MAX_INFLATED",
    "MAX_UVCI_CHARS",
    "SigningKey",
    "audit_issue_groups",
    "audit_issue_lines",
    "b45decode",
    "b45encode",
    "cbor_scan",
    "cwt_facts",
    "encode_sign_batch_result",
    "hc1_encode",
    "hc1_sign",
    "protected_header",
    "sig_structure",
    "sign1_decode",
    "sign1_encode",
    "splice_payloads",
    "walk_sign_batch",
    "zlib_compress",
    "zlib_decompress",
]
