"""The dccsign protocols, sans-IO (no sockets, no trio, no engine imports in the codecs).

* :mod:`~dccsign.protocol.wire` -- portal backends <-> engine (specified in SPEC.md), with its
  error-code registry :mod:`~dccsign.protocol.codes`;
* :mod:`~dccsign.protocol.keyd` -- engine <-> keyd;
* :mod:`~dccsign.protocol.clients.blocking` -- the blocking client portal backends use.
"""
