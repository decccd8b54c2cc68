"""A reference Toeplitz hash for the tests, written from the definition
(independent of the datapath's C implementation it checks)."""

from __future__ import annotations


def toeplitz(key: bytes, data: bytes) -> int:
    """The Toeplitz hash: for every set bit i of the input (MSB first), XOR
    in the 32 key bits starting at key bit i (zeros past the key's end)."""
    k = int.from_bytes(key + bytes(len(data)), "big")
    kbits = 8 * (len(key) + len(data))
    result = 0
    for i in range(8 * len(data)):
        if data[i // 8] >> (7 - i % 8) & 1:
            result ^= (k >> (kbits - 32 - i)) & 0xFFFFFFFF
    return result
