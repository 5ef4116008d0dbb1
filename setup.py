"""Build the compiled core. Everything else about the package lives in pyproject.toml.

Two kinds of extension modules are built:

- the core, ``_core.pyx`` and ``_bulk.pyx``: typed Cython, the ledger's state and the rule kernel;
- the engine's and the ledger's plain Python modules (``PY_MODULES``), compiled as they are by Cython:
  the same source and behaviour, without the interpreter's cost per line (one purchase takes about a
  fifth less time). ``LOYALTY_ENGINE_PURE_PYTHON=1 pip install -e .`` leaves them uncompiled, to step
  through them in a debugger.

Python imports a compiled module before its ``.py``, so a ``.py`` edited after the build would be
ignored. The build writes each compiled module's source hash, taken before Cython reads the source, to
``_compiled.txt``; importing ``loyalty_engine`` (its ``_compiled_check``) refuses a compiled module
whose source changed since, and a compiled module that the listing does not name (it says to build
again). A build removes the compiled copies of modules it no longer compiles.
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
    """The hash ``loyalty_engine/_compiled_check.py`` compares (it computes it the same way)."""
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def read_listing(path: Path) -> dict[str, str]:
    try:
        words = path.read_text().split()
    except FileNotFoundError:
        return {}
    return dict(zip(words[::2], words[1::2], strict=True)) if len(words) % 2 == 0 else {}


def compiled_copies(folder: Path, name: str) -> list[Path]:
    return [*folder.glob(f"{name}.*.so"), *folder.glob(f"{name}.*.pyd")]


compiled_py = () if pure else PY_MODULES
# The sources as Cython is about to read them: an edit during the build shows as a stale module.
hashes = {name: source_hash(PACKAGE / f"{name}.py") for name in compiled_py}
# Cython skips a module whose .c is newer than its .py; a .py put back with an old time (tar, rsync,
# cp -p) would keep its old .c. So a module whose source is not the one last compiled is generated again.
last = read_listing(PACKAGE / LISTING)
for name in compiled_py:
    if last.get(name) != hashes[name]:
        (PACKAGE / f"{name}.c").unlink(missing_ok=True)


class BuildExt(build_ext):
    """build_ext that, once the modules are built, removes the compiled copies of the package's Python
    modules that this build does not compile (so none shadows its .py) and lists the compiled ones'
    source hashes: in the build, and in the source tree when the modules are put there (editable or
    in-place builds)."""

    def run(self) -> None:
        super().run()
        folders = [Path(self.build_lib) / "loyalty_engine"]
        if self.inplace or getattr(self, "editable_mode", False):
            folders.append(PACKAGE)
        text = "".join(f"{name} {hashes[name]}\n" for name in compiled_py)
        for folder in folders:
            if not folder.is_dir():
                continue
            for source in PACKAGE.glob("*.py"):
                if source.stem not in compiled_py:
                    for stale in compiled_copies(folder, source.stem):
                        stale.unlink()
            (folder / LISTING).write_text(text)


core = [Extension("loyalty_engine._core", ["src/loyalty_engine/_core.pyx"], extra_compile_args=["-O3"]),
        Extension("loyalty_engine._bulk", ["src/loyalty_engine/_bulk.pyx"], extra_compile_args=["-O3"])]
# (-O2 without debug symbols: the generated C is calls into the C API; -O3 -g doubles its compile time)
plain = [Extension(f"loyalty_engine.{name}", [f"src/loyalty_engine/{name}.py"], extra_compile_args=["-O2", "-g0"])
         for name in compiled_py]
# (Tracebacks through them name "src/loyalty_engine/engine.py" and so on: Cython embeds the path as
# given, relative to this folder; their source lines show when Python runs from a checkout's root.)

setup(
    ext_modules=cythonize(core, compiler_directives=directives)
    + (cythonize(plain, compiler_directives=py_directives) if plain else []),
    cmdclass={"build_ext": BuildExt},
    options={"build_ext": {"parallel": os.cpu_count() or 1}},
)
