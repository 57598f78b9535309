"""Sub-seeds: every random choice in pbbjax takes a seed, and parts of a run derive theirs from the run's
seed and a name (``derive_seed(seed, "split")``) by a stable hash (Python's ``hash()`` is salted per
process, so never that).

The hash is SHA-256's first 8 bytes. How ``parts`` become the hashed text is the ``encoding``: ``"repr"``
(the default, for new code) hashes ``repr(parts)``; the domains that predate it keep the texts their
committed results were made with, ``"path"`` (``"a/b/c"``, arithmetic and ciphers) and ``"json"``
(grammars and the LeetCode input generators). Changing a domain's encoding changes its every data set,
so that is a change of results, not of code.
"""

from __future__ import annotations

import hashlib
import json
import random

ENCODINGS = ("repr", "path", "json")


def derive_seed(*parts, encoding: str = "repr") -> int:
    """A 64-bit seed from ``parts`` (ints, strings and other JSON-able values)."""
    if encoding == "repr":
        return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")
    if encoding == "path":
        text = "/".join(map(str, parts))
    elif encoding == "json":
        text = json.dumps(parts, sort_keys=True)
    else:
        raise ValueError(f"unknown seed encoding {encoding!r}; encodings: {', '.join(ENCODINGS)}")
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def derived_rng(*parts, encoding: str = "repr") -> random.Random:
    """A ``random.Random`` seeded with ``derive_seed(*parts, encoding=encoding)``."""
    return random.Random(derive_seed(*parts, encoding=encoding))
