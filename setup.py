"""Build the compiled core. Everything else about the package lives in pyproject.toml.

Two kinds of extension modules are built:

- the core, ``_core.pyx`` and ``_bulk.pyx``: typed Cython, the ledger's state and the rule kernel;
- the engine's and the ledger's plain Python modules (``PY_MODULES``), compiled as they are by Cython:
  the same source and behaviour, without the interpreter's cost per line (one purchase takes about a
  quarter less time). ``LOYALTY_ENGINE_PURE_PYTHON=1 pip install -e .`` leaves them uncompiled, to step
  through them in a debugger.

Python imports a compiled module before its ``.py``, so a ``.py`` edited after the build would be
ignored. The build writes each compiled module's source hash to ``_compiled.txt``; importing
``loyalty_engine`` refuses a compiled module whose source changed since (it says to build again).
"""

import hashlib
import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PACKAGE = Path("src") / "loyalty_engine"
#: The plain Python modules that are compiled (the ones a purchase and a ledger write run through).
PY_MODULES = ("engine", "ledger", "store", "types")
#: What the build wrote: one line per compiled Python module, its name and its source's hash.
LISTING = "_compiled.txt"


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


# LOYALTY_ENGINE_DEBUG_CYTHON=1 turns bounds and wrap-around checks back on for debugging.
debug = _flag("LOYALTY_ENGINE_DEBUG_CYTHON")
pure = _flag("LOYALTY_ENGINE_PURE_PYTHON")
directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
}
# Plain Python keeps Python's semantics: annotations are not C types, functions are introspectable.
py_directives = {"language_level": 3, "binding": True, "annotation_typing": False}


def source_hash(path: Path) -> str:
    """The hash ``loyalty_engine/__init__.py`` compares (the same function is there)."""
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


compiled_py = () if pure else PY_MODULES
if pure:        # a compiled module left from an earlier build would shadow its .py
    for name in PY_MODULES:
        for stale in [*PACKAGE.glob(f"{name}.*.so"), *PACKAGE.glob(f"{name}.*.pyd"), PACKAGE / f"{name}.c"]:
            stale.unlink(missing_ok=True)


class BuildExt(build_ext):
    """build_ext that lists the compiled Python modules' source hashes once they are built, beside the
    package in the build and, for an editable install, in the source tree."""

    def run(self) -> None:
        super().run()
        text = "".join(f"{name} {source_hash(PACKAGE / f'{name}.py')}\n" for name in compiled_py)
        targets = {PACKAGE / LISTING, Path(self.build_lib) / "loyalty_engine" / LISTING}
        for target in targets:
            if target.parent.is_dir():
                target.write_text(text)


core = [Extension("loyalty_engine._core", ["src/loyalty_engine/_core.pyx"], extra_compile_args=["-O3"]),
        Extension("loyalty_engine._bulk", ["src/loyalty_engine/_bulk.pyx"], extra_compile_args=["-O3"])]
# (-O2 without debug symbols: the generated C is calls into the C API; -O3 -g doubles its compile time)
plain = [Extension(f"loyalty_engine.{name}", [f"src/loyalty_engine/{name}.py"], extra_compile_args=["-O2", "-g0"])
         for name in compiled_py]

setup(
    ext_modules=cythonize(core, compiler_directives=directives)
    + (cythonize(plain, compiler_directives=py_directives) if plain else []),
    cmdclass={"build_ext": BuildExt},
    options={"build_ext": {"parallel": os.cpu_count() or 1}},
)
