"""A numpy PCG64 generator's exact state as six uint64 words: what a saved TTA search or drift detector holds so
that it draws, after a restart, exactly what it would have drawn."""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1


def rng_to_words(rng: np.random.Generator) -> np.ndarray:
    """The PCG64 state of ``rng`` as six uint64 words (state, increment, buffered 32-bit draw)."""
    s = rng.bit_generator.state
    if s.get("bit_generator") != "PCG64":
        raise ValueError(f"only PCG64 generators are serialised, got {s.get('bit_generator')!r}")
    state, inc = int(s["state"]["state"]), int(s["state"]["inc"])
    return np.array([state & _MASK64, state >> 64, inc & _MASK64, inc >> 64, s["has_uint32"], s["uinteger"]],
                    dtype=np.uint64)


def rng_from_words(words: np.ndarray) -> np.random.Generator:
    """The generator serialised by :func:`rng_to_words`."""
    w = [int(v) for v in np.asarray(words, dtype=np.uint64).ravel()]
    if len(w) != 6:
        raise ValueError(f"a PCG64 state has 6 words, got {len(w)}")
    if not w[2] & 1 or w[4] not in (0, 1) or w[5] >= 1 << 32:
        raise ValueError("not a PCG64 state: its increment must be odd, has_uint32 0 or 1 and the buffered draw "
                         f"below 2**32 (got increment parity {w[2] & 1}, has_uint32 {w[4]}, uinteger {w[5]})")
    bit_generator = np.random.PCG64()
    bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": w[0] | (w[1] << 64), "inc": w[2] | (w[3] << 64)},
        "has_uint32": w[4],
        "uinteger": w[5],
    }
    return np.random.Generator(bit_generator)
