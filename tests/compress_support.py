"""Test data shared by the compress tests."""

from __future__ import annotations

import random

SEED = 20261201


def source_like(length: int, seed: int = SEED) -> bytes:
    """Lines of Python-like words from a seeded generator: compressible about as source code
    is, and the same bytes whatever the project's own files say today (a corpus made of them
    changed the layouts these tests count with every edit)."""
    rng = random.Random(seed)
    words = (b"def class return self import from if else for while in not and or None True "
             b"False with as try except raise assert pass yield lambda length offset frame "
             b"slot native layer data size index table write read flush").split()  # fmt: skip
    lines, total = [], 0
    while total < length:
        line = b" " * rng.choice((0, 4, 8, 12)) + b" ".join(
            rng.choice(words) + (b"_%d" % rng.randrange(50) if rng.random() < 0.3 else b"")
            for _ in range(rng.randint(1, 9))
        ) + b"\n"
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:length]
