"""Refuse compiled modules that do not match their source: importing this module runs the check.

``loyalty_engine/__init__.py`` imports it before anything imports a compiled module (setup.py compiles
some of the package's plain Python modules and lists their source hashes in ``_compiled.txt``). It is
never compiled itself.
"""

from __future__ import annotations

import hashlib
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from .errors import BuildError


def refuse_stale_modules() -> None:
    """Python imports a compiled module before its ``.py``: a module whose source changed after the
    build (``_compiled.txt`` has the hashes of the sources the build compiled), or a compiled module
    the last build did not make, would run old code. Refuse both, naming the file."""
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
        raise BuildError(
            f"{source} {problem}, and Python would run the compiled old version. Build again with:  "
            "pip install -e .   (or LOYALTY_ENGINE_PURE_PYTHON=1 pip install -e . to run the Python "
            "modules uncompiled)"
        )


refuse_stale_modules()
