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
