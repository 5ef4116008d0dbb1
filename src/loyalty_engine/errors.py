"""Every exception loyalty_engine raises, in one place.

Each error derives from :class:`LoyaltyError` and also from the builtin it resembles, so a host can
catch either ``LoyaltyError`` or, say, ``ValueError``.
"""

from __future__ import annotations

__all__ = [
    "LoyaltyError",
    "ConfigError",
    "ValidationError",
    "NotFoundError",
    "InsufficientBalanceError",
    "CodeError",
    "StorageError",
    "LedgerClosedError",
    "CorruptionError",
    "BuildError",
]


class LoyaltyError(Exception):
    """The root of every error loyalty_engine raises."""


class ConfigError(LoyaltyError, ValueError):
    """A program, option or setting is wrong (names the field and, for files, the line)."""


class ValidationError(LoyaltyError, ValueError):
    """Input data is wrong: a type, a range, a missing column, a naive datetime."""


class NotFoundError(LoyaltyError, KeyError):
    """An account, member, batch or transfer does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; a person should read plain text
        return str(self.args[0]) if self.args else ""


class InsufficientBalanceError(LoyaltyError, ValueError):
    """A member asked to spend more than they have."""


class CodeError(LoyaltyError, ValueError):
    """A product or gift code was refused."""


class StorageError(LoyaltyError, OSError):
    """The ledger's storage failed or is not usable (permissions, disk full, wrong format)."""


class LedgerClosedError(StorageError):
    """The ledger handle was closed."""


class CorruptionError(StorageError):
    """Stored data does not match its hash or cannot be decoded."""


class BuildError(LoyaltyError, ImportError):
    """The compiled core is missing: the package was not built."""


def warn_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first frame outside loyalty_engine: the host's call.

    The engine's and the ledger's modules are compiled, and compiled functions have no frames. So a
    fixed ``stacklevel`` points at a different place compiled and interpreted. This module is never
    compiled; it counts the frames that are the package's own."""
    import sys
    import warnings

    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] == "loyalty_engine":
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
