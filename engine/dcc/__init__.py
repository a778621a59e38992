"""The rules of a Digital COVID Certificate: validation (:mod:`.validate`, :mod:`.uvci`,
:mod:`.valuesets`), document signer certificates (:mod:`.dsc`), the claims and the HC1 chain
(:mod:`.issuer`), verification (:mod:`.verify`) and QR images (:mod:`.qr`)."""
