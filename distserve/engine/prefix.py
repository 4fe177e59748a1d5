"""Block hashes of automatic prefix caching, and the compact set a worker publishes of them.

A full block of `block_size` tokens is named by a chained hash: h_0 = root, h_i = H(h_{i-1}, tokens of
block i), with H the first 8 bytes of BLAKE2b and `root` a hash of what else decides the block's KV
(the model, the KV dtype, the block size). Two prompts share block i's hash only when they share all
tokens up to the end of block i, so a hash names a prefix, not just a block, and a worker with block
i cached has blocks 0..i-1 cached too (unless evicted: the match stops at the first miss). Only full
blocks are named; a prompt's last partial block is always computed.

Routers compute the same hashes from the root a worker publishes (`root_hash` is a pure function of
its inputs, no process randomness) and test them against the worker's `BlockBloom`: a Bloom filter of
the hashes it holds, rebuilt when they change. A Bloom filter answers "maybe held" or "not held"; a
false "maybe" (about 1% at the sizes below) only makes a router overestimate one worker's prefix.

Pure Python (no torch, no Redis): routers import it.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Iterable, Sequence

MASK64 = (1 << 64) - 1
BLOOM_BITS_PER_ITEM = 10  # m / n: about 1% false positives with k = 7
BLOOM_HASHES = 7
BLOOM_MAX_BITS = 1 << 23  # 1 MiB: a cap for very large caches (more false positives there)
BLOOM_MIN_BITS = 1 << 10


def root_hash(model: str, kv_dtype: str, block_size: int) -> int:
    """The chain's start for one model, KV dtype and block size (64 bits)."""
    d = hashlib.blake2b(f"distserve-prefix-v1|{model}|{kv_dtype}|{block_size}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little")


def block_hashes(tokens: Sequence[int], block_size: int, root: int, start: int = 0, parent: int | None = None,
                 limit: int | None = None) -> list[int]:
    """Hashes of the full blocks of `tokens` from block `start` on (`parent`: the hash of block start-1,
    or the root when start is 0), at most up to block `limit` (exclusive)."""
    n_full = len(tokens) // block_size
    if limit is not None:
        n_full = min(n_full, limit)
    h = root if parent is None else parent
    out = []
    for i in range(start, n_full):
        blk = array("I", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        h = int.from_bytes(hashlib.blake2b(struct.pack("<Q", h) + blk, digest_size=8).digest(), "little")
        out.append(h)
    return out


def bloom_bits(num_items: int) -> int:
    """Size in bits (a power of two) of a filter meant for up to `num_items` hashes."""
    m = BLOOM_MIN_BITS
    while m < num_items * BLOOM_BITS_PER_ITEM and m < BLOOM_MAX_BITS:
        m <<= 1
    return m


def _probes(h: int, m: int) -> Iterable[int]:
    a, b = h & 0xFFFFFFFF, (h >> 32) | 1  # double hashing: k probes from one 64-bit hash
    for i in range(BLOOM_HASHES):
        yield (a + i * b) & (m - 1)


class BlockBloom:
    """A Bloom filter of block hashes, as bytes (bit j is bit j % 8 of byte j // 8)."""

    __slots__ = ("bits", "m")

    def __init__(self, bits: bytes):
        m = len(bits) * 8
        if m and m & (m - 1):
            raise ValueError(f"a block Bloom filter has a power-of-two size, got {m} bits")
        self.bits = bits
        self.m = m

    @classmethod
    def build(cls, hashes: Iterable[int], capacity: int) -> BlockBloom:
        """The filter of `hashes`, sized for `capacity` items (numpy when there are many)."""
        hashes = list(hashes)
        m = bloom_bits(max(capacity, len(hashes)))
        if len(hashes) > 256:
            import numpy as np

            h = np.array(hashes, dtype=np.uint64)
            a = h & np.uint64(0xFFFFFFFF)
            b = (h >> np.uint64(32)) | np.uint64(1)
            idx = (a[:, None] + np.arange(BLOOM_HASHES, dtype=np.uint64)[None, :] * b[:, None]) & np.uint64(m - 1)
            flat = np.zeros(m, dtype=bool)
            flat[idx.ravel().astype(np.int64)] = True
            return cls(np.packbits(flat, bitorder="little").tobytes())
        buf = bytearray(m // 8)
        for h in hashes:
            for j in _probes(h, m):
                buf[j >> 3] |= 1 << (j & 7)
        return cls(bytes(buf))

    def __contains__(self, h: int) -> bool:
        if not self.m:
            return False
        bits = self.bits
        return all(bits[j >> 3] >> (j & 7) & 1 for j in _probes(h, self.m))

    def prefix_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading hashes the filter (maybe) holds."""
        n = 0
        for h in hashes:
            if h not in self:
                break
            n += 1
        return n
