"""Reading a program's data (a dict, or TOML) field by field, with errors that name the field and, for
files, the line."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from ..errors import ConfigError

__all__ = ["Reader", "locate"]


def locate(text: str | None, path: tuple[str | int, ...]) -> int | None:
    """The line (1-based) of ``path`` (e.g. ``("offers", 1, "when")``) in TOML ``text``, or None.

    A scan, not a parser: it finds the ``[table]`` or the n-th ``[[array]]`` header, then the key;
    good enough to point a person at the right place."""
    if text is None:
        return None
    lines = text.splitlines()
    start, end = 0, len(lines)
    table: list[str] = []
    best: int | None = None
    i = 0
    while i < len(path):
        key = path[i]
        if not isinstance(key, str):
            i += 1
            continue
        index = path[i + 1] if i + 1 < len(path) and isinstance(path[i + 1], int) else None
        dotted = ".".join([*table, key])
        if index is not None:
            pat = re.compile(r"^\s*\[\[\s*" + re.escape(dotted) + r"\s*\]\]")
            hits = [n for n in range(start, end) if pat.match(lines[n])]
            if len(hits) > int(index):
                start = hits[int(index)] + 1
                nxt = [n for n in range(start, len(lines)) if re.match(r"^\s*\[", lines[n])]
                end = nxt[0] if nxt else len(lines)
                best = start
                table = [*table, key]
                i += 2
                continue
        pat = re.compile(r"^\s*\[\s*" + re.escape(dotted) + r"\s*\]")
        hits = [n for n in range(len(lines)) if pat.match(lines[n])]
        if hits:
            start = hits[0] + 1
            nxt = [n for n in range(start, len(lines)) if re.match(r"^\s*\[", lines[n])]
            end = nxt[0] if nxt else len(lines)
            best = start
            table = [*table, key]
            i += 1
            continue
        pat = re.compile(r"^\s*\"?" + re.escape(key) + r"\"?\s*=|[{,]\s*" + re.escape(key) + r"\s*=")
        hits = [n for n in range(start, end) if pat.search(lines[n])]
        if hits:
            return hits[0] + 1
        return best
    return best


class Reader:
    """One table of the program: typed getters that remember which keys were read, so that
    :meth:`done` can reject an unknown (misspelt) field."""

    def __init__(self, data: Any, path: tuple[str | int, ...], text: Any, source: str) -> None:
        # ``text``: the TOML text (lines found by :func:`locate`), or a function from a field's path to
        # its line (YAML), or None (a dict)
        self.path, self.text, self.source = path, text, source
        if not isinstance(data, dict):
            raise self.error(f"must be a table, not {type(data).__name__} {data!r}")
        self.data = data
        self.seen: set[str] = set()

    def name(self, key: str | int | None = None) -> str:
        parts = [*self.path, key] if key is not None else list(self.path)
        out = ""
        for p in parts:
            out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
        return out or "the program"

    def error(self, msg: str, key: str | int | None = None) -> ConfigError:
        path = (*self.path, key) if key is not None else self.path
        line = self.text(path) if callable(self.text) else locate(self.text, path)
        where = f"{self.source}, line {line}: " if line else (f"{self.source}: " if self.source else "")
        return ConfigError(f"{where}field {self.name(key)!r}: {msg}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return self.data.get(key, default)

    def int(self, key: str, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int:
        self.seen.add(key)
        if key not in self.data:
            if default is None:
                raise self.error("is required")
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"must be a whole number, not {type(v).__name__} {v!r}", key)
        if lo is not None and v < lo:
            raise self.error(f"must be at least {lo}, not {v}", key)
        if hi is not None and v > hi:
            raise self.error(f"must be at most {hi}, not {v}", key)
        return v

    def scaled(self, key: str, scale: int, default: int | None = None, lo: int = 0,
               hi: int | None = None) -> int:
        """A number that may have decimals (``1.5``), read exactly as an integer times ``scale``
        (``multiplier = 1.5`` with scale 100 -> 150); more decimals than the scale holds is an error."""
        self.seen.add(key)
        if key not in self.data:
            if default is None:
                raise self.error("is required")
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise self.error(f"must be a number, not {type(v).__name__} {v!r}", key)
        try:
            d = Decimal(str(v)) * scale
        except InvalidOperation:
            raise self.error(f"must be a number, not {v!r}", key) from None
        if d != d.to_integral_value():
            raise self.error(f"{v!r} has more decimals than the {1 / scale} this field is kept to", key)
        n = int(d)
        if n < lo:
            raise self.error(f"must be at least {Decimal(lo) / scale}, not {v!r}", key)
        if hi is not None and n > hi:
            raise self.error(f"must be at most {Decimal(hi) / scale}, not {v!r}", key)
        return n

    def str(self, key: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str:
        self.seen.add(key)
        if key not in self.data:
            if default is None:
                raise self.error("is required")
            return default
        v = self.data[key]
        if not isinstance(v, str):
            raise self.error(f"must be a string, not {type(v).__name__} {v!r}", key)
        if choices is not None and v not in choices:
            raise self.error(f"must be one of {', '.join(repr(c) for c in choices)}, not {v!r}", key)
        return v

    def bool(self, key: str, default: bool) -> bool:
        self.seen.add(key)
        v = self.data.get(key, default)
        if not isinstance(v, bool):
            raise self.error(f"must be true or false, not {v!r}", key)
        return v

    def table(self, key: str, required: bool = False) -> Reader | None:
        self.seen.add(key)
        if key not in self.data:
            if required:
                raise self.error("is required")
            return None
        return Reader(self.data[key], (*self.path, key), self.text, self.source)

    def tables(self, key: str) -> list[Reader]:
        self.seen.add(key)
        v = self.data.get(key, [])
        if not isinstance(v, list):
            raise self.error(f"must be a list of tables ([[{self.name(key)}]]), not {type(v).__name__}", key)
        return [Reader(item, (*self.path, key, i), self.text, self.source) for i, item in enumerate(v)]

    def strs(self, key: str) -> list[str]:
        self.seen.add(key)
        v = self.data.get(key, [])
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.error(f"must be a string or a list of strings, not {v!r}", key)
        return list(v)

    def ints(self, key: str) -> list[int]:
        self.seen.add(key)
        v = self.data.get(key, [])
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise self.error(f"must be a whole number or a list of them, not {v!r}", key)
        return list(v)

    def done(self) -> None:
        unknown = [k for k in self.data if k not in self.seen]
        if unknown:
            raise self.error(f"unknown field {unknown[0]!r} (known here: "
                             f"{', '.join(sorted(self.seen)) or 'none'})", unknown[0])
