"""Model affinity for multi-model variants: rendezvous (highest random weight) hashing: PURE.

A multi-model server keeps a cache of loaded models, so sending the same
TargetModel to the same replica keeps that cache warm, and each replica ends
up holding a different slice of the models instead of all of them thrashing.
Rendezvous hashing picks, for each model, the healthy upstream with the
highest hash of (upstream, model): when a replica goes away only its models
move, and when one comes back they return to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Sequence


def _score(upstream: str, key: str) -> int:
    # blake2b is fast and stable across processes (unlike hash()): every
    # gateway replica picks the same upstream for a model.
    digest = hashlib.blake2b(f"{upstream}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def pick_for_key(upstreams: Sequence[str], key: str, down: Container[str],
                 exclude: str | None = None) -> str | None:
    """The healthy upstream ``key`` belongs to, or None when none is healthy."""
    best: str | None = None
    best_score = -1
    for url in upstreams:
        if url in down or url == exclude:
            continue
        score = _score(url, key)
        if score > best_score:
            best, best_score = url, score
    return best
