"""FF1 (NIST SP 800-38G), format-preserving encryption, batched.

Each of the ten Feistel rounds is one AES-ECB call (through the ``cryptography`` package) over one
16-byte block per value; the rounds' loop and digit arithmetic are in ``_core.ff1_values``. Values
are handled as integers (the numeral strings' NUM_radix): a numeral of n digits is the pair (NUM of
its first u digits, NUM of its last v digits).

Limits: radix 2..65536, radix**ceil(n/2) < 2**64 (b <= 8 bytes, so the PRF needs one output block),
tweaks up to 255 bytes. The NIST sample vectors are tests (tests/test_ff1.py).
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import _core, _memory
from .errors import ValidationError

__all__ = ["FF1"]

CHUNK = 4096   # values per pass through the ten rounds: 64 KB of AES blocks


class FF1:
    """FF1 over numerals of ``n`` digits in ``radix`` with one key and tweak."""

    def __init__(self, key: bytes, radix: int, n: int, tweak: bytes = b"") -> None:
        if len(key) not in (16, 24, 32):
            raise ValidationError(f"an AES key is 16, 24 or 32 bytes, not {len(key)}")
        if not 2 <= radix <= 1 << 16:
            raise ValidationError(f"radix must be 2..65536, not {radix}")
        if radix**n < 1_000_000 or n < 2:
            raise ValidationError(f"FF1 needs radix**n >= 1,000,000 (NIST); {radix}**{n} is too small")
        if len(tweak) > 255:
            raise ValidationError("tweaks longer than 255 bytes are not supported")
        self.radix, self.n = radix, n
        self.u, self.v = n // 2, n - n // 2
        if radix**self.v >= 1 << 64:
            raise ValidationError(f"{radix}**{self.v} does not fit 64 bits; use fewer digits")
        # b = ceil(ceil(v * log2(radix)) / 8), computed exactly: ceil(log2(r**v)) is the bit length of r**v - 1
        self.b = ((radix**self.v - 1).bit_length() + 7) // 8
        self.d = 4 * math.ceil(self.b / 4) + 4
        self.mod_u, self.mod_v = radix**self.u, radix**self.v
        self._domain = self.mod_u * self.mod_v
        self._fits = self._domain <= 1 << 64      # whole values as uint64 (else digits only)
        self._ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        self._key_for_peer, self._tweak_for_peer = key, tweak    # the benchmark's peer re-derives nothing
        t = len(tweak)
        p = (bytes([1, 2, 1]) + radix.to_bytes(3, "big") + bytes([10, self.u % 256]) + n.to_bytes(4, "big")
             + t.to_bytes(4, "big"))
        q_prefix = tweak + bytes((-t - self.b - 1) % 16)          # Q without [i] and NUM(B)
        q_len = len(q_prefix) + 1 + self.b
        assert q_len % 16 == 0
        # CBC-MAC over P and every block of Q but the last is the same for every value: do it once
        state = self._aes(p)
        head, last = q_prefix[: q_len - 16], q_prefix[q_len - 16:]
        for k in range(0, len(head), 16):
            state = self._aes(_xor(state, head[k: k + 16]))
        # the last block: its constant bytes (tweak tail, padding), then [i], then NUM(B)
        self._mask = np.frombuffer(_xor(state, last + bytes(16 - len(last))), np.uint8).copy()

    def _aes(self, block: bytes) -> bytes:
        return self._ecb.update(block)

    def _run(self, x: np.ndarray, decrypt: bool) -> np.ndarray:
        """All ten rounds in ``_core.ff1_values``, a cache-sized chunk of values at a time (AES over
        64 KB runs several times faster than over megabytes: the output stays in cache)."""
        if not self._fits:
            self._too_wide()
        x = np.ascontiguousarray(x, dtype=np.uint64)
        if len(x) and self._domain <= 1 << 64 and int(x.max()) >= self._domain:
            raise ValidationError(f"value {int(x.max())} is outside FF1's domain [0, {self._domain:,})")
        out = _memory.empty(len(x), np.uint64)
        _core.ff1_values(x, out, self._mask, self.b, self.d, self.mod_u, self.mod_v, decrypt,
                         self._ecb.update_into, max(1, min(CHUNK, len(x))))
        return out

    def _halves(self, a: np.ndarray, b: np.ndarray, decrypt: bool) -> None:
        _core.ff1_crypt(a, b, self._mask, self.b, self.d, self.mod_u, self.mod_v, decrypt,
                        self._ecb.update_into, max(1, min(CHUNK, len(a))))

    def encrypt_ints(self, x: np.ndarray) -> np.ndarray:
        """Encrypt values in [0, radix**n) given as integers (NUM_radix of the numeral strings)."""
        return self._run(x, False)

    def decrypt_ints(self, y: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`encrypt_ints`."""
        return self._run(y, True)

    def _too_wide(self) -> None:
        raise ValidationError(f"values of {self.n} digits in radix {self.radix} do not fit 64 bits; "
                              f"use encrypt_digits")

    def decrypt_int(self, y: int) -> int:
        """:meth:`decrypt_ints` for one value (no array set-up: a single check at the till)."""
        return self._one(y, True)

    def encrypt_int(self, x: int) -> int:
        """:meth:`encrypt_ints` for one value."""
        return self._one(x, False)

    def _one(self, x: int, decrypt: bool) -> int:
        if not self._fits:
            self._too_wide()
        if not 0 <= x < self._domain:
            raise ValidationError(f"value {x!r} is outside FF1's domain [0, {self._domain:,})")
        return _core.ff1_one(int(x), self._mask, self.b, self.d, self.mod_u, self.mod_v, decrypt, self._ecb.update)

    def encrypt_digits(self, digits: list[int]) -> list[int]:
        """Encrypt one numeral given as a list of digits (the standard's interface; for the vectors)."""
        return self._digits(digits, False)

    def decrypt_digits(self, digits: list[int]) -> list[int]:
        return self._digits(digits, True)

    def _digits(self, digits: list[int], decrypt: bool) -> list[int]:
        if len(digits) != self.n or any(not 0 <= d < self.radix for d in digits):
            raise ValidationError(f"expected {self.n} digits in radix {self.radix}")
        a = np.array([_num(digits[: self.u], self.radix)], np.uint64)
        b = np.array([_num(digits[self.u:], self.radix)], np.uint64)
        self._halves(a, b, decrypt)
        return _str(int(a[0]), self.u, self.radix) + _str(int(b[0]), self.v, self.radix)


def _xor(x: bytes, y: bytes) -> bytes:
    return bytes(p ^ q for p, q in zip(x, y, strict=True))


def _num(digits: list[int], radix: int) -> int:
    v = 0
    for d in digits:
        v = v * radix + d
    return v


def _str(v: int, m: int, radix: int) -> list[int]:
    out = [0] * m
    for k in range(m - 1, -1, -1):
        v, out[k] = divmod(v, radix)
    return out
