"""The .pyi stub of the compiled core names exactly what the core defines, with the same parameters."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import loyalty_engine._core as core

STUB = Path(core.__file__).with_name("_core.pyi")


CLASSES = ("State", "Kernel", "OnePurchase")


def _stub_defs() -> tuple[dict[str, list[str]], dict[str, dict[str, list[str]]], set[str], dict[str, set[str]]]:
    tree = ast.parse(STUB.read_text())
    funcs: dict[str, list[str]] = {}
    methods: dict[str, dict[str, list[str]]] = {c: {} for c in CLASSES}
    names: set[str] = set()
    attrs: dict[str, set[str]] = {c: set() for c in CLASSES}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            funcs[node.name] = [a.arg for a in node.args.args]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ClassDef):
            assert node.name in CLASSES, f"the stub has a class {node.name} this test does not know"
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    methods[node.name][item.name] = [a.arg for a in item.args.args]
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    attrs[node.name].add(item.target.id)
    return funcs, methods, names, attrs


FUNCS, METHODS, NAMES, ATTRS = _stub_defs()


def test_stub_module_names_match_the_core() -> None:
    runtime = {n for n in dir(core) if not n.startswith("__") and n not in ("np", "mmap", *CLASSES)}
    assert runtime == set(FUNCS) | NAMES
    assert all(isinstance(getattr(core, c), type) for c in CLASSES)


@pytest.mark.parametrize("cls", CLASSES)
def test_stub_class_members_match_the_core(cls: str) -> None:
    runtime = {n for n in dir(getattr(core, cls)) if not n.startswith("__")}
    stubbed = (set(METHODS[cls]) | ATTRS[cls]) - {"__init__"}
    assert runtime == stubbed


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_function_parameters_match(name: str) -> None:
    params = list(inspect.signature(getattr(core, name)).parameters)
    assert params == FUNCS[name]


@pytest.mark.parametrize(("cls", "name"), [(c, m) for c in CLASSES for m in sorted(set(METHODS[c]) - {"__init__"})])
def test_method_parameters_match(cls: str, name: str) -> None:
    params = list(inspect.signature(getattr(getattr(core, cls), name)).parameters)
    expected = METHODS[cls][name][1:] if name == "from_export" else METHODS[cls][name]
    assert params == expected, f"{cls}.{name}: runtime {params}, stub {expected}"
