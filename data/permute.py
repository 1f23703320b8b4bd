"""A keyed pseudo-random permutation of [0, n), evaluated per index in O(1) memory.

The loader must map position p of epoch e to a shuffled sample index without ever holding an
n-element permutation (n is ~10^8 windows for a large source) and without replaying earlier
positions, so that resuming at sample 10^8 costs the same as starting. A Feistel network is a
bijection by construction whatever its round function, so we run one on the smallest power of
two >= n and "cycle-walk": re-apply it while the result is >= n. The walk stays inside the
cycle of the starting point, so the restriction to [0, n) is again a bijection; since
2^m < 2n, fewer than two passes of the network are expected per index.

The halves may differ by one bit (m odd): each round maps (L: a bits, R: b bits) to
(R, L xor F(R) mod 2^a), which is invertible, and the widths swap for the next round. The
round function is a splitmix64-style finaliser of R xor a per-round key; keys come from
BLAKE2b over the caller's key parts, so the permutation depends only on them and this code,
never on numpy's random streams (which may change between numpy versions).
"""

from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 6  # 4 suffice for a pseudo-random permutation (Luby-Rackoff); 6 for margin
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def round_keys(*parts: object) -> np.ndarray:
    """ROUNDS 64-bit keys derived from `parts` (e.g. seed, source, epoch); stable forever."""
    text = "/".join(repr(p) for p in parts).encode()
    digest = hashlib.blake2b(text, digest_size=8 * ROUNDS, person=b"stripes-perm").digest()
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64)


def _mix(x: np.ndarray, key: np.ndarray) -> np.ndarray:
    """64-bit avalanche of x xor key (arrays only: uint64 array arithmetic wraps silently)."""
    x = (x ^ key) * _M1
    x ^= x >> np.uint64(30)
    x *= _M2
    return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, bits: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """One pass of the network on [0, 2^bits), elementwise (bits, keys [..., ROUNDS])."""
    a, b = bits // np.uint64(2), bits - bits // np.uint64(2)  # widths of the left, right half
    one = np.uint64(1)
    left, right = x >> b, x & ((one << b) - one)
    for r in range(ROUNDS):
        new_right = left ^ (_mix(right, keys[..., r]) & ((one << a) - one))
        left, right = right, new_right
        a, b = b, a
    return (left << b) | right


def permute(positions: np.ndarray | int, n: np.ndarray | int, keys: np.ndarray) -> np.ndarray:
    """perm_{n, keys}(positions) as int64: for each fixed (n, keys) a bijection of [0, n).

    `n` and `keys` ([ROUNDS] from `round_keys`, or [..., ROUNDS]) broadcast against
    `positions`, so one call serves a batch whose elements use different permutations."""
    p = np.asarray(positions, dtype=np.int64)
    shape = p.shape  # flattened below: 0-d uint64 arithmetic would warn on (wanted) overflow
    n = np.broadcast_to(np.asarray(n, dtype=np.int64), shape).reshape(-1)
    keys = np.broadcast_to(np.asarray(keys, dtype=np.uint64), shape + (ROUNDS,))
    keys, p = keys.reshape(-1, ROUNDS), p.reshape(-1)
    if p.size and (p.min() < 0 or np.any(p >= n)):
        raise IndexError("positions must lie in [0, n)")
    # Smallest power of two >= n (at least 2), by Python's exact bit_length per distinct n.
    sizes, which = np.unique(n, return_inverse=True)
    bits = np.array([max(1, (int(m) - 1).bit_length()) for m in sizes], dtype=np.uint64)
    bits, limit = bits[which.reshape(-1)], n.astype(np.uint64)
    x = _feistel(p.astype(np.uint64), bits, keys)
    walking = x >= limit
    while walking.any():  # cycle-walk back into [0, n)
        x[walking] = _feistel(x[walking], bits[walking], keys[walking])
        walking = x >= limit
    return x.astype(np.int64).reshape(shape)
