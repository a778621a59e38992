"""dccsign: a signing engine for EU Digital COVID Certificates (``HC1:`` payloads).

This package is the engine (``engine/`` in the source tree), in rooms that follow the
architecture (``docs/architecture.md``):

* :mod:`dccsign.server` -- the engine's trio server: connections, dispatch, the micro-batcher
  toward keyd, policy and quotas, metrics;
* :mod:`dccsign.keyd` -- the key process: its service, its clients and its supervisor;
* :mod:`dccsign.keys` -- the keystore, key lifecycle, PKCS#11 tokens, CSRs;
* :mod:`dccsign.dcc` -- DCC rules: validation, UVCI, value sets, DSCs, claims, verification, QR;
* :mod:`dccsign.audit` -- the hash-chained audit log;
* :mod:`dccsign.cli` -- the ``dccsign`` command;
* :mod:`dccsign.testing` -- helpers for tests (sample DCCs, the wire fuzzer);

and the sub-packages mapped from other folders: the native core (:mod:`dccsign.native`), the
wire protocol (:mod:`dccsign.protocol`) and the benchmark drivers (:mod:`dccsign.bench`, from
``bench/drivers``; nothing in the product imports it). Importing this package must stay
cheap: the protocol codec imports through it and must not drag in the engine.
"""

__version__ = "0.1.0"
