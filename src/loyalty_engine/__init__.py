"""loyalty_engine: an embeddable customer-club engine with a compiled core and an LMDB ledger."""

from __future__ import annotations

try:
    from . import _bulk, _core  # noqa: F401
except ImportError as _e:  # pragma: no cover - exercised by a subprocess test
    from .errors import BuildError

    raise BuildError(
        "loyalty_engine's compiled core (loyalty_engine._core, loyalty_engine._bulk) is not built in this checkout "
        f"({_e}). Build it with:  pip install -e .   (needs a C compiler and Cython>=3); "
        "there is no pure-Python fallback."
    ) from _e


from . import _compiled_check  # noqa: F401  (importing it refuses stale compiled modules)
from .errors import (
    BuildError,
    CodeError,
    ConfigError,
    CorruptionError,
    InsufficientBalanceError,
    LedgerClosedError,
    LoyaltyError,
    NotFoundError,
    StorageError,
    ValidationError,
)
from .ledger import Ledger
from .types import (
    ACCOUNT_RECORD_DTYPE,
    BALANCE_DTYPE,
    RECORD_DTYPE,
    Account,
    AccountFlags,
    AccountResult,
    Balance,
    Code,
    Transfer,
    TransferFlags,
    TransferResult,
    VerifyReport,
)

__version__ = "0.1.0"

__all__ = [
    "ACCOUNT_RECORD_DTYPE",
    "BALANCE_DTYPE",
    "RECORD_DTYPE",
    "Account",
    "AccountFlags",
    "AccountResult",
    "Balance",
    "BuildError",
    "Code",
    "CodeError",
    "ConfigError",
    "CorruptionError",
    "InsufficientBalanceError",
    "Ledger",
    "LedgerClosedError",
    "LoyaltyError",
    "NotFoundError",
    "StorageError",
    "Transfer",
    "TransferFlags",
    "TransferResult",
    "ValidationError",
    "VerifyReport",
    "__version__",
]
