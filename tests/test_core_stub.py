"""The .pyi stub of the compiled core names exactly what the core defines, with the same parameters."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import loyalty_engine._core as core

STUB = Path(core.__file__).with_name("_core.pyi")


def _stub_defs() -> tuple[dict[str, list[str]], dict[str, list[str]], set[str], set[str]]:
    tree = ast.parse(STUB.read_text())
    funcs: dict[str, list[str]] = {}
    methods: dict[str, list[str]] = {}
    names: set[str] = set()
    attrs: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            funcs[node.name] = [a.arg for a in node.args.args]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ClassDef) and node.name == "State":
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    methods[item.name] = [a.arg for a in item.args.args]
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    attrs.add(item.target.id)
    return funcs, methods, names, attrs


FUNCS, METHODS, NAMES, ATTRS = _stub_defs()


def test_stub_module_names_match_the_core() -> None:
    runtime = {n for n in dir(core) if not n.startswith("__") and n not in ("np", "mmap", "State")}
    assert runtime == set(FUNCS) | NAMES


def test_stub_state_members_match_the_core() -> None:
    runtime = {n for n in dir(core.State) if not n.startswith("__")}
    stubbed = (set(METHODS) | ATTRS) - {"__init__"}
    assert runtime == stubbed


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_function_parameters_match(name: str) -> None:
    params = list(inspect.signature(getattr(core, name)).parameters)
    assert params == FUNCS[name]


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"__init__"}))
def test_method_parameters_match(name: str) -> None:
    params = list(inspect.signature(getattr(core.State, name)).parameters)
    expected = METHODS[name][1:] if name == "from_export" else METHODS[name]
    assert params == expected, f"State.{name}: runtime {params}, stub {expected}"
