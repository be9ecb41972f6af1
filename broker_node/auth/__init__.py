"""Authentication and authorization (issue 13): tokens, the role policy, revocation, JWKS.

``tokens`` and ``policy`` are pure (no I/O, unit-tested without sockets); ``jwks`` and
``revocation`` hold the thin adapters that fetch keys and listen for revocations.
"""
