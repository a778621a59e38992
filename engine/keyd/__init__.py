"""keyd, the process that holds the private keys: what it checks, signs and records
(:mod:`.service`), how it is reached (:mod:`.transport`, a Unix socket), how the process comes
up (:mod:`.bootstrap`); the engine's clients of it (blocking :mod:`.client`, trio
:mod:`.trio_client`) and the supervisor that starts it in isolation (:mod:`.supervisor`)."""
