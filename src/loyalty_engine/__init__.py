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


def _refuse_stale_modules() -> None:
    """Python imports a compiled module before its ``.py``: a module whose source changed after the
    build (``_compiled.txt`` has the hashes of the sources the build compiled), or a compiled module
    the last build did not make, would run old code. Refuse both, naming the file."""
    import hashlib
    from importlib.machinery import EXTENSION_SUFFIXES
    from pathlib import Path

    here = Path(__file__).parent
    compiled = sorted(p.stem for p in here.glob("*.py")
                      if any((here / f"{p.stem}{s}").exists() for s in EXTENSION_SUFFIXES))
    if not compiled:                # (built with LOYALTY_ENGINE_PURE_PYTHON=1)
        return
    try:
        words = (here / "_compiled.txt").read_text().split()
    except FileNotFoundError:
        words = []
    listing = dict(zip(words[::2], words[1::2], strict=False)) if len(words) % 2 == 0 else {}
    for name in compiled:
        source = here / f"{name}.py"
        if name not in listing:
            problem = "has a compiled copy that the last build did not make (or its _compiled.txt is damaged)"
        elif hashlib.blake2b(source.read_bytes(), digest_size=16).hexdigest() != listing[name]:
            problem = "changed after it was compiled"
        else:
            continue
        from .errors import BuildError

        raise BuildError(
            f"{source} {problem}, and Python would run the compiled old version. Build again with:  "
            "pip install -e .   (or LOYALTY_ENGINE_PURE_PYTHON=1 pip install -e . to run the Python "
            "modules uncompiled)"
        )


_refuse_stale_modules()

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
