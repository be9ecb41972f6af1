"""Keys from a JWKS (a file or an http(s) URL), read again in the background.

Reading is blocking (a file, or urllib): it runs in a worker thread through
``asyncio.to_thread``, never on the event loop. A failed refresh keeps the keys already known.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from pathlib import Path
from typing import Any, Final

import jwt

logger = logging.getLogger("broker_node.auth.jwks")

#: Seconds one JWKS download may take.
FETCH_TIMEOUT: Final = 5.0


class JwksKeys:
    """The current keys of a JWKS by ``kid``; a ``KeySource`` for ``TokenVerifier``."""

    def __init__(self) -> None:
        #: kid -> (the ``alg`` the key is published for, or None; the key)
        self._keys: dict[str | None, tuple[str | None, Any]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def update(self, document: str) -> int:
        """Replace the keys with those of a JWKS document; returns how many were read.

        Keys PyJWT cannot use (an unknown ``kty`` or curve) are left out; a document with
        no usable key raises ``ValueError`` and the keys known so far stay.
        """
        data = json.loads(document)
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError("a JWKS is an object with a list of keys")
        keys: dict[str | None, tuple[str | None, Any]] = {}
        for entry in entries:
            try:
                key = jwt.PyJWK.from_dict(entry)
            except (jwt.PyJWTError, TypeError, ValueError) as exc:
                logger.warning("JWKS key left out: %s", exc)
                continue
            alg = entry.get("alg")
            keys[key.key_id] = (alg if isinstance(alg, str) else None, key.key)
        if not keys:
            raise ValueError("the JWKS has no usable key")
        self._keys = keys
        return len(keys)

    def key_for(self, kid: str | None, algorithm: str) -> Any:
        found = self._keys.get(kid)
        if found is None and kid is None and len(self._keys) == 1:
            found = next(iter(self._keys.values()))
        if found is None:
            return None
        published_for, key = found
        if published_for is not None and published_for != algorithm:
            return None  # a key published for another algorithm is not used for this one
        return key


def read_source(source: str) -> str:
    """The JWKS document at ``source`` (blocking: call it from a thread)."""
    if source.startswith(("http://", "https://")):
        request = urllib.request.Request(source, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as response:
            body: bytes = response.read()
        return body.decode()
    return Path(source).read_text()


async def refresh_forever(keys: JwksKeys, source: str, interval: float) -> None:
    """Read ``source`` into ``keys`` every ``interval`` seconds (a supervised loop)."""
    while True:
        await asyncio.sleep(interval)
        try:
            document = await asyncio.to_thread(read_source, source)
            count = keys.update(document)
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            # The keys already known stay in use; the next round tries again.
            logger.warning("could not refresh the JWKS: %s", exc)
        else:
            logger.debug("JWKS refreshed: %d keys", count)
