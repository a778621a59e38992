"""Keys at rest: the keystore (:mod:`.keystore`), its files and key-event journal
(:mod:`.storage`), the key lifecycle (:mod:`.lifecycle`), PKCS#11 tokens (:mod:`.pkcs11`) and
certificate signing requests (:mod:`.csr`). Only keyd and the key commands open them."""
