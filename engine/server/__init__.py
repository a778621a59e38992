"""The engine's trio server: the process (:mod:`.engine`), portal connections (:mod:`.server`),
the signing path from a request to keyd and back (:mod:`.dispatch`, :mod:`.dataplane`,
:mod:`.batcher`, :mod:`.offload`), who may sign what (:mod:`.policy`), :mod:`.metrics`, and
development TLS (:mod:`.devtls`)."""
