"""Benchmarks live outside the default test paths: run them with

    python -m pytest benchmarks -p no:cacheprovider [--benchmark-json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

# make `benchmarks` importable as a package when pytest is pointed at this directory
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
