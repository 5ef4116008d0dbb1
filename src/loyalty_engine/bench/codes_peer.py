"""The peer for product codes: FF1 written straightforwardly, one code at a time, as the standard's
pseudocode reads (numeral strings, one AES call per round per code), plus the Damm digit in Python.
Its codes are checked equal to the engine's before any figure is printed."""

from __future__ import annotations

import math

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

DAMM = ((0, 3, 1, 7, 5, 9, 8, 6, 4, 2), (7, 0, 9, 2, 1, 5, 4, 8, 6, 3), (4, 2, 0, 6, 8, 7, 1, 3, 5, 9),
        (1, 7, 5, 0, 9, 8, 3, 4, 2, 6), (6, 1, 2, 3, 0, 4, 5, 9, 7, 8), (3, 6, 7, 4, 2, 0, 9, 5, 8, 1),
        (5, 8, 6, 9, 7, 2, 0, 1, 3, 4), (8, 9, 4, 5, 3, 6, 2, 0, 1, 7), (9, 4, 3, 8, 6, 1, 7, 2, 0, 5),
        (2, 5, 8, 1, 4, 3, 6, 7, 9, 0))


class PeerFF1:
    def __init__(self, key: bytes, tweak: bytes, radix: int = 10, n: int = 9) -> None:
        self.enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        self.radix, self.n, self.tweak = radix, n, tweak
        self.u, self.v = n // 2, n - n // 2
        self.b = math.ceil(math.ceil(self.v * math.log2(radix)) / 8)
        self.d = 4 * math.ceil(self.b / 4) + 4

    def prf(self, data: bytes) -> bytes:
        y = bytes(16)
        for k in range(0, len(data), 16):
            y = self.enc.update(bytes(a ^ b for a, b in zip(y, data[k: k + 16], strict=True)))
        return y

    def encrypt(self, x: str) -> str:
        radix, n, u, v, t = self.radix, self.n, self.u, self.v, len(self.tweak)
        a, b = x[:u], x[u:]
        p = bytes([1, 2, 1]) + radix.to_bytes(3, "big") + bytes([10, u % 256]) + n.to_bytes(4, "big") + \
            t.to_bytes(4, "big")
        for i in range(10):
            q = self.tweak + bytes((-t - self.b - 1) % 16) + bytes([i]) + int(b, radix).to_bytes(self.b, "big")
            r = self.prf(p + q)
            y = int.from_bytes(r[: self.d], "big")
            m = u if i % 2 == 0 else v
            c = (int(a, radix) + y) % radix**m
            a, b = b, str(c).zfill(m)
        return a + b


def peer_code(f: PeerFF1, serial: int) -> str:
    body = f.encrypt(str(serial).zfill(9))
    interim = 0
    for ch in body:
        interim = DAMM[interim][int(ch)]
    return body + str(interim)
