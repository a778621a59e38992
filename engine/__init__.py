"""dccsign: a signing engine for EU Digital COVID Certificates (``HC1:`` payloads).

This package is the engine (``engine/`` in the source tree). Its sub-packages are the
native core (:mod:`dccsign.native`) and the wire protocol (:mod:`dccsign.protocol`).
Importing it must stay cheap: the protocol codec imports through this package and must not
drag in the engine.
"""

__version__ = "0.1.0"
