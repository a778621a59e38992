"""keyd, the process that holds the private keys (:mod:`.service`), the engine's clients of it
(blocking :mod:`.client`, trio :mod:`.trio_client`) and the supervisor that starts it in
isolation (:mod:`.supervisor`)."""
