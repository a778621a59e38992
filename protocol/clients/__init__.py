"""Clients for portal backends: blocking (:mod:`.blocking`) and trio (:mod:`.trio_client`), with
what they share (:mod:`.coalesce`, sans-IO) and the TLS byte stream for trio
(:mod:`.tls_stream`, which the engine's server uses too)."""
