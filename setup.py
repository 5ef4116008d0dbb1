"""Build the compiled core. Everything else about the package lives in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# LOYALTY_ENGINE_DEBUG_CYTHON=1 turns bounds and wrap-around checks back on for debugging.
debug = os.environ.get("LOYALTY_ENGINE_DEBUG_CYTHON", "") not in ("", "0")
directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
}

setup(
    ext_modules=cythonize(
        [Extension("loyalty_engine._core", ["src/loyalty_engine/_core.pyx"], extra_compile_args=["-O3"]),
         Extension("loyalty_engine._bulk", ["src/loyalty_engine/_bulk.pyx"], extra_compile_args=["-O3"])],
        compiler_directives=directives,
    )
)
