"""The dccsign wire protocol (sans-IO).

Reserved for the portal-facing codec and the engine-to-keyd codec. Nothing is implemented
here yet: the signing core does not use it.
"""
